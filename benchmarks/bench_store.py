"""Benchmark of the HDF5 store: write and read throughput, file size per 1,000 triplets.

    .venv/bin/python benchmarks/bench_store.py [--triplets 1000] [--resolutions 64 128]
        [--source auto|procedural|synthetic] [--workers 2] [--batch 64]

For each resolution and compression (none, lzf, gzip-4) it writes a triplet store with
:class:`triplets.store.StoreWriter` (the images are pre-rendered, so this measures the writer:
checks, Euler labels, digests, compression, commits), then reads random batches of ``--batch``
triplets through :func:`triplets.store.make_loader` with ``--workers`` DataLoader workers
(block shuffling, one epoch) and reports images/s (3 images per triplet). Image content matters
for compression: ``procedural`` renders a pool of faces with the built-in generator and tiles it
(each chunk compresses independently; a face repeats only far outside the compressors' windows);
``synthetic`` draws smooth face-like blobs; ``auto`` uses procedural when available.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clerf.geometry import random_rotation
from triplets.store import StoreWriter, TripletDataset, make_loader


def synthetic_faces(n: int, res: int, seed: int = 0) -> np.ndarray:
    """Smooth background + shaded ellipse 'head' + dark 'eyes' + mild noise, uint8 (n,3,r,r)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    out = np.empty((n, 3, res, res), np.uint8)
    for i in range(n):
        bg = rng.uniform(40, 200, 3)[:, None, None] + 30 * np.sin(
            2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy))[None]
        cx, cy, a, b = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.3), \
            rng.uniform(0.25, 0.35)
        r2 = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        skin = rng.uniform(120, 230, 3)[:, None, None] * (1.1 - 0.4 * r2)[None]
        img = np.where(r2[None] < 1, skin, bg)
        for ex in (-0.35, 0.35):
            e2 = ((xx - cx - ex * a) / 0.04) ** 2 + ((yy - cy + 0.2 * b) / 0.03) ** 2
            img = np.where(e2[None] < 1, 30.0, img)
        img += rng.normal(0, 3, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def image_pool(source: str, res: int, n: int = 48) -> tuple[np.ndarray, str]:
    if source in ("auto", "procedural"):
        try:
            from generators import build_generator
            from triplets.poses import EulerBox, seeded_generator

            gen = build_generator("procedural", seed=0, device="cpu")
            R = EulerBox().sample(n, seeded_generator(0)).float()
            with torch.no_grad():
                imgs = gen.render(torch.arange(n), R, res).images.cpu().numpy()
            return imgs, "procedural renders"
        except (ImportError, ValueError):
            if source == "procedural":
                raise
    return synthetic_faces(n, res), "synthetic face-like images"


def bench(args: argparse.Namespace) -> list[dict]:
    """Print the table; return its rows ``{"px", "compression", "write_img_s", "read_img_s",
    "mb_per_1k_triplets", "source"}``."""
    t = args.triplets
    n = 3 * t
    chunk = 96
    print(f"{t} triplets ({n} images) per store, chunk {chunk} images, read batches of "
          f"{args.batch} triplets with {args.workers} workers; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'px':>4} {'compression':>11} {'write img/s':>12} {'read img/s':>11} "
          f"{'MB / 1k triplets':>17}  source")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        for res in args.resolutions:
            pool, what = image_pool(args.source, res)
            reps = -(-n // len(pool))
            images = np.concatenate([pool] * reps)[:n]
            rots = random_rotation(n, torch.Generator().manual_seed(0)).numpy()
            ids = np.arange(n, dtype=np.int64)
            for comp in ("none", "lzf", "gzip"):
                path = Path(d) / f"{res}_{comp}.h5"
                t0 = time.perf_counter()
                with StoreWriter(path, "triplets", res, n, compression=comp, chunk=chunk) as w:
                    for a, b in w.pending():
                        w.write_chunk(a, images[a:b], rots[a:b], ids[a:b])
                    w.finalize()
                wt = time.perf_counter() - t0
                size_mb = path.stat().st_size / 2**20 * 1000 / t
                loader = make_loader(TripletDataset(path), args.batch, shuffle=True, seed=0,
                                     num_workers=args.workers)
                it = iter(loader)
                next(it)  # worker start-up is not part of the read rate
                t0 = time.perf_counter()
                got = 0
                for batch in it:
                    got += batch["images"].shape[0] * 3
                rt = time.perf_counter() - t0
                del it, loader
                print(f"{res:>4} {comp:>11} {n / wt:>12.0f} {got / rt:>11.0f} "
                      f"{size_mb:>17.1f}  {what}", flush=True)
                rows.append({"px": res, "compression": comp, "write_img_s": n / wt,
                             "read_img_s": got / rt, "mb_per_1k_triplets": size_mb,
                             "source": what})
                path.unlink()
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line); print it and return the figures:
    ``{"triplets", "batch", "workers", "threads", "rows": bench(...)}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--triplets", type=int, default=1000)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--source", choices=("auto", "procedural", "synthetic"), default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tmp", default=None, help="folder for the temporary stores")
    args = p.parse_args(argv)
    rows = bench(args)
    return {"triplets": args.triplets, "batch": args.batch, "workers": args.workers,
            "threads": torch.get_num_threads(), "rows": rows}


if __name__ == "__main__":
    main()
