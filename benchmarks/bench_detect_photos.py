"""Face search on scikit-image's photographs, per detector: faces found, extra and false faces,
angle error and time per image.

    .venv/bin/python benchmarks/bench_detect_photos.py --detectors blazeface haar

The photographs (shipped in scikit-image's wheel): the astronaut (resized to 512 x 512) turned
every 30 deg and the same mirrored (24 images; the face's turn is known for the unmirrored
ones), the camera man's profile turned by 0/90/180/270, and 15 photographs with no human face
(coffee, chelsea the cat, rocket, moon, brick, gravel, coins, horse, hubble_deep_field,
immunohistochemistry, page, text, clock, cell, grass). Each detector runs inside clerf's face
search as ``clerf predict`` runs it: ``haar`` at 15 deg steps with the profile cascade and the
eye/profile verification; ``blazeface`` at the four quarter turns, unverified.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

NO_FACE = ("coffee", "chelsea", "rocket", "moon", "brick", "gravel", "coins", "horse",
           "hubble_deep_field", "immunohistochemistry", "page", "text", "clock", "cell", "grass")


def photos() -> tuple[list[tuple[str, np.ndarray, float | None]], list[tuple[str, np.ndarray]]]:
    """``(faces, empty)``: ``(name, RGB image, known turn or None)`` and ``(name, RGB image)``."""
    import cv2
    from skimage import data

    from clerf.inference.search import turn_image

    ast = cv2.resize(data.astronaut(), (512, 512), interpolation=cv2.INTER_AREA)
    cam = np.stack([data.camera()] * 3, -1)
    faces = []
    for mirrored in (False, True):
        base = np.ascontiguousarray(ast[:, ::-1]) if mirrored else ast
        for a in range(0, 360, 30):
            name = f"astronaut{' mirrored' if mirrored else ''} {a}"
            faces.append((name, turn_image(base, float(a))[0], None if mirrored else float(a)))
    faces += [(f"camera {a}", turn_image(cam, float(a))[0], None) for a in (0, 90, 180, 270)]
    empty = []
    for name in NO_FACE:
        im = np.asarray(getattr(data, name)())
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        elif im.dtype != np.uint8:
            im = (im / im.max() * 255).astype(np.uint8)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        empty.append((name, np.ascontiguousarray(im[..., :3])))
    return faces, empty


def search_detector(name: str):
    from clerf.inference.detect import HaarDetector, build_detector
    from clerf.inference.search import RotationSearch, build_search_detector, search_angles

    if name == "haar":
        return build_search_detector(HaarDetector(), 15.0)
    base = build_detector(name)
    return RotationSearch(base, search_angles(getattr(base, "search_step", 90.0)), verify=False)


def measure(name: str) -> dict:
    det = search_detector(name)
    faces, empty = photos()
    missed, extra, times, err = [], 0, [], []
    for label, img, turn in faces:
        t = time.perf_counter()
        found = det.detect(img)
        times.append(time.perf_counter() - t)
        if not found:
            missed.append(label)
        extra += max(0, len(found) - 1)
        if found and turn is not None:
            best = max(found, key=lambda b: b.score or 0.0)
            err.append(abs((best.angle - turn + 180) % 360 - 180))
    false = {n: len(det.detect(img)) for n, img in empty}
    return {"detector": name, "found": len(faces) - len(missed), "faces": len(faces),
            "missed": missed, "extra": extra, "false": sum(false.values()),
            "false_on": {k: v for k, v in false.items() if v},
            "ms_per_512px": 1000 * float(np.median(times[:24])),
            "angle_err_median": float(np.median(err)) if err else float("nan"),
            "angle_err_max": float(max(err)) if err else float("nan")}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", nargs="+", default=["blazeface", "haar"])
    a = ap.parse_args(argv)
    import torch

    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, OpenCV threads as set by OMP")
    print("| detector | faces found | extra | false (no-face photos) | ms / 512 px image | "
          "angle error median / max (deg) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in a.detectors:
        r = measure(name)
        rows.append(r)
        false = f"{r['false']} ({', '.join(f'{k} {v}' for k, v in r['false_on'].items())})" \
            if r["false"] else "0"  # fmt: skip
        print(f"| {name} | {r['found']} / {r['faces']} | {r['extra']} | {false} | "
              f"{r['ms_per_512px']:.0f} | {r['angle_err_median']:.1f} / {r['angle_err_max']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
