"""One-command GPU check: the cuda tests, a streamed bf16 fine-tune against a model-only step,
host syncs, peak memory, batched GAN rendering, bf16 against float32. One table at the end.

    .venv/bin/python benchmarks/gpu_check.py            # make bench-gpu
    .venv/bin/python benchmarks/gpu_check.py --quick    # smaller sizes (a smoke run)

Sized to finish within about 4 minutes on one recent GPU. On a machine without CUDA it says so
and exits 0. What it runs:

1. ``pytest -m cuda`` (the tests marked ``cuda``: they skip without a GPU);
2. a fine-tune of ResNet-50 at 128 px under bf16, its images streamed from the procedural
   generator rendering on the GPU (``finetune.stream``), against a model-only step (forward,
   backward, AdamW) on resident tensors of the same shape: the data + rendering share of the
   step time (target <= 10%);
3. host syncs in one streamed training step (``clerf.devices.HostSyncCounter``);
4. peak GPU memory of the fine-tune;
5. the EG3D-interface stand-in rendered batched with per-sample draws vs one at a time
   (``benchmarks/bench_gan_batching.py``);
6. the loss after the same steps under bf16 and float32 (same seed, same data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _finetune_cfg(out_dir: Path, steps: int, batch: int, size: int, precision: str,
                  arch: str):  # fmt: skip
    from clerf.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"encoder.arch={arch}", f"encoder.input_size={size}", f"generator.resolution={size}",
        "generator.device=cuda", "finetune.encoder=", "finetune.stream.enabled=true",
        f"finetune.stream.epoch_size={steps * batch}", "finetune.stream.val_size=0",
        "finetune.val_store=", f"finetune.train.batch_size={batch}",
        f"finetune.train.max_steps={steps}", f"finetune.train.mixed_precision={precision}",
        "finetune.train.log_every=5", "finetune.train.progress=false",
        "finetune.train.tensorboard=false", "finetune.train.checkpoint_epochs=0", "seed=0",
    ])  # fmt: skip


def model_only_rate(cfg, steps: int, batch: int, size: int) -> float:
    """Images/s of forward + backward + AdamW on resident random tensors (no data, no render)."""
    import torch

    from clerf.finetune import FinetuneTask
    from clerf.geometry import random_rotation

    task = FinetuneTask(cfg)
    model = task.build_model().cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size, device="cuda")
    R = random_rotation(batch, torch.Generator().manual_seed(0)).cuda()
    dtype = torch.bfloat16 if str(cfg.finetune.train.mixed_precision) == "bf16" else None

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss, _ = model.loss(model(x), R)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def streamed_run(cfg, out: Path) -> tuple[dict, float, dict]:
    """The fine-tune (its summary), its peak GPU memory (GiB), host syncs of one inner step."""
    import torch

    from clerf.devices import SyncsPerCall
    from clerf.finetune import run_finetune
    from clerf.training import Trainer

    torch.cuda.reset_peak_memory_stats()
    # one step inside a logging window, after the warm-up, counted; the others at full speed
    with SyncsPerCall(Trainer, "train_micro_batch", only={3}) as syncs:
        summary = run_finetune(cfg, out)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return summary, peak, syncs.counts[3] if len(syncs.counts) > 3 else {}


def _syncs_text(syncs: dict) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in syncs.items()) or "none"
    return f"{sum(syncs.values())} ({kinds})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--skip-tests", action="store_true", help="leave out pytest -m cuda")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU; none is visible here (torch.cuda.is_available() is "
              "False): nothing to check")
        return 0
    name = torch.cuda.get_device_name(0)
    rows: list[tuple[str, str]] = [("GPU", name), ("torch", torch.__version__)]
    t_all = time.perf_counter()
    if not a.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                            "no:cacheprovider", "tests"], cwd=REPO, capture_output=True,
                           text=True)  # fmt: skip
        tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        rows.append(("pytest -m cuda", f"exit {r.returncode}: {tail}"))
        if r.returncode not in (0, 5):
            print(r.stdout[-3000:] + r.stderr[-2000:])
    steps, batch, size, arch = (10, 16, 64, "resnet18") if a.quick else (40, 64, 128, "resnet50")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _finetune_cfg(Path(tmp), steps, batch, size, "bf16", arch)
        summary, peak, syncs = streamed_run(cfg, Path(tmp) / "bf16")
        stream_rate = float(summary["img_per_s_this_run"])
        model_rate = model_only_rate(cfg, steps, batch, size)
        share = 100 * (1 - stream_rate / model_rate)
        rows += [
            (f"fine-tune {arch} {size} px bf16, streamed (GPU render)", f"{stream_rate:.0f} img/s"),
            ("model-only step on resident tensors", f"{model_rate:.0f} img/s"),
            ("data + rendering share of the step", f"{share:.1f}% (target <= 10%: "
                                                   f"{'met' if share <= 10 else 'not met'})"),
            ("host syncs in one streamed step", _syncs_text(syncs)),
            ("peak GPU memory of the fine-tune", f"{peak:.2f} GiB"),
        ]  # fmt: skip
        cfg32 = _finetune_cfg(Path(tmp), steps, batch, size, "no", arch)
        s32, _, _ = streamed_run(cfg32, Path(tmp) / "fp32")
        l16 = summary["last_train_log"]["loss"]
        l32 = s32["last_train_log"]["loss"]
        rows.append((f"loss after {steps} steps: bf16 / float32",
                     f"{l16:.4f} / {l32:.4f} (difference {abs(l16 - l32):.4f})"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gan_batching

    g = bench_gan_batching.main(["--n", "64", "--batch", "16", "--resolution", "128",
                                 "--device", "cuda"])  # fmt: skip
    rows.append(("GAN stand-in render, batched vs one at a time",
                 f"{g['batched_img_s']:.0f} vs {g['solo_img_s']:.0f} img/s "
                 f"({g['speedup']:.1f}x; largest pixel difference {g['max_diff_u8']})"))
    rows.append(("wall time of this check", f"{time.perf_counter() - t_all:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print(json.dumps(dict(rows)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
