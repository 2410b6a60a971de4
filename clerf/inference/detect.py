"""Face detectors behind one small interface, and how a detector box becomes a protocol crop.

* :class:`FaceDetector`: ``detect(image) -> list[Box]`` on an ``(H, W, 3)`` uint8 RGB image.
* :class:`HaarDetector`: the weight-free default, OpenCV's bundled
  ``haarcascade_frontalface_default.xml`` (OpenCV 4.x wheels ship it; 5.x do not, hence the
  ``opencv-python-headless<5`` pin). Frontal and near-frontal faces only.
* :class:`BoxesDetector`: boxes given by the user (``--boxes boxes.json``).
* ``blazeface``: MediaPipe's BlazeFace CNN (:mod:`clerf.inference.blazeface`; optional,
  ``make detect-extra``).
* ``package.module:ClassName`` plugs in any other :class:`FaceDetector` subclass.

Detector box -> crop. Models are trained on the benchmark protocol crop, computed from the
**68-landmark box** (``clerf.data.crop``, ``docs/conventions.md`` section 6). A detector frames
a face differently, so :func:`landmark_box_from_detection` first maps its box to an estimate of
the landmark box, then the model's crop preset is applied to that estimate exactly as in
training (:func:`clerf.data.crop.crop_box`), with ``k`` = the preset's fixed value, or the middle
of its training range for a random preset (0.3 for ``hopenet_train``). The estimate is::

    centre = (x + w / 2, y + h / 2 + shift_y * h)
    size   = (scale_x * w, scale_y * h)

Each detector carries its mapping (:attr:`FaceDetector.box_mapping`):

* Haar (:data:`HAAR_MAPPING`): ``scale_x = 0.88, scale_y = 0.68, shift_y = 0.15``. OpenCV's
  frontal cascade box reaches well above the brows (it includes the forehead) and a little past
  the jaw line; on ``grace_hopper.jpg`` (box 155, 105, 222, 222) the landmark extremes read by
  eye are x 165-360 (jaw at ear level) and y 175-325 (brows to chin). One portrait, read by eye:
  an estimate, not a fit; override with ``--box-scale SX SY`` / ``--box-shift DY``.
* User boxes (``--boxes``): taken as landmark boxes (identity mapping), so a user who has
  landmarks reproduces the protocol crop exactly.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clerf.errors import ConfigError, DataError
from clerf.plugins import is_class_spec, load_class

__all__ = [
    "Box",
    "FaceDetector",
    "HaarDetector",
    "BoxesDetector",
    "BoxMapping",
    "HAAR_MAPPING",
    "build_detector",
    "NAMED_DETECTORS",
    "load_boxes",
    "landmark_box_from_detection",
]


@dataclass(frozen=True)
class Box:
    """A face box in pixels: top-left ``(x, y)``, size ``(w, h)``; ``score`` if the detector
    gives one (Haar: the cascade's level weight; user boxes: None).

    ``angle`` (degrees, clockwise on screen) makes it a rotated box: the face is turned by
    ``angle`` in the image, ``(x, y, w, h)`` is the box in the face's upright frame placed so
    that its centre is the face's centre in the image (:mod:`clerf.inference.search`).
    """

    x: float
    y: float
    w: float
    h: float
    score: float | None = None
    angle: float = 0.0

    def as_list(self) -> list[float]:
        return [float(self.x), float(self.y), float(self.w), float(self.h)]


@dataclass(frozen=True)
class BoxMapping:
    """Detector box -> estimated 68-landmark box (module docstring); identity by default."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    shift_y: float = 0.0

    def __post_init__(self) -> None:
        if self.scale_x <= 0 or self.scale_y <= 0:
            raise ConfigError(f"box scale must be > 0, got {self.scale_x}, {self.scale_y}")


#: OpenCV frontal Haar box -> 68-landmark box (estimated by eye on one portrait; see above)
HAAR_MAPPING = BoxMapping(scale_x=0.88, scale_y=0.68, shift_y=0.15)


class FaceDetector(ABC):
    """Finds faces in one RGB image."""

    #: name used in outputs
    name: str = "detector"
    #: how this detector's boxes relate to the 68-landmark box
    box_mapping: BoxMapping = BoxMapping()

    @abstractmethod
    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        """Faces in an ``(H, W, 3)`` uint8 RGB image, sorted left to right.

        ``source`` (the file name) and ``frame`` (video frame number) identify the image for
        detectors that look boxes up (:class:`BoxesDetector`).
        """

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class HaarDetector(FaceDetector):
    """OpenCV's frontal-face Haar cascade (no weights to download).

    Args:
        scale_factor, min_neighbors: ``detectMultiScale`` parameters (OpenCV's tutorial values).
        min_size: smallest face side in pixels.
        cascade: file name inside ``cv2.data.haarcascades`` or a path to another cascade.
    """

    name = "haar"
    box_mapping = HAAR_MAPPING

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 30,
                 cascade: str = "haarcascade_frontalface_default.xml") -> None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise ConfigError(
                "this OpenCV build has no Haar cascades (OpenCV 5 wheels dropped them); install "
                "opencv-python-headless<5 or pass --boxes"
            )
        path = Path(cascade) if Path(cascade).is_file() else Path(cv2.data.haarcascades) / cascade
        if not path.is_file():
            raise ConfigError(f"Haar cascade not found: {path}")
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ConfigError(f"cannot load the Haar cascade {path}")
        if scale_factor <= 1.0 or min_neighbors < 0 or min_size < 1:
            raise ConfigError("haar detector: need scale_factor > 1, min_neighbors >= 0, "
                              f"min_size >= 1 (got {scale_factor}, {min_neighbors}, {min_size})")
        self.scale_factor, self.min_neighbors = float(scale_factor), int(min_neighbors)
        self.min_size, self.cascade = int(min_size), path.name

    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        import cv2

        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        rects, _, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size), outputRejectLevels=True,
        )
        boxes = [Box(float(x), float(y), float(w), float(h), float(s))
                 for (x, y, w, h), s in zip(np.asarray(rects).reshape(-1, 4),
                                            np.asarray(weights).reshape(-1), strict=True)]
        return sorted(boxes, key=lambda b: (b.x, b.y))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "cascade": self.cascade, "scale_factor": self.scale_factor,
                "min_neighbors": self.min_neighbors, "min_size": self.min_size}


def load_boxes(path: str | Path) -> dict[str, Any]:
    """Read a boxes file: ``{"FILE": [[x, y, w, h], ...], ...}``.

    ``FILE`` is matched against an input's path as given, its resolved path, or its file name.
    For a video, the value may instead be ``{"FRAME": [[x, y, w, h], ...]}`` (frame numbers from
    0 as strings); a plain list applies to every frame.

    Raises:
        DataError: unreadable file, not JSON, or a box that is not four numbers with w, h > 0.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise DataError(f"--boxes: cannot read {p}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"--boxes: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise DataError(f"--boxes: {p} must map file names to lists of [x, y, w, h] boxes")

    def check(key: str, boxes: Any) -> list[list[float]]:
        if not isinstance(boxes, list):
            raise DataError(f"--boxes: {p}: entry '{key}' must be a list of [x, y, w, h] boxes")
        out = []
        for b in boxes:
            ok = (isinstance(b, list) and len(b) == 4
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b))
            if not ok or b[2] <= 0 or b[3] <= 0:
                raise DataError(f"--boxes: {p}: entry '{key}': {b!r} is not [x, y, w, h] with "
                                "w, h > 0")
            out.append([float(v) for v in b])
        return out

    result: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            frames = {}
            for fk, fv in value.items():
                if not str(fk).isdigit():
                    raise DataError(f"--boxes: {p}: entry '{key}': frame key '{fk}' is not a "
                                    "frame number")
                frames[int(fk)] = check(f"{key}/{fk}", fv)
            result[key] = frames
        else:
            result[key] = check(key, value)
    return result


class BoxesDetector(FaceDetector):
    """Boxes supplied by the user (:func:`load_boxes`); an image without an entry has no face."""

    name = "boxes"

    def __init__(self, boxes: Mapping[str, Any], source: str = "") -> None:
        self.boxes = dict(boxes)
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path) -> BoxesDetector:
        return cls(load_boxes(path), str(path))

    def _entry(self, source: str) -> Any:
        p = Path(source)
        for key in (source, str(p.resolve()) if source else "", p.name):
            if key and key in self.boxes:
                return self.boxes[key]
        return None

    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        entry = self._entry(source)
        if entry is None:
            return []
        if isinstance(entry, dict):
            entry = entry.get(int(frame or 0), [])
        return [Box(*b) for b in entry]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.source}


#: detectors known by name beyond ``haar``: the class each name stands for
NAMED_DETECTORS = {"blazeface": "clerf.inference.blazeface:BlazeFaceDetector"}


def build_detector(name: str = "haar", boxes: str | Path | None = None, **params: Any
                   ) -> FaceDetector:
    """``haar``, ``blazeface`` (MediaPipe, ``make detect-extra``), ``boxes`` (needs ``boxes``)
    or ``package.module:ClassName``."""
    if boxes is not None:
        return BoxesDetector.from_file(boxes)
    if name == "haar":
        return HaarDetector(**params)
    if name in NAMED_DETECTORS:  # by name, loaded as a plug-in (no import from here)
        return load_class(NAMED_DETECTORS[name], FaceDetector, "--detector")(**params)
    if is_class_spec(name):
        return load_class(name, FaceDetector, "--detector")(**params)
    raise ConfigError(f"unknown detector '{name}' (known: haar, blazeface, or "
                      "package.module:ClassName; user boxes with --boxes FILE)")


def landmark_box_from_detection(box: Box, mapping: BoxMapping = BoxMapping()
                                ) -> tuple[float, float, float, float]:
    """``(x_min, y_min, x_max, y_max)`` estimate of the landmark box of a detected face."""
    cx = box.x + box.w / 2.0
    cy = box.y + box.h / 2.0 + mapping.shift_y * box.h
    hw, hh = mapping.scale_x * box.w / 2.0, mapping.scale_y * box.h / 2.0
    return (cx - hw, cy - hh, cx + hw, cy + hh)
