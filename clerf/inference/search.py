"""Faces at any in-plane angle and in profile: a rotation search around any detector.

Upright detectors (OpenCV's Haar cascades) find faces turned by at most ~15 deg. To find a face
at any in-plane angle, :class:`RotationSearch` turns the image by each angle of a search
(``0, step, 2 step, ...``, on a canvas large enough to lose no pixel), runs the wrapped detector,
maps every box back to the original image as a **rotated box**, merges duplicates found at
neighbouring angles with non-maximum suppression on rotated boxes
(``cv2.dnn.NMSBoxesRotated``), and keeps the angle at which each face was found.

A rotated box is a :class:`~clerf.inference.detect.Box` with ``angle`` set: ``(x, y, w, h)`` is
the box in the face's own upright frame, placed so that its centre is the face's centre in the
image, and ``angle`` is how far the face is turned in the image, degrees **clockwise on
screen** (``docs/conventions.md`` section 3). A face found after turning the image by ``alpha``
has ``angle = -alpha``. The model sees the upright crop (:func:`upright_crop`); its prediction
``R_crop`` is composed back with the in-plane rule of the geometry core,
``R = rotate_inplane(R_crop, angle) = R_crop @ Rz(angle)``.

The pixel turn is :func:`clerf.augment.affine_matrix` (the code that turns training images), so
the sign of the image turn and of the label rule come from one place.

Detectors and checks (all OpenCV 4.x cascades, no weights to download):

* :class:`ProfileHaarDetector`: ``haarcascade_profileface.xml`` on the image and on its mirror
  (the cascade knows one side only); boxes found on the mirror are mirrored back.
* :class:`UnionDetector`: several detectors (frontal + profile), duplicates merged.
* verification (:func:`is_face`): a candidate is kept only if the eye cascade finds two eyes in
  its upright crop, or the profile cascade confirms it at several small extra turns; this
  removes the cascades' false faces, which a search over many angles would otherwise multiply
  (measured: tests/test_search.py, docs/evaluate_predict_export.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from clerf.errors import ConfigError, UsageError
from clerf.geometry import wrap180
from clerf.inference.detect import HAAR_MAPPING, Box, FaceDetector, HaarDetector

__all__ = [
    "search_angles",
    "turn_matrix",
    "turn_image",
    "map_box_back",
    "nms_rotated",
    "upright_crop",
    "count_eyes",
    "profile_support",
    "is_face",
    "skin_fraction",
    "ProfileHaarDetector",
    "UnionDetector",
    "RotationSearch",
    "build_search_detector",
]


def search_angles(step: float, flag: str = "--angle-step") -> list[float]:
    """The image turns of a full search: ``0, step, ..., 360 - step`` (``step = 0``: ``[0]``).

    Raises:
        UsageError: ``step`` negative, above 180, or not dividing 360 into a whole number of
            steps (naming ``flag``).
    """
    step = float(step)
    if step == 0:
        return [0.0]
    n = 360.0 / step if step > 0 else -1
    if not (0 < step <= 180) or abs(n - round(n)) > 1e-9:
        raise UsageError(f"{flag} must be 0 (upright only) or divide 360 into whole steps "
                         f"(e.g. 10, 15, 20, 30, 45), got {step:g}")
    return [wrap180(i * step) for i in range(int(round(n)))]


def turn_matrix(angle: float) -> np.ndarray:
    """The 2 x 2 pixel matrix (x right, y down) that turns an image by ``angle`` degrees clockwise
    on screen: the linear part of :func:`clerf.augment.affine_matrix` (the training warp, built
    on :func:`clerf.geometry.inplane_image_matrix`), ``[[cos, -sin], [sin, cos]]``, as the
    training warp rounds it (float32)."""
    import torch

    from clerf.augment import GeometricParams, affine_matrix

    p = GeometricParams.identity(1)
    p.angle = torch.tensor([float(angle)], dtype=torch.float64)
    return affine_matrix(p, 1)[0, :, :2].double().numpy()


def turn_image(image: np.ndarray, angle: float, interpolation: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` turned by ``angle`` degrees clockwise on screen on a canvas that holds all of it.

    Returns:
        ``(turned, M)``: the new image (outside = black) and the ``2 x 3`` affine matrix that
        maps an original pixel ``(x, y, 1)`` to its place in ``turned`` (pixel centres at
        integers).
    """
    import cv2

    h, w = image.shape[:2]
    A = turn_matrix(angle)
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)
    cc = corners @ A.T
    lo, hi = np.floor(cc.min(0) + 1e-9), np.ceil(cc.max(0) - 1e-9)
    new_w, new_h = int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1
    M = np.concatenate([A, -lo[:, None]], axis=1)
    if abs(wrap180(angle)) < 1e-12:
        return np.ascontiguousarray(image), M
    flags = cv2.INTER_LINEAR if interpolation is None else interpolation
    out = cv2.warpAffine(np.ascontiguousarray(image), M, (new_w, new_h), flags=flags,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, M


def map_box_back(box: Box, M: np.ndarray, angle: float) -> Box:
    """A box found upright in ``turn_image(image, angle)`` as a rotated box of ``image``."""
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    A, t = M[:, :2], M[:, 2]
    ox, oy = np.linalg.solve(A, np.array([cx, cy]) - t)
    return replace(box, x=float(ox - box.w / 2.0), y=float(oy - box.h / 2.0),
                   angle=wrap180(box.angle - angle))


def _scale_box(b: Box, f: float) -> Box:
    # pixel centres at integers: a point x maps to (x + 0.5) * f - 0.5
    cx, cy = (b.x + b.w / 2 + 0.5) * f - 0.5, (b.y + b.h / 2 + 0.5) * f - 0.5
    return replace(b, x=cx - b.w * f / 2, y=cy - b.h * f / 2, w=b.w * f, h=b.h * f)


def _cluster_angle(kept: Box, found: Sequence[Box]) -> Box:
    """``kept`` with its angle replaced by the circular mean of the angles of the detections of
    the same face (centre within 0.3 of its size, size within a factor 1.5): a face between two
    search angles is found at both, and their mean is closer to its own angle."""
    cx, cy = kept.x + kept.w / 2, kept.y + kept.h / 2
    angles = [b.angle for b in found
              if math.hypot(b.x + b.w / 2 - cx, b.y + b.h / 2 - cy) < 0.3 * kept.w
              and 1 / 1.5 <= b.w / kept.w <= 1.5]
    if len(angles) < 2:
        return kept
    r = np.radians(angles)
    return replace(kept, angle=wrap180(math.degrees(math.atan2(np.sin(r).mean(),
                                                               np.cos(r).mean()))))


def _cv_rotated(b: Box) -> tuple[tuple[float, float], tuple[float, float], float]:
    # OpenCV's RotatedRect angle is clockwise in image coordinates (y down), as ours.
    return ((b.x + b.w / 2.0, b.y + b.h / 2.0), (b.w, b.h), float(b.angle))


def nms_rotated(boxes: Sequence[Box], iou: float = 0.3) -> list[Box]:
    """Non-maximum suppression on rotated boxes (``cv2.dnn.NMSBoxesRotated``), best score
    first; boxes without a score count as 0."""
    import cv2

    if len(boxes) <= 1:
        return list(boxes)
    rects = [_cv_rotated(b) for b in boxes]
    scores = np.array([float(b.score) if b.score is not None else 0.0 for b in boxes])
    scores = (scores - scores.min() + 1.0).tolist()  # OpenCV wants scores above a threshold >= 0
    keep = cv2.dnn.NMSBoxesRotated(rects, scores, 0.0, float(iou))
    return [boxes[int(i)] for i in np.asarray(keep).reshape(-1)]


def upright_crop(image: np.ndarray, box: Box, crop: tuple[int, int, int, int],
                 interpolation: int | None = None) -> np.ndarray:
    """The half-open crop ``(x0, y0, x1, y1)``, given in the upright frame of ``box`` (same
    coordinates as ``box.x``, ``box.y``), cut from ``image`` turned upright about the box centre;
    outside = black. For ``box.angle == 0`` this is :func:`clerf.data.crop.crop_image`."""
    import cv2

    from clerf.data.crop import crop_image

    if box.angle == 0:
        return crop_image(image, crop)
    x0, y0, x1, y1 = (int(v) for v in crop)
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    A = turn_matrix(box.angle)  # the upright crop turned by box.angle is the image
    # destination pixel (u, v) -> upright point q = (x0 + u, y0 + v) -> image c + A (q - c)
    src = np.empty((2, 3))
    src[:, :2] = A
    src[:, 2] = np.array([cx, cy]) + A @ (np.array([x0, y0], dtype=np.float64)
                                          - np.array([cx, cy]))
    flags = (cv2.INTER_LINEAR if interpolation is None else interpolation) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(np.ascontiguousarray(image), src, (x1 - x0, y1 - y0), flags=flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class ProfileHaarDetector(FaceDetector):
    """OpenCV's profile cascade on the image and on its mirror (the cascade finds faces that
    look toward the image's left only); boxes from the mirror are mirrored back."""

    name = "haar_profile"
    box_mapping = HAAR_MAPPING

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 30
                 ) -> None:
        self._haar = HaarDetector(scale_factor, min_neighbors, min_size,
                                  cascade="haarcascade_profileface.xml")

    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        w = image.shape[1]
        found = list(self._haar.detect(image))
        for b in self._haar.detect(np.ascontiguousarray(image[:, ::-1])):
            found.append(replace(b, x=float(w - b.x - b.w)))
        return sorted(found, key=lambda b: (b.x, b.y))

    def describe(self) -> dict[str, Any]:
        return {**self._haar.describe(), "name": self.name, "mirrored": True}


class UnionDetector(FaceDetector):
    """The faces of several detectors, duplicates merged (:func:`nms_rotated`); the mapping to
    the landmark box is the first detector's."""

    name = "union"

    def __init__(self, detectors: Sequence[FaceDetector], iou: float = 0.3) -> None:
        if not detectors:
            raise ConfigError("union detector: give at least one detector")
        self.detectors = list(detectors)
        self.iou = float(iou)
        self.box_mapping = self.detectors[0].box_mapping

    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        boxes = [b for d in self.detectors for b in d.detect(image, source, frame)]
        return sorted(nms_rotated(boxes, self.iou), key=lambda b: (b.x, b.y))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "detectors": [d.describe() for d in self.detectors]}


_CASCADES: dict[str, Any] = {}


def _cascade(name: str) -> Any:
    import cv2

    if name not in _CASCADES:
        _CASCADES[name] = cv2.CascadeClassifier(str(cv2.data.haarcascades) + name)
    return _CASCADES[name]


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def count_eyes(image: np.ndarray, box: Box, min_neighbors: int = 3) -> int:
    """Eyes found by OpenCV's eye cascades (plain and with glasses) in the upper 60 % of the
    box's upright crop (scaled to 240 px wide): 2 when
    two of them form a plausible pair (side by side: vertical offset under 0.12 of the box,
    horizontal distance 0.2 - 0.65 of it, sizes within a factor 1.6), else 0 or 1."""
    import cv2

    x0, y0 = int(round(box.x)), int(round(box.y))
    crop = upright_crop(image, box, (x0, y0, x0 + int(round(box.w)),
                                     y0 + int(round(0.6 * box.h))))
    w = 240.0  # the crop at a fixed scale: the eye cascade is unreliable on small eyes
    crop = cv2.resize(crop, (240, max(1, round(240 * crop.shape[0] / crop.shape[1]))),
                      interpolation=cv2.INTER_LINEAR)
    side, big = 24, 80
    eyes = np.concatenate([np.asarray(_cascade(name).detectMultiScale(
        _gray(crop), 1.1, min_neighbors, minSize=(side, side), maxSize=(big, big))
    ).reshape(-1, 4).astype(np.float64) for name in ("haarcascade_eye.xml",
                                                     "haarcascade_eye_tree_eyeglasses.xml")])
    for i in range(len(eyes)):
        for j in range(i + 1, len(eyes)):
            (xa, ya, sa, _), (xb, yb, sb, _) = eyes[i], eyes[j]
            dx = abs((xa + sa / 2) - (xb + sb / 2))
            dy = abs((ya + sa / 2) - (yb + sb / 2))
            if dy < 0.12 * w and 0.2 * w < dx < 0.65 * w and max(sa, sb) < 1.6 * min(sa, sb):
                return 2
    return min(len(eyes), 1)


def profile_support(image: np.ndarray, box: Box,
                    offsets: Sequence[float] = (-15, -10, -5, 0, 5, 10, 15),
                    min_neighbors: int = 5, cascade: str = "haarcascade_profileface.xml",
                    mirror: bool = True) -> int:
    """At how many of the small extra turns ``offsets`` the profile cascade (image or mirror)
    finds a face near the box centre in its upright crop (1.6 x the box, for context)."""
    from clerf.data.crop import resize_square

    cx, cy, side = box.x + box.w / 2, box.y + box.h / 2, 1.6 * max(box.w, box.h)
    n = 0
    for off in offsets:
        b = replace(box, angle=box.angle + off)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        crop = upright_crop(image, b, (x0, y0, x0 + int(round(side)), y0 + int(round(side))))
        crop = _gray(resize_square(np.ascontiguousarray(crop), 160, "stretch")
                     if crop.ndim == 3 else crop)
        hit = False
        for g in (crop, np.ascontiguousarray(crop[:, ::-1])) if mirror else (crop,):
            for x, y, w, h in np.asarray(_cascade(cascade).detectMultiScale(
                    g, 1.1, min_neighbors, minSize=(60, 60))).reshape(-1, 4):
                hit |= abs(x + w / 2 - 80) < 25 and abs(y + h / 2 - 80) < 25
        n += hit
    return n


def skin_fraction(image: np.ndarray, box: Box) -> float:
    """Share of skin-coloured pixels (YCrCb: Cr 133-173, Cb 77-127, a common rule) in the
    central half of the box's upright crop."""
    import cv2

    x0, y0 = int(round(box.x + 0.25 * box.w)), int(round(box.y + 0.25 * box.h))
    c = upright_crop(image, box, (x0, y0, x0 + max(1, int(round(0.5 * box.w))),
                                  y0 + max(1, int(round(0.5 * box.h)))))
    ycc = cv2.cvtColor(np.ascontiguousarray(c), cv2.COLOR_RGB2YCrCb)
    m = (ycc[..., 1] >= 133) & (ycc[..., 1] <= 173) & (ycc[..., 2] >= 77) & (ycc[..., 2] <= 127)
    return float(m.mean())


def is_grey(image: np.ndarray) -> bool:
    """Whether a photo is (nearly) grey: its channels differ by under 2 levels on average."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    sub = image[::4, ::4].astype(np.int16)
    return float(np.abs(sub - sub.mean(axis=2, keepdims=True)).mean()) < 2.0


def is_face(image: np.ndarray, box: Box) -> bool:
    """The verification of a candidate (figures in docs/evaluate_predict_export.md): a frontal
    face shows a pair of eyes in its upright crop (:func:`count_eyes`) **and** the frontal
    cascade fires again on that crop at >= 5 of 7 small extra turns; a profile face (one eye,
    which the eye cascade rarely finds) needs the profile cascade at >= 5 of 7 such turns
    (:func:`profile_support`). In a colour photo, at least 40 % of the central half of the box
    must also be skin-coloured (:func:`skin_fraction`; grey photos skip this)."""
    if not is_grey(image) and skin_fraction(image, box) < 0.4:
        return False
    if count_eyes(image, box) >= 2 and profile_support(
            image, box, cascade="haarcascade_frontalface_default.xml", mirror=False) >= 5:
        return True
    return profile_support(image, box) >= 5


def _drop_enclosing(boxes: Sequence[Box]) -> list[Box]:
    """Drop a box that holds the centre of a face less than half its size (a cascade often
    also fires on a large window around a face), or whose centre lies inside a box with a
    higher score (the same face found again at a distant angle)."""
    out = []
    for b in boxes:
        A = turn_matrix(b.angle)
        c = np.array([b.x + b.w / 2, b.y + b.h / 2])
        inner = False
        for o in boxes:
            if o is b:
                continue
            if o.w * 1.8 <= b.w:
                u = A.T @ (np.array([o.x + o.w / 2, o.y + o.h / 2]) - c)  # in b's frame
                inner |= abs(u[0]) < b.w / 2 and abs(u[1]) < b.h / 2
            if (o.score or 0.0) > (b.score or 0.0):  # b's centre inside a better face
                u = turn_matrix(o.angle).T @ (c - np.array([o.x + o.w / 2, o.y + o.h / 2]))
                inner |= abs(u[0]) < o.w / 2 and abs(u[1]) < o.h / 2
        if not inner:
            out.append(b)
    return out


class RotationSearch(FaceDetector):
    """Any :class:`FaceDetector` run on turned copies of the image (module docstring).

    Args:
        base: the detector to run upright on each turned copy.
        angles: image turns to try, degrees clockwise (:func:`search_angles`).
        iou: NMS overlap above which two rotated boxes are one face.
        verify: keep only candidates that pass :func:`is_face`.
        track_range: for videos, degrees either side of a previous face's angle searched first
            (:meth:`detect_near`).
        max_side: the search runs on a copy scaled down so that its longer side is at most
            this many pixels (0 = full size); boxes are scaled back. Verification runs on the
            full image.
    """

    name = "rotation_search"

    def __init__(self, base: FaceDetector, angles: Sequence[float] = (0.0,), iou: float = 0.3,
                 verify: bool = True, track_range: float = 30.0, max_side: int = 0) -> None:
        if not angles:
            raise ConfigError("rotation search: give at least one angle")
        self.base = base
        self.angles = [wrap180(a) for a in angles]
        self.iou = float(iou)
        self.verify = bool(verify)
        self.track_range = float(track_range)
        if max_side < 0:
            raise ConfigError(f"rotation search: max_side must be >= 0, got {max_side}")
        self.max_side = int(max_side)
        self.box_mapping = base.box_mapping
        self.step = (min(abs(wrap180(b - a)) for a, b in zip(self.angles[:-1], self.angles[1:],
                                                                strict=True))
                     if len(self.angles) > 1 else 0.0)
        self.last_angles_tried = 0

    def _search(self, image: np.ndarray, angles: Sequence[float], source: str,
                frame: int | None) -> list[Box]:
        import cv2

        found: list[Box] = []
        f = 1.0
        work = image
        if self.max_side and max(image.shape[:2]) > self.max_side:
            f = self.max_side / max(image.shape[:2])
            work = cv2.resize(image, (max(1, round(image.shape[1] * f)),
                                      max(1, round(image.shape[0] * f))),
                              interpolation=cv2.INTER_AREA)
        for a in angles:
            turned, M = turn_image(work, a)
            found.extend(map_box_back(b, M, a) for b in self.base.detect(turned, source, frame))
        if f != 1.0:
            found = [_scale_box(b, 1.0 / f) for b in found]
        self.last_angles_tried = len(angles)
        kept = [_cluster_angle(k, found) for k in nms_rotated(found, self.iou)]
        if self.verify:
            kept = _drop_enclosing([b for b in kept if is_face(image, b)])
        return sorted(kept, key=lambda b: (b.x, b.y))

    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        return self._search(image, self.angles, source, frame)

    def detect_near(self, image: np.ndarray, previous: Sequence[Box], source: str = "",
                    frame: int | None = None) -> list[Box]:
        """Video tracking: search only the turns within ``track_range`` of the previous frame's
        face angles; the full search when that finds nothing (or there was no face)."""
        if previous and self.step > 0:
            near = sorted({a for a in self.angles for b in previous
                           if abs(wrap180(a + b.angle)) <= self.track_range + 1e-9})
            found = self._search(image, near, source, frame) if near else []
            if found:
                return found
        return self.detect(image, source, frame)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.describe(), "angle_step": self.step,
                "angles": len(self.angles), "max_side": self.max_side, "nms_iou": self.iou,
                "verify": self.verify,
                "track_range": self.track_range}


def build_search_detector(base: FaceDetector, angle_step: float = 15.0, profile: bool = True,
                          verify: bool = True, max_side: int = 0) -> FaceDetector:
    """The detector of ``clerf predict``: ``base`` (plus the mirrored profile cascade when
    ``profile`` and ``base`` is the Haar cascade) searched over :func:`search_angles`."""
    angles = search_angles(angle_step)
    if profile and isinstance(base, HaarDetector):
        base = UnionDetector([base, ProfileHaarDetector()])
    return RotationSearch(base, angles, verify=verify, max_side=max_side)
