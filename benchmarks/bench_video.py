"""Video: per-frame error, jitter and frames per second of ``clerf predict`` on a synthetic clip,
with and without the One-Euro smoothing on SO(3).

    .venv/bin/python benchmarks/bench_video.py MODEL [--frames 90] [--fps 30] \
        [--min-cutoff 1.0] [--beta 0.01]

The clip: one procedural head (the weight-free generator, so the truth is known) turning along
a smooth known trajectory (yaw swinging +-60 deg, pitch +-20 deg, roll +-30 deg over the clip),
rendered at 256 px into a 384 x 384 frame and written as MP4 with OpenCV. Real-face detectors
may not fire on renders, so every frame's box is given (``--boxes``, as a tracker seeded on a
key frame would give it). For each setting it reports the mean geodesic error to the truth,
the jitter (:func:`jitter`: how far each frame's estimate is from a steady turn through the two
before it; the truth's own is printed beside it) and the frames per second of the whole
``clerf predict`` run (decode, crop, model, outputs).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def trajectory(n: int) -> np.ndarray:
    """``(n, 3, 3)`` float64 rotations of the clip (clerf's convention)."""
    import torch

    from clerf.geometry import rotation_from_euler

    t = torch.linspace(0, 1, n, dtype=torch.float64)
    yaw = 60 * torch.sin(2 * math.pi * t)
    pitch = 20 * torch.sin(4 * math.pi * t)
    roll = 30 * torch.sin(2 * math.pi * t + 1.0)
    return rotation_from_euler(pitch, yaw, roll).numpy()


def write_clip(path: Path, R: np.ndarray, fps: float, size: int = 384, head: int = 256) -> list:
    """Render and write the clip; returns the head's box ``[[x, y, w, h]]`` (every frame)."""
    import cv2
    import torch

    from generators.procedural import ProceduralHead

    gen = ProceduralHead(seed=0)
    imgs = gen.render(torch.zeros(len(R), dtype=torch.long), torch.as_tensor(R).float(),
                      head).images.permute(0, 2, 3, 1).numpy()  # fmt: skip
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    o = (size - head) // 2
    for img in imgs:
        frame = np.full((size, size, 3), 90, np.uint8)
        frame[o:o + head, o:o + head] = img
        w.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    w.release()
    return [[o, o, head, head]]


def run_predict(model: str, clip: Path, boxes: Path, out: Path, smooth: list[str]) -> tuple:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "clerf", "predict", model, str(clip), "--out",
                        str(out), "--boxes", str(boxes), "--crop", "none", "--no-annotate",
                        "--device", "cpu", *smooth], cwd=REPO, capture_output=True,
                       text=True)  # fmt: skip
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"bench_video: clerf predict failed: {r.stderr.strip()[-500:]}")
    rec = json.loads((out / "predictions.json").read_text())
    faces = sorted(rec["faces"], key=lambda f: f["frame"])
    return np.array([f["rotation"] for f in faces], dtype=np.float64), rec["inputs"][0], wall


def jitter(R) -> float:
    """Mean deviation (deg) of each frame from where constant angular velocity would have put
    it: ``geodesic(R[k+1], R[k] R[k-1]^T R[k])``. Zero for a steady turn, whatever its speed."""
    import torch

    from clerf.geometry import geodesic_distance

    R = torch.as_tensor(R)
    pred = R[1:-1] @ R[:-2].transpose(-1, -2) @ R[1:-1]
    return float(geodesic_distance(R[2:], pred).mean())


def figures(est: np.ndarray, R: np.ndarray) -> dict:
    import torch

    from clerf.geometry import geodesic_distance

    err = geodesic_distance(torch.as_tensor(est), torch.as_tensor(R))
    return {"error_deg": float(err.mean()), "jitter_deg": jitter(est),
            "truth_jitter_deg": jitter(R)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a saved model directory (e.g. runs/full_range_cpu/model)")
    ap.add_argument("--frames", type=int, default=90)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--min-cutoff", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.01)
    a = ap.parse_args(argv)
    R = trajectory(a.frames)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        clip = tmp_p / "clip.mp4"
        boxes = write_clip(clip, R, a.fps)
        (tmp_p / "boxes.json").write_text(json.dumps({"clip.mp4": boxes}))
        for name, flags in (("raw", []), ("smoothed", ["--smooth", "--smooth-min-cutoff",
                                                       str(a.min_cutoff), "--smooth-beta",
                                                       str(a.beta)])):  # fmt: skip
            est, rec, wall = run_predict(a.model, clip, tmp_p / "boxes.json", tmp_p / name, flags)
            out[name] = {**figures(est, R), "fps": float(rec.get("fps", 0.0)),
                         "frames": len(est), "wall_s": wall}
    print(f"{a.frames} frames at {a.fps:g} fps, model {a.model}; One-Euro min_cutoff "
          f"{a.min_cutoff} Hz, beta {a.beta}")
    print(f"the truth's own jitter: {out['raw']['truth_jitter_deg']:.3f} deg")
    print("| setting | error to the truth (deg) | jitter (deg / frame) | frames per second |")
    print("|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['error_deg']:.2f} | {r['jitter_deg']:.2f} | {r['fps']:.1f} |")
    return out


if __name__ == "__main__":
    main()
