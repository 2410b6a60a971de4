"""The generator interface and registry.

A generator renders faces of reproducible identities at exactly known rotations. It imports only
``clerf.geometry`` and torch (the layering in the README's "Layout").

Contract of :meth:`PoseGenerator.render`:

* ``identities``: ``(B,)`` int64; identity ``i`` of a generator built with ``seed`` is the same
  face every time (it depends only on ``(seed, i)``).
* ``rotations``: ``(B, 3, 3)`` target labels (``docs/conventions.md``: rows = head axes in camera
  coordinates, x right, y up, z toward the viewer).
* Returns :class:`Rendered` with ``images`` ``(B, 3, H, W)`` uint8 RGB on the generator's device and
  ``rotations`` ``(B, 3, 3)`` float32: the rotation that was actually rendered (after any
  in-plane step), which is the label to store.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from clerf.plugins import is_class_spec, load_class


@dataclass
class Rendered:
    """A rendered batch: uint8 images ``(B, 3, H, W)`` and their exact rotations ``(B, 3, 3)``."""

    images: Tensor
    rotations: Tensor


class PoseGenerator(ABC):
    """Base class of pose-conditioned face generators."""

    #: registry name
    name: ClassVar[str] = ""

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.seed = int(seed)
        self.device = torch.device(device)

    @abstractmethod
    def render(self, identities: Tensor, rotations: Tensor, resolution: int) -> Rendered:
        """Render ``identities[i]`` at ``rotations[i]``; see the module docstring."""

    def params(self) -> dict[str, Any]:
        """JSON-friendly parameters that, with the name and seed, rebuild this generator."""
        return {}

    def reachable(self, rotations: Tensor) -> Tensor:
        """Boolean ``(B,)``: which target rotations this generator can render faithfully."""
        return torch.ones(rotations.shape[:-2], dtype=torch.bool, device=rotations.device)


#: the range of image sizes (pixels, square) that generators accept
MIN_RESOLUTION, MAX_RESOLUTION = 16, 1024


def check_resolution(resolution: object) -> int:
    """Return ``resolution`` as an int, or raise ``ValueError`` saying what is expected.

    Accepts ints (and integral floats such as ``64.0``) in ``[MIN_RESOLUTION, MAX_RESOLUTION]``.
    """
    ok = isinstance(resolution, int) and not isinstance(resolution, bool)
    if not ok and isinstance(resolution, float) and resolution.is_integer():
        resolution, ok = int(resolution), True
    if not ok or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:  # type: ignore[operator]
        raise ValueError(
            f"resolution must be an integer number of pixels in "
            f"[{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution!r}"
        )
    return int(resolution)  # type: ignore[arg-type]


_REGISTRY: dict[str, type[PoseGenerator]] = {}


def identity_seed(seed: int, index: int) -> int:
    """Fixed 63-bit integer hash of ``(seed, index)`` (splitmix64 finaliser on a combined key).

    Seeds ``torch.Generator`` per identity, so identity ``index`` never depends on which other
    identities are in the batch, on the batch size, or on the device.
    """
    mask = (1 << 64) - 1
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019)
    x &= mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def register_generator(name: str):
    """Class decorator: make a generator available under ``name`` in configs."""

    def deco(cls: type[PoseGenerator]) -> type[PoseGenerator]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_generators() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # Built-in generators register themselves on import.
    for mod in ("generators.procedural", "generators.gan"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # pragma: no cover - during development only
            if exc.name != mod:
                raise


def generator_class(name: str) -> type[PoseGenerator]:
    """Look up a generator class by registry name or ``package.module:ClassName``."""
    if is_class_spec(name):
        return load_class(name, PoseGenerator, "generator")
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(
            f"unknown generator '{name}' (known: {known}; or give package.module:ClassName)"
        )
    return _REGISTRY[name]


def build_generator(
    name: str, seed: int = 0, device: str | torch.device = "cpu", **params: Any
) -> PoseGenerator:
    """Instantiate a generator from its name and parameters (as found in a config)."""
    cls = generator_class(name)
    try:
        return cls(seed=seed, device=device, **params)
    except TypeError as exc:
        raise ValueError(f"generator '{name}': bad parameters {sorted(params)} ({exc})") from exc
