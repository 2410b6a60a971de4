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


class HostSyncCounter:
    """Counts the operations that read a tensor's values back to the host (each one a device
    synchronisation on a GPU): ``item``, ``bool``/``int``/``float``, ``tolist``, ``nonzero`` and
    indexing with a boolean mask (its output size depends on the values). A context manager
    over a :class:`torch.overrides.TorchFunctionMode`; ``counts`` holds one entry per kind.
    Reads inside ``torch.optim`` are left out by default (its step counters live on the CPU
    by design). On a CPU every tensor is a host tensor: the count is of reads that *would*
    sync where the tensor lives on an accelerator.

        >>> with HostSyncCounter() as c:
        ...     _ = torch.ones(3).sum().item()
        >>> c.total
        1
    """

    _NAMES = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero",
              "argwhere", "masked_select", "unique", "repeat_interleave"}

    def __init__(self, skip_optimizer: bool = True) -> None:
        from collections import Counter

        self.counts: Counter[str] = Counter()
        self.skip_optimizer = skip_optimizer
        self._mode: object | None = None

    def _inside_optimizer(self) -> bool:
        """torch's optimizers keep their step counters on the CPU on purpose (no device sync)
        and read them per parameter: not the training code's reads."""
        import traceback

        return any("torch/optim/" in f.filename.replace("\\", "/")
                   for f in traceback.extract_stack(limit=12))  # fmt: skip

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncCounter:
        from torch.overrides import TorchFunctionMode

        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                key = None
                if name in counter._NAMES:
                    # repeat_interleave syncs only with tensor repeats and no output_size
                    if name != "repeat_interleave" or (
                            len(args) > 1 and isinstance(args[1], torch.Tensor)
                            and not (kwargs or {}).get("output_size")):  # fmt: skip
                        key = name
                elif name in ("__getitem__", "__setitem__") and len(args) > 1 and \
                        _has_bool_mask(args[1]):  # fmt: skip
                    key = f"{name}[bool mask]"
                if key is not None and not (counter.skip_optimizer
                                            and counter._inside_optimizer()):  # fmt: skip
                    counter.counts[key] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)


def _has_bool_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncsPerCall:
    """Counts host syncs per call of ``owner.<method>`` (e.g. ``Trainer.train_micro_batch``):
    inside the ``with`` block every call runs under its own :class:`HostSyncCounter` and
    ``counts`` gets one ``{kind: n}`` dict per call; the method is restored on exit. With
    ``only`` (call numbers from 0), the other calls run uncounted, at full speed (their
    entries are empty).

        >>> from clerf.training import Trainer
        >>> with SyncsPerCall(Trainer, "train_micro_batch") as s:  # doctest: +SKIP
        ...     run_finetune(cfg, out)
        >>> max(sum(c.values()) for c in s.counts[:-1])  # doctest: +SKIP
    """

    def __init__(self, owner: object, method: str, only: set[int] | None = None) -> None:
        self.owner, self.method, self.only = owner, method, only
        self.counts: list[dict[str, int]] = []

    def __enter__(self) -> SyncsPerCall:
        real = getattr(self.owner, self.method)
        self._real = real
        counts = self.counts

        only = self.only

        def counted(*args, **kwargs):
            if only is not None and len(counts) not in only:
                counts.append({})
                return real(*args, **kwargs)
            with HostSyncCounter() as c:
                out = real(*args, **kwargs)
            counts.append(dict(c.counts))
            return out

        setattr(self.owner, self.method, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.method, self._real)
