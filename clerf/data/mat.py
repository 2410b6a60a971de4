"""Reading one 300W-LP / AFLW2000 sample: the ``.mat`` labels and the ``.jpg`` image.

``.mat`` (MATLAB v5, read with ``scipy.io.loadmat``):

* ``Pose_Para``: ``1 x 7`` = ``[pitch, yaw, roll, tx, ty, tz, scale]``, angles in **radians**.
* ``pt2d``: ``2 x 68`` landmarks in pixels (row 0 = x, row 1 = y); -1 marks a missing point.

The labels mean ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` (``docs/conventions.md`` section 1);
:func:`clerf.geometry.rotation_from_euler` makes the matrix, nothing here does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clerf.errors import DataError

__all__ = ["PoseMat", "read_pose_mat", "read_rgb_image"]


@dataclass(frozen=True)
class PoseMat:
    """Labels of one image: Euler angles in **degrees** and the landmarks (or None)."""

    pitch: float
    yaw: float
    roll: float
    pt2d: np.ndarray | None  # (2, N) float64 pixels, -1 = missing

    @property
    def euler(self) -> tuple[float, float, float]:
        """``(pitch, yaw, roll)`` in degrees."""
        return (self.pitch, self.yaw, self.roll)


def read_pose_mat(path: str | Path, need_landmarks: bool = True) -> PoseMat:
    """Read ``Pose_Para`` (radians -> degrees) and ``pt2d`` from a 300W-LP/AFLW2000 ``.mat``.

    Raises:
        DataError: missing or unreadable file, no ``Pose_Para`` (or fewer than 3 values),
            non-finite angles, no ``pt2d`` when ``need_landmarks``, or a ``pt2d`` that is not
            ``(2, N)``. The message names the file.
    """
    import scipy.io

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: label file not found (expected the .mat next to the image)")
    try:
        mat = scipy.io.loadmat(str(p))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError ...
        msg = " ".join(str(exc).split())
        raise DataError(f"{p}: not a readable MATLAB .mat file ({msg})") from None
    if "Pose_Para" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise DataError(f"{p}: no 'Pose_Para' in the .mat (variables: {keys})")
    pose = np.asarray(mat["Pose_Para"], dtype=np.float64).ravel()
    if pose.size < 3:
        raise DataError(f"{p}: 'Pose_Para' has {pose.size} values, expected 7 (pitch, yaw, roll..)")
    if not np.isfinite(pose[:3]).all():
        raise DataError(f"{p}: 'Pose_Para' angles are not finite: {pose[:3].tolist()}")
    pt2d = None
    if "pt2d" in mat:
        pt2d = np.asarray(mat["pt2d"], dtype=np.float64)
        if pt2d.ndim != 2 or pt2d.shape[0] != 2:
            raise DataError(f"{p}: 'pt2d' must be 2 x N landmarks, got shape {pt2d.shape}")
    elif need_landmarks:
        raise DataError(f"{p}: no 'pt2d' landmarks in the .mat (needed for the crop)")
    pitch, yaw, roll = (math.degrees(float(a)) for a in pose[:3])
    return PoseMat(pitch=pitch, yaw=yaw, roll=roll, pt2d=pt2d)


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 **RGB** (grayscale/CMYK/palette converted).

    Uses PIL, as the peers do (``Image.open(...).convert('RGB')``), so decoded pixels match theirs.

    Raises:
        DataError: missing, truncated or undecodable file, naming it.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    try:
        with Image.open(p) as img:
            img.load()  # decode now so a truncated file fails here, inside the try
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        msg = " ".join(str(exc).replace(f"'{p}'", "").replace(str(p), "").split())
        raise DataError(f"{p}: unreadable image ({msg})") from None
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{p}: decoded to an unexpected shape {arr.shape}")
    return arr
