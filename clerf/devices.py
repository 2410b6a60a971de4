"""The one device resolver: ``auto`` means this process's CUDA device when available, else the
CPU; and which process of a launch this is, before any ``Accelerator`` exists."""

from __future__ import annotations

import os

import torch

from clerf.errors import ConfigError


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """``"auto"`` -> this process's CUDA device if available else ``cpu``; any other torch
    device string as is.

    Under ``accelerate launch`` / ``torchrun`` each process renders and trains on its own GPU:
    ``auto`` is ``cuda:LOCAL_RANK`` (modulo the visible devices), never a bare ``cuda`` that
    would put every rank on GPU 0 before the ``Accelerator`` picks the device.

    A string torch does not understand is a :class:`ConfigError` naming ``what`` (the flag or
    config key it came from).
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"{what}: '{name}' is not a device (expected auto, cpu, cuda, cuda:1, ...)"
        ) from exc


def local_rank() -> int:
    """This process's index on its machine under a launcher (``LOCAL_RANK``), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main_process() -> bool:
    """Whether this is the launch's main process (global ``RANK`` 0, or no launcher), known
    before the ``Accelerator`` is created: data only the main process uses (the held-out set
    of the per-epoch evaluation) is read or rendered there only."""
    return int(os.environ.get("RANK", "0") or 0) == 0
