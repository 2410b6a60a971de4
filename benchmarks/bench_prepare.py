"""Conversion throughput of ``clerf prepare`` (images/s) on a generated 300W-LP-like tree.

Writes ``--n`` 450 x 450 JPEGs (the real 300W-LP size) with ``.mat`` labels in the 300W-LP
layout (``tests/fixtures_data.py`` writers), then times the whole stage (scan + decode check +
crop + resize + HDF5 write) for each resolution and worker count asked for.

    .venv/bin/python benchmarks/bench_prepare.py --n 400 --resolutions 64 128 --workers 0 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture writers

import numpy as np  # noqa: E402
from fixtures_data import W300LP_ALL, face_image, landmarks_in_box, write_pose_mat  # noqa: E402


def make_tree(root: Path, n: int, size: int = 450) -> None:
    import cv2

    rng = np.random.default_rng(0)
    per = -(-n // len(W300LP_ALL))
    for si, subset in enumerate(W300LP_ALL):
        d = root / subset
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            if si * per + i >= n:
                break
            x0, y0 = rng.uniform(120, 170, 2)
            w, h = rng.uniform(130, 180, 2)
            pts = landmarks_in_box(x0, y0, x0 + w, y0 + h, seed=i)
            img = face_image(size, size, seed=si * 1000 + i)
            noise = rng.integers(0, 40, img.shape, dtype=np.uint8)  # realistic JPEG sizes
            cv2.imwrite(str(d / f"{subset}_{i}_1_0.jpg"), img + noise,
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
            write_pose_mat(d / f"{subset}_{i}_1_0.mat", *rng.uniform(-60, 60, 3), pt2d=pts)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line); print it and return the figures:
    ``{"n", "threads", "scan_img_s", "rows": [{"px", "workers", "img_s", "seconds"}]}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)

    import torch

    from clerf.config import load_config
    from clerf.data import open_dataset
    from clerf.data.prepare import run_prepare

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "300W_LP"
        t = time.perf_counter()
        make_tree(root, args.n)
        print(f"fixture: {args.n} JPEGs 450x450 written in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        ds = open_dataset("300wlp", root)
        scan = time.perf_counter() - t
        print(f"scan only (labels + header check): {len(ds)} images, {len(ds) / scan:.0f} images/s")
        for res in args.resolutions:
            for w in args.workers:
                times = []
                for r in range(args.repeats):
                    cfg = load_config(None, ["prepare.dataset=300wlp", f"prepare.root={root}",
                                             f"prepare.resolution={res}", f"prepare.workers={w}"])
                    out = Path(tmp) / f"out_{res}_{w}_{r}.h5"
                    t = time.perf_counter()
                    result = run_prepare(cfg, out)
                    times.append(time.perf_counter() - t)
                    out.unlink()
                best = min(times)
                print(f"prepare 300wlp  resolution {res:4d}  workers {w}  "
                      f"{result.num_images / best:7.1f} images/s  ({best:.2f} s, whole stage)")
                rows.append({"px": res, "workers": w, "img_s": result.num_images / best,
                             "seconds": best})
    return {"n": args.n, "threads": args.threads, "scan_img_s": len(ds) / scan, "rows": rows}


if __name__ == "__main__":
    main()
