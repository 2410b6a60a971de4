"""Smoothing a face's rotation over video frames on SO(3): the One-Euro filter.

The One-Euro filter (Casiez, Roussel and Vogel, CHI 2012) is a low-pass filter whose cutoff
rises with the signal's speed: little lag when the head turns fast, little jitter when it
holds still. Here it runs on the rotation itself, never on Euler angles (which jump at the
yaw = +-90 seam and wrap at +-180): for a new estimate ``R`` and the filtered ``R_f``,

    v     = log(R_f^T R)                      (the rotation vector from R_f to R, rad)
    speed = lowpass(|v| * rate, alpha(d_cutoff))   (deg/s)
    cut   = min_cutoff + beta * speed              (Hz)
    R_f  <- R_f exp(alpha(cut) * v)                alpha(c) = 1 / (1 + rate / (2 pi c))

so the filtered rotation moves along the geodesic towards each estimate, by a fraction that
grows with the speed. ``exp`` / ``log`` are kornia's axis-angle conversions. Off by default
in ``clerf predict`` (``--smooth``); its lag is the price of its steadiness.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["OneEuroSO3", "so3_log", "so3_exp"]


def so3_log(R: np.ndarray) -> np.ndarray:
    """Rotation vector (axis x angle, rad) of a ``(3, 3)`` rotation."""
    from kornia.geometry.conversions import rotation_matrix_to_axis_angle

    t = torch.as_tensor(np.asarray(R, dtype=np.float64))[None]
    return rotation_matrix_to_axis_angle(t)[0].numpy()


def so3_exp(v: np.ndarray) -> np.ndarray:
    """The ``(3, 3)`` rotation of a rotation vector (rad)."""
    from kornia.geometry.conversions import axis_angle_to_rotation_matrix

    t = torch.as_tensor(np.asarray(v, dtype=np.float64))[None]
    return axis_angle_to_rotation_matrix(t)[0].numpy()


def _alpha(cutoff_hz: float, rate_hz: float) -> float:
    return 1.0 / (1.0 + rate_hz / (2.0 * math.pi * cutoff_hz))


class OneEuroSO3:
    """One-Euro filter of one face's rotation (module docstring).

    Args:
        rate: frames per second of the video.
        min_cutoff: cutoff (Hz) when the head holds still: lower = steadier, more lag.
        beta: cutoff increase per deg/s of head speed: higher = less lag when turning.
        d_cutoff: cutoff (Hz) of the speed estimate.
    """

    def __init__(self, rate: float, min_cutoff: float = 1.0, beta: float = 0.01,
                 d_cutoff: float = 1.0) -> None:  # fmt: skip
        if rate <= 0 or min_cutoff <= 0 or beta < 0 or d_cutoff <= 0:
            raise ValueError(f"OneEuroSO3: need rate, min_cutoff, d_cutoff > 0 and beta >= 0 "
                             f"(got {rate}, {min_cutoff}, {beta}, {d_cutoff})")  # fmt: skip
        self.rate, self.min_cutoff, self.beta, self.d_cutoff = rate, min_cutoff, beta, d_cutoff
        self.R: np.ndarray | None = None
        self.speed = 0.0

    def __call__(self, R: np.ndarray) -> np.ndarray:
        R = np.asarray(R, dtype=np.float64)
        if self.R is None:
            self.R = R.copy()
            return self.R.copy()
        v = so3_log(self.R.T @ R)
        speed = math.degrees(float(np.linalg.norm(v))) * self.rate
        self.speed += _alpha(self.d_cutoff, self.rate) * (speed - self.speed)
        a = _alpha(self.min_cutoff + self.beta * self.speed, self.rate)
        self.R = self.R @ so3_exp(a * v)
        return self.R.copy()

    def reset(self) -> None:
        self.R, self.speed = None, 0.0
