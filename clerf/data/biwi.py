"""BIWI Kinect Head Pose, in the commonly used preprocessed ``.npz`` form.

The ``.npz`` (FSA-Net's ``data/TYY_create_db_biwi.py`` made the files everyone passes around,
e.g. ``BIWI_noTrack.npz``) holds ``image``: ``(N, H, W, 3)`` uint8 face crops and ``pose``:
``(N, 3)`` = **(yaw, pitch, roll) in degrees**. BIWI is evaluated whole (protocol 1): the +-99 deg
filter applies only when asked for (``max_abs_angle``; ``prepare.biwi_filter=true``); the number
of samples beyond it is logged and stored either way.

Sign convention (``signs``), the point on which peers disagree:

* ``fsanet`` (default): the angles already have 300W-LP semantics, so the label is
  ``rotation_from_euler(pitch, yaw, roll)`` with no sign change. FSA-Net derives them from BIWI's
  raw rotation ``M`` (``*_pose.txt``) as ``Rt = M.T``; ``pitch = atan2(Rt21, Rt22)``,
  ``yaw = -atan2(-Rt20, hypot(Rt21, Rt22))``, ``roll = -atan2(Rt10, Rt00)``, i.e. the Euler
  angles of ``Rt`` with yaw and roll negated, which is ``F @ Rt @ F`` (``F = diag(-1, 1, 1)``;
  :func:`biwi_rotation_from_raw`). Models trained on 300W-LP reach 4-5 deg MAE on these labels
  only because the semantics agree (positive yaw = face toward image-left, docs/conventions.md 2).
  6DRepNet reads the ``.npz`` this way too.
* ``mirrored``: yaw and roll negated, the reading of a loader that takes the Euler angles of
  ``M.T`` without FSA-Net's two sign flips. Provided to reproduce such peers, not as a default.

Channel order (``channels``): FSA-Net decoded the frames with ``cv2.imread``, so its arrays are
**BGR**; the default ``bgr`` converts to RGB. Use ``rgb`` for files made with an RGB decoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from clerf.config import BiwiChannels, BiwiSigns
from clerf.data.base import RealDataset, RealSample, register_dataset
from clerf.errors import DataError
from clerf.geometry import hflip_euler, hflip_rotation

__all__ = ["BIWI", "BIWI_SIGNS", "BIWI_CHANNELS", "biwi_rotation_from_raw"]

#: the ``prepare.biwi_signs`` and ``prepare.biwi_channels`` choices
BIWI_SIGNS: tuple[str, ...] = get_args(BiwiSigns)
BIWI_CHANNELS: tuple[str, ...] = get_args(BiwiChannels)


def biwi_rotation_from_raw(M: torch.Tensor) -> torch.Tensor:
    """Label matrix (clerf/300W-LP semantics) of BIWI's raw ``*_pose.txt`` rotation ``M``.

    ``F @ M.T @ F``: exactly the rotation FSA-Net's Euler angles describe (``signs='fsanet'``),
    without going through Euler angles (no gimbal-lock loss). ``M``: ``(..., 3, 3)``.
    """
    return hflip_rotation(M.transpose(-1, -2))


@register_dataset("biwi")
class BIWI(RealDataset):
    """BIWI ``.npz`` loader; ``root`` is the ``.npz`` file.

    Args:
        max_abs_angle: None (default: the whole set, as the protocol evaluates it) or a filter
            in degrees, only when asked for.
        signs: ``fsanet`` (default) or ``mirrored``; see the module docstring.
        channels: ``bgr`` (default, FSA-Net's files) or ``rgb``: the order stored in the file.
    """

    default_split = "test"
    default_crop = {"train": "none", "test": "none"}

    def __init__(
        self,
        root: str | Path,
        max_abs_angle: float | None = None,
        skip_bad: bool = False,
        verify_images: str = "header",
        signs: str = "fsanet",
        channels: str = "bgr",
    ) -> None:
        super().__init__(root, max_abs_angle, skip_bad, verify_images)
        if signs not in BIWI_SIGNS:
            raise DataError(f"BIWI: unknown signs '{signs}' (known: {', '.join(BIWI_SIGNS)})")
        if channels not in BIWI_CHANNELS:
            raise DataError(
                f"BIWI: unknown channels '{channels}' (known: {', '.join(BIWI_CHANNELS)})"
            )
        self.signs = signs
        self.channels = channels
        self._images: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        return {"signs": self.signs, "channels": self.channels}

    def _scan(self) -> None:
        p = self.root
        if not p.is_file():
            raise DataError(f"{p}: BIWI .npz file not found (give the .npz file itself)")
        try:
            with np.load(p, allow_pickle=False) as data:
                missing = [k for k in ("image", "pose") if k not in data.files]
                if missing:
                    raise DataError(
                        f"{p}: no {' or '.join(repr(k) for k in missing)} array in the .npz "
                        f"(found: {', '.join(data.files) or 'none'}; expected image (N,H,W,3) "
                        "uint8 and pose (N,3) yaw, pitch, roll in degrees)"
                    )
                images = data["image"]
                pose = np.asarray(data["pose"], dtype=np.float64)
        except DataError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
            msg = " ".join(str(exc).split())
            raise DataError(f"{p}: not a readable .npz file ({msg})") from None
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{p}: 'image' must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}"
            )
        if pose.ndim != 2 or pose.shape != (images.shape[0], 3):
            raise DataError(
                f"{p}: 'pose' must be ({images.shape[0]}, 3) yaw, pitch, roll, got {pose.shape}"
            )
        self._images = images
        for i, (yaw, pitch, roll) in enumerate(pose.tolist()):
            euler = (float(pitch), float(yaw), float(roll))
            if self.signs == "mirrored":  # the mirror image's label (docs/conventions.md)
                euler = hflip_euler(*euler)
            self._consider(RealSample(f"BIWI/{i:06d}", "BIWI", euler, row=i))

    def load_image(self, sample: RealSample) -> np.ndarray:
        if self._images is None or sample.row is None:
            raise DataError(f"{self.root}: BIWI sample {sample.key} read before scan()")
        img = self._images[sample.row]
        return np.ascontiguousarray(img[..., ::-1] if self.channels == "bgr" else img)
