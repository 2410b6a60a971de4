"""Checks that need a CUDA GPU (marker ``cuda``; skipped without one).

``benchmarks/gpu_check.py`` (``make bench-gpu``) runs them first. Each is small: seconds on a GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _store(path: Path, n: int = 64, res: int = 32) -> Path:
    from clerf.geometry import random_rotation
    from generators.procedural import ProceduralHead
    from triplets.store import StoreWriter

    R = random_rotation(n, torch.Generator().manual_seed(0))
    images = ProceduralHead(seed=0).render(torch.arange(n), R, res).images
    with StoreWriter(path, "labelled", res, total=n, chunk=32) as w:
        for s, e in w.pending():
            w.write_chunk(s, images[s:e], R[s:e], torch.arange(s, e))
        w.finalize()
    return path


def test_auto_is_this_process_gpu():
    from clerf.devices import resolve_device

    dev = resolve_device("auto")
    assert dev.type == "cuda" and dev.index == 0


def test_procedural_renders_on_the_gpu_match_the_cpu():
    from clerf.geometry import random_rotation
    from generators.procedural import ProceduralHead

    R = random_rotation(8, torch.Generator().manual_seed(1))
    ids = torch.arange(8)
    cpu = ProceduralHead(seed=3).render(ids, R, 64).images
    gpu = ProceduralHead(seed=3, device="cuda").render(ids.cuda(), R.cuda(), 64).images.cpu()
    diff = (cpu.int() - gpu.int()).abs()
    assert float(diff.float().mean()) < 0.5 and int(diff.max()) <= 8


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_finetune_on_the_gpu_with_few_host_syncs(tmp_path, precision):
    from clerf.config import load_config
    from clerf.devices import SyncsPerCall
    from clerf.finetune import run_finetune
    from clerf.training import Trainer

    store = _store(tmp_path / "s.h5")
    cfg = load_config(None, [
        f"finetune.train_store={store}", "encoder.input_size=32", "head.type=sphere",
        "head.sphere_points=64", "finetune.train.batch_size=16", "finetune.train.epochs=2",
        f"finetune.train.mixed_precision={precision}", "finetune.train.log_every=100",
        "finetune.train.progress=false", "finetune.train.tensorboard=false",
    ])  # fmt: skip
    with SyncsPerCall(Trainer, "train_micro_batch") as syncs:
        summary = run_finetune(cfg, tmp_path / "run")
    counts = [sum(c.values()) for c in syncs.counts]
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["mixed_precision_used"] == precision
    assert summary["steps"] == 8 and math.isfinite(summary["last_train_log"]["loss"])
    assert max(counts[:-1]) == 0  # no host sync inside a step outside the logging window


def test_batched_gan_rendering_on_the_gpu_matches_one_at_a_time():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gan_batching

    res = bench_gan_batching.main(["--n", "16", "--batch", "8", "--resolution", "64",
                                   "--rounds", "1", "--device", "cuda"])  # fmt: skip
    assert res["max_diff_u8"] <= 2
