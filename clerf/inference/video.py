"""Video files through the face predictor, frame by frame (OpenCV ``VideoCapture``/``Writer``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from clerf.errors import DataError
from clerf.inference.predict import FacePose, FacePredictor, annotate

__all__ = ["predict_video", "read_frames"]


def read_frames(path: str | Path, max_frames: int = 0):
    """Yield ``(frame_number, RGB uint8 (H, W, 3))`` from frame 0 (at most ``max_frames`` if > 0).

    Raises:
        DataError: the file cannot be opened as a video.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DataError(f"{path}: cannot open this video (missing codec, truncated or not a "
                        "video)")
    try:
        k = 0
        while max_frames <= 0 or k < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            yield k, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            k += 1
    finally:
        cap.release()


def _fps(path: str | Path) -> float:
    import cv2

    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    cap.release()
    return fps if fps and np.isfinite(fps) and fps > 0 else 25.0


def _smoothed(found: list[FacePose], filters: dict[int, Any], rate: float,
              smooth: dict[str, float]) -> list[FacePose]:  # fmt: skip
    """The faces of one frame with their rotations One-Euro filtered (per face index)."""
    import dataclasses

    import torch

    from clerf.geometry import euler_from_rotation
    from clerf.inference.smoothing import OneEuroSO3

    for gone in set(filters) - {f.face for f in found}:
        filters.pop(gone)
    out = []
    for f in found:
        flt = filters.setdefault(f.face, OneEuroSO3(rate, **smooth))
        R = flt(f.rotation)
        e = euler_from_rotation(torch.as_tensor(R)[None])
        out.append(dataclasses.replace(f, rotation=R, pitch=float(e.pitch[0]),
                                       yaw=float(e.yaw[0]), roll=float(e.roll[0])))
    return out


def predict_video(
    predictor: FacePredictor, path: str | Path, out_video: str | Path | None = None,
    max_frames: int = 0, smooth: dict[str, float] | None = None,
) -> tuple[list[FacePose], int]:
    """Faces of every frame (``frame`` set on each :class:`FacePose`) and the frame count.

    A detector with ``detect_near`` (:class:`clerf.inference.search.RotationSearch`) searches
    the turns near the previous frame's faces first and the full search only when that finds
    nothing, so a video does not pay the full angle search on every frame.

    With ``smooth`` (``{"min_cutoff": Hz, "beta": per deg/s}``) each face's rotation (faces
    matched by their index in the frame, left to right) goes through a One-Euro filter on SO(3)
    (:class:`clerf.inference.smoothing.OneEuroSO3`, at the video's frame rate); a face index
    missing from a frame restarts its filter. Off by default.

    With ``out_video`` the annotated frames are written as MP4 (``mp4v``) at the input's frame
    rate; the file is written under a temporary name and renamed when complete.

    Raises:
        DataError: the video cannot be opened, has no frames, or the output cannot be written.
    """
    import cv2

    writer = None
    tmp = None
    faces: list[FacePose] = []
    n = 0
    ok = False
    try:
        track = getattr(predictor.detector, "detect_near", None)
        previous: list = []
        filters: dict[int, Any] = {}
        rate = _fps(path)
        for k, frame in read_frames(path, max_frames):
            boxes = None
            if track is not None:  # search near the previous frame's faces first
                boxes = track(frame, previous, str(path), k)
                previous = boxes
            found = predictor(frame, str(path), frame=k, boxes=boxes)
            if smooth is not None:
                found = _smoothed(found, filters, rate, smooth)
            faces.extend(found)
            n += 1
            if out_video is not None:
                if writer is None:
                    tmp = Path(out_video).with_name(f".{Path(out_video).stem}.tmp{os.getpid()}.mp4")
                    h, w = frame.shape[:2]
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"),
                                             _fps(path), (w, h))
                    if not writer.isOpened():
                        raise DataError(f"{out_video}: cannot write an MP4 video here")
                writer.write(cv2.cvtColor(annotate(frame, found), cv2.COLOR_RGB2BGR))
        if n == 0:
            raise DataError(f"{path}: the video has no readable frames")
        ok = True
    finally:
        if writer is not None:
            writer.release()
        if not ok and tmp is not None and tmp.exists():
            tmp.unlink()  # never leave a partial video behind
    if tmp is not None:
        os.replace(tmp, out_video)
    return faces, n
