"""Benchmark of face detection at any in-plane angle: cost and detection rate per angle step.

    .venv/bin/python benchmarks/bench_detect.py [--steps 0 90 45 30 15] [--test-step 15]
        [--max-side 0] [--repeats 2] [--frames 12]

The image is scikit-image's ``astronaut`` portrait (a real photograph shipped in the wheel),
resized to 480 x 480 and padded to 640 x 480. For each search step of
:class:`clerf.inference.search.RotationSearch` (frontal + mirrored profile Haar cascades, eye /
profile verification, as ``clerf predict`` runs it) it reports:

* milliseconds per 640 x 480 image (the upright image, mean of ``--repeats`` runs);
* the detection rate over the image turned by every ``--test-step`` degrees from
  ``--test-offset`` (the face counts as
  found when a detection's centre lies within a quarter of the face size of the true centre,
  mapped through the known turn, and its angle is within ``step / 2 + 20`` deg of the turn);
* false faces per image over the same turns (detections away from the face).

Video: a clip of ``--frames`` frames in which the portrait turns 5 deg per frame, detected with
the full search on every frame and with the previous frame's faces searched first
(:meth:`RotationSearch.detect_near`), in frames per second (detection only).

Timings on a shared machine are noisy; the figures say what they are measured on.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def test_image() -> tuple[np.ndarray, tuple[float, float, float]]:
    """640 x 480 RGB and the face's centre and size in it (the upright Haar box, scaled)."""
    import cv2
    from skimage import data

    img = cv2.resize(data.astronaut(), (480, 480), interpolation=cv2.INTER_AREA)
    out = np.full((480, 640, 3), 110, np.uint8)
    out[:, 80:560] = img
    # astronaut's upright frontal Haar box (177, 66, 95, 95) in the 512 px original
    f = 480 / 512
    return out, (80 + (177 + 47.5) * f, (66 + 47.5) * f, 95 * f)


def found(boxes, centre, size, turn, step) -> tuple[bool, int]:
    """Whether the face is among ``boxes``, and how many other boxes there are."""
    from clerf.geometry import wrap180

    hit, other = False, 0
    tol = step / 2 + 20 if step else 20
    for b in boxes:
        cx, cy = b.x + b.w / 2, b.y + b.h / 2
        near = np.hypot(cx - centre[0], cy - centre[1]) < size / 4
        if near and abs(wrap180(b.angle - turn)) <= tol:
            hit = True
        elif not near:
            other += 1
    return hit, other


def main(argv: list[str] | None = None) -> dict:
    import cv2

    from clerf.inference.detect import HaarDetector
    from clerf.inference.search import build_search_detector, turn_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=float, nargs="+", default=[0, 90, 45, 30, 15])
    ap.add_argument("--test-step", type=float, default=15.0)
    ap.add_argument("--test-offset", type=float, default=0.0,
                    help="first turn of the test (e.g. half a search step: the worst case)")
    ap.add_argument("--max-side", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--frames", type=int, default=12)
    o = ap.parse_args(argv)
    cv2.setNumThreads(1)
    image, (fx, fy, fs) = test_image()
    turns = [float(t) for t in np.arange(0, 360, o.test_step) + o.test_offset]
    rows = []
    for step in o.steps:
        det = build_search_detector(HaarDetector(), step, max_side=o.max_side)
        det.detect(image[:120, :160])  # load the cascades before timing
        t0 = time.perf_counter()
        for _ in range(o.repeats):
            det.detect(image)
        ms = 1000 * (time.perf_counter() - t0) / o.repeats
        hits, false = 0, 0
        for t in turns:
            turned, M = turn_image(image, t)
            c = M[:, :2] @ np.array([fx, fy]) + M[:, 2]
            h, f = found(det.detect(turned), c, fs, t, step)
            hits += h
            false += f
        rows.append({"step": step, "ms": ms, "rate": hits / len(turns),
                     "false_per_image": false / len(turns)})
        print(f"step {step:g} deg: {ms:.0f} ms per 640x480 image, face found at "
              f"{hits}/{len(turns)} turns, {false} false face(s)", flush=True)
    # video: the portrait turning 5 deg per frame
    step = 15.0
    det = build_search_detector(HaarDetector(), step, max_side=o.max_side)
    det.detect(image[:120, :160])
    frames = [cv2.warpAffine(image, cv2.getRotationMatrix2D((320, 240), -5.0 * k, 1.0),
                             (640, 480)) for k in range(o.frames)]
    t0 = time.perf_counter()
    for f in frames:
        det.detect(f)
    full_fps = len(frames) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    prev: list = []
    tracked_hits = 0
    for f in frames:
        prev = det.detect_near(f, prev)
        tracked_hits += bool(prev)
    tracked_fps = len(frames) / (time.perf_counter() - t0)
    print(f"video, step {step:g}: {full_fps:.2f} fps full search, {tracked_fps:.2f} fps "
          f"tracked (faces in {tracked_hits}/{len(frames)} frames)")
    return {"rows": rows, "turns": len(turns), "video_full_fps": full_fps,
            "video_tracked_fps": tracked_fps, "video_frames": len(frames),
            "video_tracked_hits": tracked_hits, "max_side": o.max_side}


if __name__ == "__main__":
    main()
