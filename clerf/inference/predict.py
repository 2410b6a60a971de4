"""Head pose of every face in images, folders and videos (``clerf predict``).

Pipeline per image (or video frame), all on an ``(H, W, 3)`` uint8 RGB array:

1. faces: a :class:`~clerf.inference.detect.FaceDetector` (Haar by default, or user boxes);
2. crop: the detector box -> estimated landmark box
   (:func:`~clerf.inference.detect.landmark_box_from_detection`, the detector's mapping) -> the
   model's training crop
   preset (:func:`clerf.data.crop.crop_box`, ``k`` fixed, or the middle of a random preset's
   range) -> :func:`clerf.data.crop.crop_image` (outside = black) ->
   :func:`clerf.data.crop.resize_square` to the model's input size, as the prepared stores do.
   The preset ``none`` (models trained on whole rendered heads) crops the detector box made
   square about its centre;
3. pose: :meth:`PoseModel.predict_rotations`; Euler angles from
   :func:`clerf.geometry.euler_from_rotation` (degrees, yaw in [-90, 90]);
4. drawing: :func:`clerf.drawing.draw_axes` at the box centre (docs/conventions.md section 2)
   with the box and the angles.

Outputs in ``OUT/``: ``predictions.json`` (inputs with their status, faces, the crop settings),
``predictions.csv`` (one row per face) and ``annotated/`` (images as PNG, videos as MP4).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clerf.errors import DataError
from clerf.geometry import euler_from_rotation, rotate_inplane, split_camera_inplane
from clerf.inference.detect import Box, BoxMapping, FaceDetector, landmark_box_from_detection
from clerf.inference.model import PoseModel

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FacePose",
    "FacePredictor",
    "collect_inputs",
    "read_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class FacePose:
    """One face: where it is, how it was cut, its pose (degrees and matrix)."""

    file: str
    frame: int | None
    face: int
    box: Box
    crop_box: tuple[int, int, int, int]
    rotation: np.ndarray  # (3, 3)
    pitch: float
    yaw: float
    roll: float

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "frame": self.frame, "face": self.face,
                "box": self.box.as_list(), "score": self.box.score, "angle": self.box.angle,
                "crop_box": list(self.crop_box), "pitch": self.pitch, "yaw": self.yaw,
                "roll": self.roll, "rotation": self.rotation.tolist()}


def collect_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(path, "image" | "video")`` for every input; folders are searched recursively (sorted)
    for files with known image/video extensions.

    Raises:
        DataError: a missing input, a file of unknown type, or a folder with nothing usable.
    """
    out: list[tuple[Path, str]] = []

    def kind(p: Path) -> str | None:
        ext = p.suffix.lower()
        return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS \
            else None

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = [(f, kind(f)) for f in sorted(p.rglob("*")) if f.is_file() and kind(f)]
            if not found:
                raise DataError(f"{p}: folder holds no image or video files "
                                f"({', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})")
            out.extend(found)  # type: ignore[arg-type]
        elif p.is_file():
            k = kind(p)
            if k is None:
                raise DataError(f"{p}: unknown file type '{p.suffix}' (images: "
                                f"{', '.join(IMAGE_EXTENSIONS)}; videos: "
                                f"{', '.join(VIDEO_EXTENSIONS)})")
            out.append((p, k))
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (grey and alpha converted); DataError if
    unreadable. The decoder training data went through (:func:`clerf.data.mat.read_rgb_image`,
    PIL), so a model sees a photo's pixels as it saw its training images'."""
    from clerf.data.mat import read_rgb_image

    try:
        return read_rgb_image(path)
    except DataError as exc:
        raise DataError(f"{Path(path)}: cannot read this image (missing, empty, truncated or not "
                        f"an image: {exc})") from None


class FacePredictor:
    """Detector + protocol crop + model: the per-image step shared by images and videos.

    Args:
        model: a loaded :class:`PoseModel`.
        detector: finds faces.
        crop_preset: override of the model's preset (``clerf.data.crop`` names).
        mapping: detector box -> landmark box estimate (default: the detector's own).
        refine: passes that re-cut each face turned by the model's own in-plane estimate
            (:meth:`refine`; 0 = off).
    """

    def __init__(self, model: PoseModel, detector: FaceDetector, crop_preset: str | None = None,
                 mapping: BoxMapping | None = None, refine: int = 0) -> None:
        from clerf.data.crop import get_preset

        self.refine_passes = int(refine)
        self.model = model
        self.detector = detector
        try:
            self.preset = get_preset(crop_preset or model.crop_preset)
        except ValueError as exc:
            raise DataError(f"--crop: {exc}") from exc
        self.mapping = mapping or detector.box_mapping
        # A random training preset is represented by the middle of its range.
        self.k = 0.5 * (self.preset.k_low + self.preset.k_high)

    def crop_box(self, box: Box) -> tuple[int, int, int, int]:
        """Integer half-open ``(x0, y0, x1, y1)`` of the model input for one detection."""
        from clerf.data.crop import crop_box

        x0, y0, x1, y1 = landmark_box_from_detection(box, self.mapping)
        if self.preset.enabled:
            return crop_box((x0, y0, x1, y1), self.preset, self.k)
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
        return (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)),
                int(round(cy + half)))

    def crops(self, image: np.ndarray, boxes: Sequence[Box], source: str = "image"
              ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """Model inputs ``(n, 3, S, S)`` uint8 and their crop boxes.

        A rotated box (``box.angle != 0``) is cut in the face's own upright frame
        (:func:`clerf.inference.search.upright_crop`); its crop box is in that frame.
        """
        from clerf.data.crop import crop_image, resize_square
        from clerf.inference.search import upright_crop

        cbs = [self.crop_box(b) for b in boxes]
        for cb in cbs:
            if cb[2] <= cb[0] or cb[3] <= cb[1]:
                crop_image(image, cb, source)  # the DataError naming the source
        arr = [resize_square(upright_crop(image, b, cb), self.model.input_size,
                             self.model.resize_mode) for b, cb in zip(boxes, cbs, strict=True)]
        if not arr:
            return torch.zeros(0, 3, self.model.input_size, self.model.input_size,
                               dtype=torch.uint8), cbs
        return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous(), cbs

    def poses(self, image: np.ndarray, boxes: Sequence[Box], source: str = "image"
              ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """Rotations ``(n, 3, 3)`` float64 in the image's frame: the model's prediction on each
        upright crop composed back with the in-plane rule, ``R_crop @ Rz(box.angle)``
        (:func:`clerf.geometry.rotate_inplane`)."""
        x, cbs = self.crops(image, boxes, source)
        R = self.model.predict_rotations(x).double().cpu()
        angles = torch.tensor([float(b.angle) for b in boxes], dtype=torch.float64)
        return rotate_inplane(R, angles), cbs

    def refine(self, image: np.ndarray, boxes: Sequence[Box]) -> list[Box]:
        """Second pass: each box turned by the in-plane part of its first prediction
        (:func:`clerf.geometry.split_camera_inplane` of the crop's rotation), so the model sees
        the face roll-free."""
        from dataclasses import replace

        from clerf.geometry import wrap180

        x, _ = self.crops(image, boxes)
        R = self.model.predict_rotations(x).double().cpu()
        _, psi = split_camera_inplane(R)
        psi = torch.nan_to_num(psi, nan=0.0)  # no pose (the landmark baseline): keep the box
        return [replace(b, angle=wrap180(b.angle + float(p))) for b, p in zip(boxes, psi,
                                                                              strict=True)]

    def __call__(self, image: np.ndarray, source: str, frame: int | None = None,
                 boxes: Sequence[Box] | None = None) -> list[FacePose]:
        if boxes is None:
            boxes = self.detector.detect(image, source=source, frame=frame)
        if not boxes:
            return []
        if self.refine_passes:
            for _ in range(self.refine_passes):
                boxes = self.refine(image, boxes)
        R, cbs = self.poses(image, boxes, source)
        e = euler_from_rotation(R)
        return [FacePose(source, frame, i, b, cb, R[i].numpy(), float(e.pitch[i]),
                         float(e.yaw[i]), float(e.roll[i]))
                for i, (b, cb) in enumerate(zip(boxes, cbs, strict=True))]

    def describe(self) -> dict[str, Any]:
        return {"detector": self.detector.describe(), "crop_preset": self.preset.name,
                "k": self.k, "resize_mode": self.model.resize_mode,
                "input_size": self.model.input_size, "refine": self.refine_passes,
                "box_mapping": {"scale_x": self.mapping.scale_x, "scale_y": self.mapping.scale_y,
                                "shift_y": self.mapping.shift_y}}


def annotate(image: np.ndarray, faces: Iterable[FacePose]) -> np.ndarray:
    """A copy of ``image`` with each face's box, head axes and angles drawn."""
    import cv2

    from clerf.drawing import draw_axes

    out = np.ascontiguousarray(image).copy()
    for f in faces:
        b = f.box
        thick = max(1, round(min(out.shape[:2]) / 300))
        corners = cv2.boxPoints(((b.x + b.w / 2, b.y + b.h / 2), (b.w, b.h), float(b.angle)))
        cv2.polylines(out, [np.round(corners).astype(np.int32)], True, (255, 255, 255), thick,
                      cv2.LINE_AA)
        if np.isfinite(f.rotation).all():
            out = draw_axes(out, f.rotation, centre=(b.x + b.w / 2, b.y + b.h / 2),
                            size=0.6 * max(b.w, b.h), thickness=max(2, round(b.w / 60)))
            text = f"p {f.pitch:.0f} y {f.yaw:.0f} r {f.roll:.0f}"
        else:  # a predictor that can return nothing (the landmark baseline): NaN angles
            text = "no pose"
        scale = max(0.4, b.w / 250)
        org = (int(b.x), max(12, int(b.y) - 6))
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1,
                    cv2.LINE_AA)
    return out
