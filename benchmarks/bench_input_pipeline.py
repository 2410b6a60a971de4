"""Input-pipeline overhead of pretraining: HDF5 read + on-device augmentation vs in-memory.

Measures, in ONE process and interleaved round by round (the machine is shared and noisy):

* ``real``: the pretraining step as ``clerf pretrain`` runs it: a batch of triplets read from
  an HDF5 triplet store by ``triplets.store.make_loader`` (block-shuffled contiguous reads),
  augmented by ``clerf.augment.PoseAugment.triplets`` (geometric + photometric), embedded,
  Circle Loss, backward, AdamW step (``clerf.pretrain.PretrainTask.train_step``);
* ``memory``: the same model, loss and optimizer fed with float tensors already in memory
  (already augmented once, no reading, no augmentation).

Reports images/s of both (median over rounds) and the overhead ``1 - real / memory``
(target <= 10%), and the host syncs of one real step (scalar reads of tensors: each one a
device synchronisation on a GPU; ``clerf.devices.HostSyncCounter``). The store is rendered by
the procedural generator into a temporary directory.

    .venv/bin/python benchmarks/bench_input_pipeline.py --size 64 --batch 16 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_store(path: Path, n_triplets: int, res: int, compression: str, seed: int = 0) -> Path:
    from clerf.geometry import random_rotation
    from generators.procedural import ProceduralHead
    from triplets.store import StoreWriter

    g = torch.Generator().manual_seed(seed)
    gen = ProceduralHead(seed=seed)
    chunk = 96
    with StoreWriter(path, "triplets", res, total=3 * n_triplets, chunk=chunk,
                     compression=compression) as w:  # fmt: skip
        for s, e in w.pending():
            t = (e - s) // 3
            Ra, Rn = random_rotation(t, g), random_rotation(t, g)
            ida = torch.randint(0, 10_000, (t,), generator=g)
            R = torch.stack([Ra, Ra, Rn], 1).reshape(-1, 3, 3)
            ids = torch.stack([ida, ida + 10_000, ida], 1).reshape(-1)
            w.write_chunk(s, gen.render(ids, R, res).images, R, ids)
        w.finalize()
    return path


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line); print it and return the figures.

    Returns ``{"host_syncs_per_step", "real_img_s", "memory_img_s", "overhead_pct",
    "round_overhead_pct", "input_only_img_s", "size", "batch", "workers", "threads", "device"}``.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image size (store and encoder)")
    ap.add_argument("--batch", type=int, default=16, help="triplets per step")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--triplets", type=int, default=256, help="triplets in the store")
    ap.add_argument("--store", default="", help="use this triplet store instead of rendering one")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--compression", default="lzf", choices=["none", "lzf", "gzip"])
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="steps per round and mode")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="clerf_bench_"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the rendered store


def _run(args: argparse.Namespace, tmp: Path) -> dict:
    from accelerate.utils import set_seed

    from clerf.config import load_config
    from clerf.pretrain import PretrainTask
    from clerf.training import StepContext
    from triplets.store import TripletDataset, make_loader

    if args.store:
        store = Path(args.store)
    else:
        t0 = time.perf_counter()
        store = make_store(tmp / "triplets.h5", args.triplets, args.size, args.compression)
        print(f"store: {args.triplets} triplets at {args.size} px ({args.compression}), rendered "
              f"in {time.perf_counter() - t0:.1f} s, {store.stat().st_size / 2**20:.1f} MiB")
    dev = torch.device(args.device)

    cfg = load_config(overrides=[
        f"encoder.arch={args.arch}", f"encoder.input_size={args.size}",
        f"pretrain.train_store={store}", f"pretrain.train.batch_size={args.batch}",
        "pretrain.augment.p_vflip=0.25",
    ])  # fmt: skip
    set_seed(0)
    task = PretrainTask(cfg, train_data=TripletDataset(store))
    model = task.build_model().train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = StepContext(accelerator=None, cfg=cfg, train_cfg=cfg.pretrain.train, out=tmp)
    loader = make_loader(task.train_data, args.batch, shuffle=True, seed=0,
                         num_workers=args.workers, drop_last=True,
                         persistent_workers=args.workers > 0)  # fmt: skip
    batches = iter(())
    epoch = 0

    def next_batch():
        nonlocal batches, epoch
        b = next(batches, None)
        if b is None:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            batches = iter(loader)
            b = next(batches)
        return b

    # in-memory input: one augmented batch, reused
    first = next_batch()
    x_mem, R_mem = task.augment.triplets(first["images"].to(dev), first["rotations"].to(dev),
                                         torch.Generator(dev).manual_seed(0))
    x_mem = x_mem.reshape(-1, 3, args.size, args.size).contiguous()

    def step_real(i: int) -> int:
        batch = {k: v.to(dev, non_blocking=True) for k, v in next_batch().items()}
        ctx.generator = torch.Generator(dev).manual_seed(i)
        loss, _ = task.train_step(model, batch, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch["images"].shape[0] * 3

    def step_memory(i: int) -> int:
        loss, _ = task.loss(model(x_mem), R_mem)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return x_mem.shape[0]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, n: int) -> float:
        sync()
        imgs, t = 0, time.perf_counter()
        for i in range(n):
            imgs += fn(i)
        sync()
        return imgs / (time.perf_counter() - t)

    timed(step_real, 2)  # warm-up (allocator, worker start, first chunk reads)
    timed(step_memory, 2)
    real, mem = [], []
    for r in range(args.rounds):
        real.append(timed(step_real, args.steps))
        mem.append(timed(step_memory, args.steps))
        print(f"round {r}: real {real[-1]:.1f} img/s, memory {mem[-1]:.1f} img/s")
    mr, mm = statistics.median(real), statistics.median(mem)
    ratios = [a / b for a, b in zip(real, mem, strict=True)]
    print(f"median: real pipeline {mr:.1f} img/s, in-memory {mm:.1f} img/s, overhead "
          f"{100 * (1 - mr / mm):.1f}% (per-round overhead median "
          f"{100 * (1 - statistics.median(ratios)):.1f}%)")  # fmt: skip

    # Where the time goes: the input pipeline alone (read + augmentation, no model).
    sync()
    n, t = 0, time.perf_counter()
    for i in range(args.steps * 2):
        b = next_batch()
        task.augment.triplets(b["images"].to(dev), b["rotations"].to(dev),
                              torch.Generator(dev).manual_seed(i))
        n += b["images"].shape[0] * 3
    sync()
    alone = n / (time.perf_counter() - t)
    print(f"input pipeline alone (read + augment): {alone:.0f} img/s; "
          f"torch threads {torch.get_num_threads()}, workers {args.workers}, device {dev}")

    # Host syncs: scalar reads of tensors in one real step (outside torch.optim), by kind.
    from clerf.devices import HostSyncCounter

    with HostSyncCounter() as counter:
        step_real(0)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counter.counts.items())) or "none"
    print(f"host syncs per pretraining step (batch {args.batch} triplets): {counter.total} "
          f"({kinds})")
    return {"host_syncs_per_step": counter.total, "real_img_s": mr, "memory_img_s": mm,
            "overhead_pct": 100 * (1 - mr / mm),
            "round_overhead_pct": 100 * (1 - statistics.median(ratios)),
            "input_only_img_s": alone, "size": args.size, "batch": args.batch,
            "workers": args.workers, "threads": torch.get_num_threads(), "device": str(dev)}


if __name__ == "__main__":
    main()
