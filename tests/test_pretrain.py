"""Tests of the pretrain stage and `clerf pretrain`: tiny stores from the procedural generator."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clerf
from clerf.cli import main
from clerf.config import load_config
from clerf.geometry import random_rotation
from clerf.pretrain import InMemoryTriplets, nn_pose_retrieval, run_pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "encoder.input_size=32", "encoder.embedding_dim=32", "encoder.projection_hidden=64",
    "pretrain.train.batch_size=8", "pretrain.train.progress=false", "pretrain.train.log_every=1",
    "pretrain.val_size=48",
]  # fmt: skip


def _make_store(path: Path, n_triplets: int = 16, res: int = 32, seed: int = 0) -> Path:
    """A triplet store: anchor (id a, R), positive (id a + 1000, R), negative (id a, R')."""
    from generators.procedural import ProceduralHead
    from triplets.store import StoreWriter

    g = torch.Generator().manual_seed(seed)
    Ra, Rn = random_rotation(n_triplets, g), random_rotation(n_triplets, g)
    ida = torch.randint(0, 1000, (n_triplets,), generator=g)
    R = torch.stack([Ra, Ra, Rn], 1).reshape(-1, 3, 3)
    ids = torch.stack([ida, ida + 1000, ida], 1).reshape(-1)
    images = ProceduralHead(seed=seed).render(ids, R, res).images
    with StoreWriter(path, "triplets", res, total=3 * n_triplets, chunk=24) as w:
        for s, e in w.pending():
            w.write_chunk(s, images[s:e], R[s:e], ids[s:e])
        w.finalize()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return _make_store(d / "train.h5", 16, seed=0), _make_store(d / "val.h5", 16, seed=1)


def _overrides(stores, *extra):
    train, val = stores
    return TINY + [f"pretrain.train_store={train}", f"pretrain.val_store={val}", *extra]


# --------------------------------------------------------------------------- NN retrieval


def test_nn_retrieval_with_perfect_embeddings_reaches_the_oracle():
    R = random_rotation(40, torch.Generator().manual_seed(0))
    res = nn_pose_retrieval(R.reshape(40, 9), R)  # embedding = the rotation itself
    assert res["nn_geodesic_deg"] == pytest.approx(res["nn_oracle_deg"], abs=1e-3)
    assert res["nn_random_deg"] > 100.0  # uniform rotations: ~126.5 deg on average


def test_nn_retrieval_exact_on_duplicates_and_order_independent():
    R = random_rotation(5, torch.Generator().manual_seed(1)).repeat(2, 1, 1)
    emb = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)).repeat(2, 1)
    res = nn_pose_retrieval(emb, R)
    assert res["nn_geodesic_deg"] == pytest.approx(0.0, abs=1e-6)
    assert res["nn_within_15deg"] == 1.0
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert nn_pose_retrieval(emb[perm], R[perm]) == pytest.approx(res)


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_run_pretrain_writes_a_loadable_encoder(stores, tmp_path):
    cfg = load_config(overrides=_overrides(stores, "pretrain.train.epochs=1"))
    summary = run_pretrain(cfg, tmp_path)
    assert summary["steps"] == 2 and summary["images_seen"] == 2 * 8 * 3
    ev = summary["evaluation"]
    assert set(ev) >= {"val/nn_geodesic_deg", "val/nn_oracle_deg", "val/nn_random_deg"}
    enc = clerf.load_encoder(tmp_path)
    assert enc.spec.input_size == 32 and enc.embedding_dim == 32
    assert enc.training_summary["stage"] == "pretrain" and enc.training_summary["steps"] == 2
    assert enc.training_summary["evaluation"] == pytest.approx(ev)
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "pos_pairs", "neg_pairs", "table_neg_dropped", "img_per_s"} <= set(rec[0])
    assert rec[0]["pos_pairs"] >= 16  # at least each table a-p pair, both directions


@pytest.mark.slow
def test_loss_decreases_within_a_few_steps(stores, tmp_path):
    # One batch repeated (8 triplets, batch 8, no augmentation): the loss must go down.
    cfg = load_config(overrides=_overrides(
        stores, "pretrain.train.max_steps=8", "pretrain.augment.enabled=false",
        "pretrain.train.schedule=constant", "pretrain.val_store=''", "pretrain.train.epochs=8",
        "pretrain.train.checkpoint_epochs=0",
    ))  # fmt: skip
    from triplets.store import TripletDataset

    ds = TripletDataset(stores[0])
    data = ds.read_batch(list(range(8)))
    summary = run_pretrain(cfg, tmp_path, train_data=InMemoryTriplets(data["images"],
                                                                        data["rotations"]))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]  # fmt: skip
    assert summary["steps"] == 8 and len(losses) == 8
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_pretrain_cli_end_to_end_and_rerun_resumes(stores, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    shutil.copy(REPO / "configs" / "pretrain_small.yaml", cfg_file)
    args = ["pretrain", str(cfg_file), "--out", str(out), *_overrides(stores),
            "pretrain.train.epochs=1"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pretrain: 2 steps on 1 process(es)" in printed and "held-out NN pose error" in printed
    assert (out / "encoder" / "model.safetensors").is_file()
    assert main(args) == 0  # complete: resumes at the end, trains nothing
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2


def test_configs_pretrain_small_is_valid():
    cfg = load_config(REPO / "configs" / "pretrain_small.yaml")
    assert cfg.encoder.arch == "resnet18" and cfg.encoder.input_size == 64
    assert cfg.pretrain.loss.name == "circle"


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["pretrain.train_store=''"], 2, "pretrain.train_store: no store given"),
        (["pretrain.train_store=/nonexistent/x.h5"], 1, "store not found: /nonexistent/x.h5"),
        (["pretrain.loss.eps_deg=50"], 2, "eps_deg <= delta_deg"),
        (["pretrain.train.batch_size=64"], 1, "fewer than one batch"),
        (["pretrain.bogus=1"], 2, "bogus"),
        (["encoder.arch=vgg_nope"], 2, "encoder.arch"),
    ],
)
def test_cli_errors_are_one_line(stores, tmp_path, capsys, extra, code, message):
    args = ["pretrain", str(REPO / "configs" / "pretrain_small.yaml"), "--out",
            str(tmp_path / "o"), *_overrides(stores), *extra]  # fmt: skip
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("clerf pretrain: error:") and message in err and "\n" not in err
    assert "Traceback" not in err


def test_cli_error_on_a_foreign_file(stores, tmp_path, capsys):
    bad = tmp_path / "not_a_store.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    args = ["pretrain", str(REPO / "configs" / "pretrain_small.yaml"), "--out",
            str(tmp_path / "o"), *_overrides(stores), f"pretrain.train_store={bad}"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


# --------------------------------------------------------------------------- processes


def _env():
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_from_the_saved_step(stores, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "clerf", "pretrain",
            str(REPO / "configs" / "pretrain_small.yaml"), "--out", str(out), *_overrides(stores),
            "pretrain.train.epochs=6", "pretrain.train.checkpoint_every=1",
            "pretrain.val_store=''"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    ck = out / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ck.glob("step_*") if (p / "loop_state.json").is_file()] \
            if ck.is_dir() else []  # fmt: skip
        if any(int(p.name[5:]) >= 3 for p in done):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(int(p.name[5:]) for p in ck.glob("step_*") if (p / "loop_state.json").is_file())
    assert 3 <= saved < 12
    res = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == saved and summary["steps"] == 12
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": saved, "epoch": saved // 2} in events
    clerf.load_encoder(out)


@pytest.mark.slow
def test_two_process_accelerate_run_keeps_ranks_identical(stores, tmp_path):
    out = tmp_path / "ddp"
    env = _env()
    env["ACCELERATE_USE_CPU"] = "1"
    accelerate = Path(sys.executable).with_name("accelerate")
    args = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "clerf", "pretrain",
            str(REPO / "configs" / "pretrain_small.yaml"), "--out", str(out), *_overrides(stores),
            "pretrain.train.batch_size=4", "pretrain.train.epochs=1",
            "pretrain.loss.gather_distributed=true"]  # fmt: skip
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # 16 triplets / 2 ranks / batch 4 = 2 steps; each step sees 2 x 4 x 3 images
    assert summary["steps"] == 2 and summary["images_seen"] == 2 * 2 * 4 * 3
    stats = summary["rank_param_stats"]
    assert len(stats) == 2 and stats[0] == stats[1]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["world_size"] == 2
    clerf.load_encoder(out)


def test_only_the_main_process_holds_the_retrieval_check_set(stores, monkeypatch):
    from clerf.errors import DataError
    from clerf.pretrain import PretrainTask

    cfg = load_config(overrides=_overrides(stores))
    monkeypatch.setenv("RANK", "0")
    assert PretrainTask(cfg).val_images.shape[0] == 48
    monkeypatch.setenv("RANK", "1")
    assert PretrainTask(cfg).val_images is None
    with pytest.raises(DataError, match="at least 2 images"):  # checked on every rank
        PretrainTask(load_config(overrides=_overrides(stores, "pretrain.val_size=1")))


def test_host_syncs_per_pretraining_step_are_bounded(stores, tmp_path):
    """Outside the logging window a contrastive step reads values back only to build the pair
    indices pytorch-metric-learning takes (two ``nonzero``, clerf's) and inside PML's
    CircleLoss and reducer (six: its boolean-mask indexing), whatever the batch size; the
    step's statistics stay on the device until the window."""
    from clerf.devices import SyncsPerCall
    from clerf.training import Trainer

    cfg = load_config(overrides=_overrides(stores, "pretrain.train.epochs=2",
                                           "pretrain.train.batch_size=4",
                                           "pretrain.train.log_every=1000"))  # fmt: skip
    with SyncsPerCall(Trainer, "train_micro_batch") as syncs:
        run_pretrain(cfg, tmp_path)
    inner = syncs.counts[:-1]
    assert len(inner) >= 5
    assert max(sum(c.values()) for c in inner) <= 8, inner[:2]
    assert max(c.get("nonzero", 0) for c in inner) <= 2
