"""Streaming versus store: fine-tune step throughput when the images come from the generator.

Measures, in ONE process and interleaved round by round (the machine is shared and noisy), the
fine-tune step (6D head, chordal loss, backward, AdamW) fed by:

* ``memory``: one batch of images already in memory, reused (the step alone);
* ``store``: a labelled HDF5 store read by ``triplets.store.make_loader`` (pre-rendered);
* ``stream``: ``clerf.streaming`` rendering every batch in the training process on ``--device``
  (``train.num_workers: 0``);
* ``stream_workers``: the same stream rendered on the CPU in ``--workers`` DataLoader workers
  (``train.num_workers > 0``), overlapping with the step.

Reports images/s of each (median over rounds) and the overhead ``1 - x / memory`` of the store
and of both streaming modes (target for streaming: <= 10% of the step time).

    .venv/bin/python benchmarks/bench_streaming.py --size 64 --batch 64 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print it and return ``{"memory_img_s", "store_img_s",
    "stream_img_s", "stream_workers_img_s", "*_overhead_pct", "size", "batch", "workers",
    "threads", "device"}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image size (generator and encoder)")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of stream_workers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per round and mode")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="clerf_bench_stream_"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _store(path: Path, cfg, n: int) -> Path:
    from clerf.data_sources import stage_stream
    from triplets.store import StoreWriter

    src = stage_stream(cfg, "finetune")
    res = int(cfg.generator.resolution)
    with StoreWriter(path, "labelled", res, total=n, chunk=64) as w:
        for s, e in w.pending():
            b = src.read_batch(range(s, e))
            w.write_chunk(s, b["images"], b["rotations"], b["identities"])
        w.finalize()
    return path


def _run(args: argparse.Namespace, tmp: Path) -> dict:
    from accelerate.utils import set_seed

    from clerf.augment import to_float_images
    from clerf.config import load_config
    from clerf.data_sources import stage_stream
    from clerf.models.encoder import build_encoder
    from clerf.models.pose_model import HeadPoseModel
    from clerf.streaming import make_training_loader
    from triplets.store import LabelledDataset

    dev = torch.device(args.device)
    cfg = load_config(overrides=[
        f"encoder.arch={args.arch}", f"encoder.input_size={args.size}",
        f"generator.resolution={args.size}", f"generator.device={args.device}",
        "triplets.poses=uniform", "finetune.stream.enabled=true",
        f"finetune.stream.epoch_size={args.batch * 10_000}", "head.type=rotation6d",
        "head.loss=chordal",
    ])  # fmt: skip
    n_store = args.batch * max(args.steps, 2) * 2
    t0 = time.perf_counter()
    store = _store(tmp / "labelled.h5", cfg, n_store)
    print(f"store: {n_store} images at {args.size} px rendered in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

    set_seed(0)
    model = HeadPoseModel(build_encoder(cfg.encoder), cfg.head).train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loaders = {
        "store": make_training_loader(LabelledDataset(store), args.batch, seed=0),
        "stream": make_training_loader(stage_stream(cfg, "finetune"), args.batch, seed=0,
                                       device=dev),  # fmt: skip
        "stream_workers": make_training_loader(stage_stream(cfg, "finetune"), args.batch,
                                               seed=0, num_workers=args.workers),  # fmt: skip
    }
    iters = {k: iter(v) for k, v in loaders.items()}

    def next_batch(kind: str):
        b = next(iters[kind], None)
        if b is None:  # the small store runs out: next epoch
            iters[kind] = iter(loaders[kind])
            b = next(iters[kind])
        return b

    def step(x: torch.Tensor, R: torch.Tensor) -> int:
        loss, _ = model.loss(model(x), R)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return x.shape[0]

    first = next_batch("store")
    x_mem = to_float_images(first["images"].to(dev), args.size)
    R_mem = first["rotations"].to(dev)

    def run(kind: str) -> int:
        if kind == "memory":
            return step(x_mem, R_mem)
        b = next_batch(kind)
        return step(to_float_images(b["images"].to(dev), args.size), b["rotations"].to(dev))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(kind: str, n: int) -> float:
        sync()
        imgs, t = 0, time.perf_counter()
        for _ in range(n):
            imgs += run(kind)
        sync()
        return imgs / (time.perf_counter() - t)

    kinds = ("memory", "store", "stream", "stream_workers")
    for k in kinds:  # warm-up: allocator, worker start-up, first reads
        timed(k, 1)
    got: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds:
            got[k].append(timed(k, args.steps))
        print(f"round {r}: " + ", ".join(f"{k} {got[k][-1]:.1f}" for k in kinds) + " img/s")
    med = {k: statistics.median(v) for k, v in got.items()}
    out = {f"{k}_img_s": v for k, v in med.items()}
    for k in kinds[1:]:
        out[f"{k}_overhead_pct"] = 100 * (1 - med[k] / med["memory"])
    print("median: " + ", ".join(f"{k} {med[k]:.1f} img/s" for k in kinds) + "; overhead "
          + ", ".join(f"{k} {out[f'{k}_overhead_pct']:.1f}%" for k in kinds[1:]))
    print(f"torch threads {torch.get_num_threads()}, workers {args.workers}, device {dev}")
    out.update(size=args.size, batch=args.batch, workers=args.workers,
               threads=torch.get_num_threads(), device=str(dev))
    return out


if __name__ == "__main__":
    main()
