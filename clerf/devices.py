"""The one device resolver: ``auto`` means CUDA when available, else the CPU."""

from __future__ import annotations

import torch

from clerf.errors import ConfigError


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; any other torch device string as is.

    A string torch does not understand is a :class:`ConfigError` naming ``what`` (the flag or
    config key it came from).
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"{what}: '{name}' is not a device (expected auto, cpu, cuda, cuda:1, ...)"
        ) from exc
