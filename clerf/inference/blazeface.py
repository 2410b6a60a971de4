"""BlazeFace (MediaPipe's face detector, weights inside the ``mediapipe`` wheel) as a
:class:`clerf.inference.detect.FaceDetector`: ``clerf predict --detector blazeface``.

MediaPipe ships two BlazeFace models in its wheel: ``short`` (faces within about 2 m, the selfie
model) and ``full`` (up to about 5 m; the default here: on the photographs below its eye-line angle
was off by 3 deg (median) against the short model's 16 (both measured before the upright second
pass below), and the four turns of the search found each face once, where the short model's
duplicates escaped the NMS). Each detection has a box, a score and six keypoints (eyes, nose tip,
mouth centre, ear tragions). The in-plane angle of a face is read from its eyes (the line from the
subject's right eye to the left one), so a found face comes back as a rotated box
(:class:`clerf.inference.detect.Box`, ``angle``) even between the turns of the face search.
BlazeFace tolerates large in-plane turns (on scikit-image's astronaut turned every 15 deg, the
short model found the face up to 120 deg either way, the full one up to 60-90), so the search
(:class:`clerf.inference.search.RotationSearch`) needs only the four quarter turns.

Score threshold 0.75 (MediaPipe's default is 0.5): on scikit-image's photographs the true faces
scored 0.86 and more, and two false faces on ``hubble_deep_field`` 0.61 and 0.65; a clock face
(0.82) is still taken for a face. The threshold was chosen on those same photographs, which are
also the targets below: a measured setting, not a held-out figure.

Install (``make detect-extra``; why ``--no-deps`` and what was tested:
docs/evaluate_predict_export.md)::

    pip install --no-deps mediapipe==0.10.21 absl-py attrs flatbuffers

Box -> landmark box (:data:`BLAZEFACE_MAPPING`): BlazeFace's square box is about 9% wider than
the Haar box on the astronaut (104 against 95 px at 512 px, centred within 1 px). The mapping
makes the estimated 68-landmark box equal the Haar detector's estimate there (``HAAR_MAPPING``,
itself read by eye; the same to 0.01 at 384 px): an estimate of an estimate, documented as such.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clerf.errors import ConfigError
from clerf.inference.detect import Box, BoxMapping, FaceDetector

__all__ = ["BlazeFaceDetector", "BLAZEFACE_MAPPING", "MEDIAPIPE_VERSION_TESTED"]

#: the mediapipe release this detector was written and measured against (the last one whose
#: wheel ships the BlazeFace models under ``mediapipe.solutions``)
MEDIAPIPE_VERSION_TESTED = "0.10.21"
#: BlazeFace box -> estimated 68-landmark box (module docstring)
BLAZEFACE_MAPPING = BoxMapping(scale_x=0.80, scale_y=0.62, shift_y=0.08)
_MODELS = {"short": 0, "full": 1}


def _face_detection_module() -> Any:
    try:
        from mediapipe.python.solutions import face_detection
    except ImportError as exc:
        raise ConfigError(
            "detector 'blazeface' needs mediapipe, which is not installed: run `make "
            f"detect-extra` (pip install --no-deps mediapipe=={MEDIAPIPE_VERSION_TESTED} "
            f"absl-py attrs flatbuffers) [{exc}]"
        ) from None
    return face_detection


class BlazeFaceDetector(FaceDetector):
    """MediaPipe's BlazeFace.

    Args:
        model: ``full`` (default), ``short`` (the most tolerant of in-plane turns, a coarser
            eye line), or ``both`` (the two models' detections pooled).
        min_confidence: detections below this score are dropped (module docstring).
        upright_within: faces turned by more than this (deg, from the eye line) are detected
            again upright (:meth:`detect`).
    """

    name = "blazeface"
    box_mapping = BLAZEFACE_MAPPING
    #: in-plane turns (deg) the face search needs with this detector
    search_step = 90.0

    def __init__(self, model: str = "full", min_confidence: float = 0.75,
                 upright_within: float = 10.0) -> None:  # fmt: skip
        if model not in (*_MODELS, "both"):
            raise ConfigError(f"blazeface: model must be short, full or both, got {model!r}")
        if not 0.0 < float(min_confidence) < 1.0:
            raise ConfigError(f"blazeface: min_confidence must be in (0, 1), got "
                              f"{min_confidence}")  # fmt: skip
        fd = _face_detection_module()
        self.model, self.min_confidence = model, float(min_confidence)
        self.upright_within = float(upright_within)
        names = list(_MODELS) if model == "both" else [model]
        self._detectors = [fd.FaceDetection(model_selection=_MODELS[n],
                                            min_detection_confidence=self.min_confidence)
                           for n in names]  # fmt: skip

    def _raw(self, img: np.ndarray) -> list[Box]:
        h, w = img.shape[:2]
        boxes = []
        for det in self._detectors:
            for d in det.process(img).detections or []:
                box = _to_box(d, w, h)
                # MediaPipe applies its threshold before blending overlapping detections: the
                # blended score can end up below it, so the threshold is applied again here
                if box.score is None or box.score >= self.min_confidence:
                    boxes.append(box)
        return boxes

    def detect(self, image: np.ndarray, source: str = "", frame: int | None = None) -> list[Box]:
        """Faces as rotated boxes. A face turned by more than ``upright_within`` deg is
        detected again on the image turned so that the face is upright: BlazeFace's box
        shrinks and its keypoints drift on turned faces (the astronaut's box: 78 px upright,
        56 px at 45 deg), so the box and angle of that second pass are kept."""
        from clerf.inference.search import map_box_back, turn_image

        img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        out = []
        for b in self._raw(img):
            if abs(b.angle) > self.upright_within:
                turned, M = turn_image(img, -b.angle)
                c = M @ np.array([b.x + b.w / 2, b.y + b.h / 2, 1.0])
                near = [o for o in self._raw(turned)
                        if np.hypot(o.x + o.w / 2 - c[0], o.y + o.h / 2 - c[1]) < b.w / 2]
                if near:
                    b = map_box_back(max(near, key=lambda o: o.score or 0.0), M, -b.angle)
            out.append(b)
        return sorted(out, key=lambda b: (b.x, b.y))

    def close(self) -> None:
        for det in self._detectors:
            det.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "min_confidence": self.min_confidence,
                "upright_within": self.upright_within,
                "mediapipe_tested": MEDIAPIPE_VERSION_TESTED}


def _to_box(d: Any, w: int, h: int) -> Box:
    """A MediaPipe detection as a rotated :class:`Box` in pixels: the angle from the eye line
    (clockwise on screen), MediaPipe's box size, centred where its box is."""
    loc = d.location_data
    rb = loc.relative_bounding_box
    bw, bh = rb.width * w, rb.height * h
    cx, cy = (rb.xmin + rb.width / 2) * w, (rb.ymin + rb.height / 2) * h
    angle = 0.0
    kp = loc.relative_keypoints
    if len(kp) >= 2:
        # keypoint 0: the subject's right eye (image-left on a frontal face), 1: the left eye
        dx, dy = (kp[1].x - kp[0].x) * w, (kp[1].y - kp[0].y) * h
        if dx * dx + dy * dy > 0:
            angle = math.degrees(math.atan2(dy, dx))  # image y points down: clockwise positive
    score = float(d.score[0]) if len(d.score) else None
    return Box(float(cx - bw / 2), float(cy - bh / 2), float(bw), float(bh), score, angle)
