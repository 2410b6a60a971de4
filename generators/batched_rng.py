"""Per-sample random draws inside a batched network call, without touching the network's code.

EG3D and PanoHead draw depth jitter and importance samples from torch's global generator
inside the user's checkout (``torch.rand_like(depths)``, ``torch.rand(...)``). To render a
batch whose every image equals the one rendered alone (seeded by its own key), clerf
intercepts those calls with a :class:`torch.overrides.TorchFunctionMode`: a draw whose first
dimension is a multiple ``k * B`` of the batch is split into ``B`` blocks of ``k`` rows, block
``i`` drawn from sample ``i``'s own generator, exactly as that sample's solo call (first
dimension ``k``) would draw it from the global generator seeded with the same key. A draw that
cannot be attributed to samples (another first dimension, an in-place ``uniform_`` /
``normal_``, ``randperm``, ``multinomial``, ``bernoulli`` from the global generator) raises
:class:`Unattributable`; the caller then falls back to one sample at a time. Draws with their
own ``generator=`` pass through untouched (they leave the global generators alone).

Per-sample generators live on the draw's device; the global generators are not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["PerSampleRNG", "Unattributable"]


class Unattributable(RuntimeError):
    """A random draw inside the batched call that cannot be split per sample."""


_FACTORIES = {"rand", "randn"}
_LIKE = {"rand_like", "randn_like"}
_REFUSED = {"randint", "randint_like", "randperm", "normal", "bernoulli", "multinomial",
            "uniform_", "normal_", "exponential_", "geometric_", "cauchy_", "log_normal_",
            "random_", "bernoulli_", "poisson"}  # fmt: skip


def _shape(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, ...]:
    if "size" in kwargs:
        size = kwargs["size"]
    elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        size = args[0]
    else:
        size = args
    return tuple(int(s) for s in size)


class PerSampleRNG(TorchFunctionMode):
    """Within this mode, ``torch.rand/randn(_like)`` draws of first dimension ``k * len(seeds)``
    come from per-sample generators seeded with ``seeds``, block ``i`` from generator ``i``;
    other random draws raise :class:`Unattributable`.

    Args:
        seeds: one integer seed per sample of the batch, in batch order.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        super().__init__()
        self.seeds = [int(s) for s in seeds]
        self._generators: dict[tuple[str, int], torch.Generator] = {}
        self.draws = 0

    def _generator(self, device: torch.device, i: int) -> torch.Generator:
        key = (str(device), i)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seeds[i])
            self._generators[key] = g
        return g

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if kwargs.get("generator") is not None:
            # a draw from its own generator leaves the global ones alone: already repeatable
            return func(*args, **kwargs)
        if name in _REFUSED:
            raise Unattributable(f"the network draws with {name}, which clerf cannot split "
                                 "per sample")  # fmt: skip
        if name not in _FACTORIES and name not in _LIKE:
            return func(*args, **kwargs)
        if name in _LIKE:
            ref = args[0]
            shape = tuple(ref.shape)
            kwargs.setdefault("dtype", ref.dtype)
            kwargs.setdefault("device", ref.device)
            base = torch.rand if name == "rand_like" else torch.randn
            for k in ("memory_format",):
                kwargs.pop(k, None)
        else:
            shape = _shape(args, kwargs)
            kwargs.pop("size", None)
            base = func
        b = len(self.seeds)
        if not shape or shape[0] % b:
            raise Unattributable(f"{name} of shape {shape} in a batch of {b}")
        k = shape[0] // b
        device = torch.device(kwargs.get("device") or "cpu")
        kwargs["device"] = device
        self.draws += 1
        # (inside __torch_function__ the mode is off: these calls are not intercepted again)
        parts = [base((k, *shape[1:]), generator=self._generator(device, i), **kwargs)
                 for i in range(b)]
        return torch.cat(parts, dim=0)
