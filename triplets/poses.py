"""Seeded pose samplers: where the anchors of the triplets come from.

Every sampler draws ``n`` rotations ``(n, 3, 3)`` float64 (CPU) from a ``torch.Generator``, so the
same generator state gives the same poses on any machine. All pose math goes through
:mod:`clerf.geometry` (``docs/conventions.md``: rows of ``R`` are the head axes in camera
coordinates; angles in degrees).

* :class:`UniformSO3`: the Haar measure over SO(3), every orientation equally likely (full range,
  upside-down included).
* :class:`EulerBox`: each Euler angle uniform in a range (300W-LP-like default: pitch +-60,
  yaw +-90, roll +-45 deg). Uniform in the angles, not in SO(3).
* :class:`LookAtInplane`: what a look-at generator (EG3D, PanoHead) can reach: a camera direction
  uniform on the spherical cap within ``max_camera_angle`` of frontal, then an exact in-plane
  image rotation uniform in ``inplane_range``. With a 180 deg cap and a full in-plane circle this
  is the Haar measure again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clerf.geometry import (
    cap_directions,
    lookat_rotation,
    random_rotation,
    rotate_inplane,
    sample_euler_box,
)

__all__ = [
    "PoseSampler",
    "UniformSO3",
    "EulerBox",
    "LookAtInplane",
    "POSE_SAMPLERS",
    "build_pose_sampler",
    "seeded_generator",
]


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` whose state depends only on ``(seed, *keys)``.

    Keys are mixed with numpy's ``SeedSequence`` (no correlation between neighbouring keys), so
    e.g. ``seeded_generator(seed, stream, block)`` gives independent streams per block.
    """
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be non-negative, got {seed}, {keys}")
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def _range(value: Any, name: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a [low, high] pair of degrees, got {value!r}") from exc
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo:g} <= low <= high <= {hi:g}, got [{a:g}, {b:g}]")
    return a, b


class PoseSampler(ABC):
    """Draws rotations; subclasses say which distribution and report their parameters."""

    name: str = ""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` rotations ``(n, 3, 3)`` float64 on the CPU."""

    def params(self) -> dict[str, Any]:
        """JSON-friendly parameters (written into store attributes)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params()}


class UniformSO3(PoseSampler):
    """Rotations uniform over SO(3) (Haar measure), via :func:`clerf.geometry.random_rotation`."""

    name = "uniform"

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return random_rotation(n, generator=generator, dtype=torch.float64)


class EulerBox(PoseSampler):
    """Each of pitch, yaw, roll uniform in its ``[low, high]`` range (degrees).

    Yaw must stay within [-90, 90] (the range of the Euler decomposition, docs/conventions.md
    section 1),
    pitch and roll within [-180, 180].
    """

    name = "euler_box"

    def __init__(
        self,
        pitch: tuple[float, float] = (-60.0, 60.0),
        yaw: tuple[float, float] = (-90.0, 90.0),
        roll: tuple[float, float] = (-45.0, 45.0),
    ) -> None:
        self.pitch = _range(pitch, "pitch_range", -180.0, 180.0)
        self.yaw = _range(yaw, "yaw_range", -90.0, 90.0)
        self.roll = _range(roll, "roll_range", -180.0, 180.0)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return sample_euler_box(
            n, self.pitch, self.yaw, self.roll, generator=generator, dtype=torch.float64
        )

    def params(self) -> dict[str, Any]:
        return {"pitch_range": list(self.pitch), "yaw_range": list(self.yaw),
                "roll_range": list(self.roll)}


class LookAtInplane(PoseSampler):
    """Look-at camera directions within ``max_camera_angle`` of frontal x in-plane angles.

    The camera direction ``d = R @ e_z`` (head coordinates) is uniform on the spherical cap of
    half-angle ``max_camera_angle`` around the frontal direction ``e_z``; ``R`` is the roll-free
    look-at rotation of ``d`` (:func:`clerf.geometry.lookat_rotation`) followed by an image
    rotation of ``phi`` degrees clockwise (:func:`clerf.geometry.rotate_inplane`), ``phi`` uniform
    in ``inplane_range``. ``camera_direction(R)`` is unchanged by the in-plane step.
    """

    name = "lookat"

    def __init__(
        self, max_camera_angle: float = 90.0, inplane_range: tuple[float, float] = (-180.0, 180.0)
    ) -> None:
        if not 0.0 <= float(max_camera_angle) <= 180.0:
            raise ValueError(f"max_camera_angle must be in [0, 180] deg, got {max_camera_angle}")
        self.max_camera_angle = float(max_camera_angle)
        self.inplane = _range(inplane_range, "inplane_range", -360.0, 360.0)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
        d = cap_directions(u[:, 0], u[:, 1], self.max_camera_angle)
        lo, hi = self.inplane
        phi = lo + u[:, 2] * (hi - lo)
        return rotate_inplane(lookat_rotation(d), phi)

    def params(self) -> dict[str, Any]:
        return {"max_camera_angle": self.max_camera_angle, "inplane_range": list(self.inplane)}


POSE_SAMPLERS: dict[str, type[PoseSampler]] = {
    UniformSO3.name: UniformSO3,
    EulerBox.name: EulerBox,
    LookAtInplane.name: LookAtInplane,
}


def build_pose_sampler(cfg: Any) -> PoseSampler:
    """The sampler named by ``cfg.poses`` with its parameters from a ``TripletsConfig``.

    Raises:
        ValueError: unknown name or bad range (the caller turns it into a ``ConfigError``).
    """
    name = cfg.poses
    if name == "uniform":
        return UniformSO3()
    if name == "euler_box":
        return EulerBox(cfg.pitch_range, cfg.yaw_range, cfg.roll_range)
    if name == "lookat":
        return LookAtInplane(cfg.max_camera_angle, cfg.inplane_range)
    raise ValueError(f"triplets.poses must be one of {sorted(POSE_SAMPLERS)}, got '{name}'")
