"""Photometric augmentation: clerf's YIQ saturation/hue map versus kornia's HSV functions.

clerf applies saturation and hue as one 3 x 3 colour map per image in YIQ space
(``clerf.augment.chroma_matrix``); the standard HSV versions are kornia's
``kornia.enhance.adjust_saturation`` and ``adjust_hue``. This prints milliseconds per batch of
each (median over rounds, the routes interleaved), their ratio, and the whole
``clerf.augment.photometric`` at its defaults, so the choice can be re-checked on any machine:

    .venv/bin/python benchmarks/bench_photometric.py --size 64 --batch 192 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000.0


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print it and return ``{"yiq_ms", "hsv_ms", "ratio",
    "photometric_ms", "size", "batch", "threads", "device"}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=192, help="images per call (a pretrain step)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="calls per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dataclasses import asdict

    from kornia.enhance import adjust_hue, adjust_saturation

    from clerf.augment import chroma_matrix, photometric
    from clerf.config import AugmentConfig

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(dev)
    s = (0.7 + 0.6 * torch.rand(args.batch, generator=g)).to(dev)
    h = ((torch.rand(args.batch, generator=g) - 0.5) * 0.04 * math.pi).to(dev)

    def yiq() -> torch.Tensor:
        return torch.einsum("nij,njhw->nihw", chroma_matrix(s, h), x).clamp_(0, 1)

    def hsv() -> torch.Tensor:
        return adjust_hue(adjust_saturation(x, s).clamp_(0, 1), h).clamp_(0, 1)

    def full() -> torch.Tensor:
        return photometric(x, asdict(AugmentConfig()), torch.Generator(device=dev).manual_seed(1))

    times: dict[str, list[float]] = {"yiq": [], "hsv": [], "photometric": []}
    for _ in range(args.rounds):
        for name, fn in (("yiq", yiq), ("hsv", hsv), ("photometric", full)):
            times[name].append(_time(fn, args.repeat))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"yiq_ms": med["yiq"], "hsv_ms": med["hsv"], "ratio": med["hsv"] / med["yiq"],
           "photometric_ms": med["photometric"], "size": args.size, "batch": args.batch,
           "threads": torch.get_num_threads(), "device": str(dev)}  # fmt: skip
    what = f"{args.batch} images of {args.size} px, {out['threads']} threads, {dev}"
    print(f"saturation + hue, YIQ map (clerf):    {med['yiq']:8.1f} ms per batch ({what})")
    print(f"saturation + hue, HSV (kornia.enhance): {med['hsv']:8.1f} ms per batch")
    print(f"HSV / YIQ:                            {out['ratio']:8.1f} x")
    print(f"clerf photometric at its defaults:    {med['photometric']:8.1f} ms per batch")
    return out


if __name__ == "__main__":
    main()
