"""Gradient equivalence under several processes: tests that fail when the gradient path is wrong.

Two CPU processes (gloo) at batch b must end one SGD step on the parameters of one process at
batch 2b, for the fine-tune and for contrastive pretraining with ``gather_distributed`` (each
rank's anchors against every rank's embeddings); one process at batch b with ``grad_accum: 2``
likewise (pretraining: with pairs inside triplets only). DDP keeps the ranks' parameters
equal whatever the gradient, so equal ranks prove nothing; equal *to the single-process step*
does. ``tests/ddp_equivalence_run.py`` runs clerf's
own task and loop; ``CLERF_TEST_BREAK`` there breaks the loss scaling or the gather, and these
tests then fail (``test_the_check_fails_when_the_gradient_path_is_broken``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "ddp_equivalence_run.py"
N = 16  # images (finetune) or triplets (pretrain): one step of 2b = 16, or 2 x 8


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def _start(out: Path) -> dict:
    return torch.load(out / "params0.pt", weights_only=True)


def _single(stage: str, store: Path, out: Path, batch: int, accum: int, *overrides: str,
            **env: str) -> dict:  # fmt: skip
    res = subprocess.run([sys.executable, str(RUN), stage, str(store), str(out), str(batch),
                          str(accum), *overrides], cwd=REPO, env=_env(**env),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out / "params.pt", weights_only=True)


def _two(stage: str, store: Path, out: Path, batch: int, timeout: int = 400,
         **env: str) -> dict:  # fmt: skip
    accelerate = Path(sys.executable).with_name("accelerate")
    args = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN), stage,
            str(store), str(out), str(batch), "1"]  # fmt: skip
    res = subprocess.run(args, cwd=REPO, env=_env(ACCELERATE_USE_CPU="1", **env),
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    return torch.load(out / "params.pt", weights_only=True)


def _stores(tmp: Path) -> dict[str, Path]:
    from test_pretrain import _make_store

    from clerf.geometry import random_rotation
    from generators.procedural import ProceduralHead
    from triplets.store import StoreWriter

    R = random_rotation(N, torch.Generator().manual_seed(3))
    images = ProceduralHead(seed=0).render(torch.arange(N), R, 32).images
    labelled = tmp / "labelled.h5"
    with StoreWriter(labelled, "labelled", 32, total=N, chunk=8) as w:
        for s, e in w.pending():
            w.write_chunk(s, images[s:e], R[s:e], torch.arange(s, e))
        w.finalize()
    return {"finetune": labelled, "pretrain": _make_store(tmp / "triplets.h5", N, seed=0)}


def _max_rel_diff(a: dict, b: dict, ref: dict | None = None) -> float:
    """Largest |a - b| over the parameters, relative to the largest entry of the step taken."""
    keys = sorted(a)
    assert keys == sorted(b)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
    scale = max(float(a[k].double().abs().max()) for k in keys) if ref is None else \
        max(float((a[k].double() - ref[k].double()).abs().max()) for k in keys)
    return diff / scale


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return _stores(tmp_path_factory.mktemp("ddp_eq"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_two_processes_equal_one_big_batch(stage, stores, tmp_path):
    whole = _single(stage, stores[stage], tmp_path / "whole", N, 1)
    start = _start(tmp_path / "whole")
    two = _two(stage, stores[stage], tmp_path / "two", N // 2)
    assert _max_rel_diff(_start(tmp_path / "two"), start) == 0  # the same initial weights
    assert _max_rel_diff(whole, start) > 1e-4  # a real step was taken
    assert _max_rel_diff(two, whole, start) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_grad_accum_equals_one_big_batch(stage, stores, tmp_path):
    """For pretraining only with pairs inside each triplet (``batch_pairs: false``): with pairs
    across the batch, two micro-batches of b triplets form fewer pairs than one batch of 2b
    (no pair straddles micro-batches), a different loss by design (docs/pretrain.md);
    ``gather_distributed`` over processes has no such gap (the test above)."""
    extra = ["pretrain.loss.batch_pairs=false"] if stage == "pretrain" else []
    whole = _single(stage, stores[stage], tmp_path / "whole", N, 1, *extra)
    start = _start(tmp_path / "whole")
    accum = _single(stage, stores[stage], tmp_path / "accum", N // 2, 2, *extra)
    assert _max_rel_diff(whole, start) > 1e-4
    assert _max_rel_diff(accum, whole, start) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stage,broken", [("finetune", "scale"), ("pretrain", "scale"),
                                          ("pretrain", "gather")])
def test_the_check_fails_when_the_gradient_path_is_broken(stage, broken, stores, tmp_path):
    whole = _single(stage, stores[stage], tmp_path / "whole", N, 1)
    start = _start(tmp_path / "whole")
    two = _two(stage, stores[stage], tmp_path / "two", N // 2, CLERF_TEST_BREAK=broken)
    assert _max_rel_diff(two, whole, start) > 1e-2


@pytest.mark.slow
def test_a_rank_without_pairs_does_not_hang_the_gathered_backward(stores, tmp_path):
    """With gather_distributed, a rank whose batch has no usable pair returns a zero loss; it
    must still enter the all-gather's backward (a collective), or the other rank waits forever
    (the subprocess timeout would fail this test)."""
    _two("pretrain", stores["pretrain"], tmp_path / "two", N // 2, timeout=120,
         CLERF_TEST_EMPTY_RANK="1")
