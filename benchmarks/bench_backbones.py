"""Training speed of backbones as the quickstart trains them: the images/s column of the backbone
table in docs/components.md.

    .venv/bin/python benchmarks/bench_backbones.py [--archs resnet18 resnet10t ...] [--size 64]
        [--batch 64] [--repeats 5] [--threads N] [--channels-last]

For each ``encoder.arch`` it builds clerf's encoder (random weights, the quickstart's circle mask)
and the quickstart's sphere-grid head, and times full optimizer steps (forward, the head's loss,
backward, AdamW) on random images with random rotations, as the fine-tune runs them. Figures are
medians over ``--repeats`` steps after two warm-up steps. Prints the CPU's capability
(``torch.backends.cpu.get_cpu_capability()``): AVX2-only CPUs run these 2-4x slower than AVX-512
ones; ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` approximates one. Run it alone on the
machine: two torch jobs on two cores slow each other many times over.

The accuracy column of that table comes from short quickstart runs (the command is in
docs/components.md); this script measures speed only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DEFAULT_ARCHS = ["resnet18", "resnet10t", "mobilenetv3_large_100", "repvgg_a0"]


def bench_backbone(arch: str, size: int, batch: int, repeats: int, channels_last: bool
                   ) -> dict[str, float]:  # fmt: skip
    from clerf.config import EncoderSpec
    from clerf.geometry import random_rotation
    from clerf.models.encoder import Encoder
    from clerf.models.heads import build_head

    torch.manual_seed(0)
    encoder = Encoder(EncoderSpec(arch=arch, input_size=size, circle_mask=0.5))
    head = build_head({"type": "sphere"}, encoder.feature_dim)
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head}).train()
    images = torch.rand(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    rotations = random_rotation(batch, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = head.loss(head(encoder.features(images)), rotations)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[2:])
    params = sum(p.numel() for p in encoder.backbone.parameters()) / 1e6
    return {"img_per_s": batch / step, "params_m": params, "features": encoder.feature_dim}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.size} px, batch {args.batch}, "
          f"channels_last {args.channels_last}")  # fmt: skip
    print(f"{'arch':<24} {'params (M)':>10} {'features':>8} {'train img/s':>12}")
    for arch in args.archs:
        r = bench_backbone(arch, args.size, args.batch, args.repeats, args.channels_last)
        print(f"{arch:<24} {r['params_m']:>10.1f} {r['features']:>8d} {r['img_per_s']:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
