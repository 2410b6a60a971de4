"""Streaming generator sources (``clerf.streaming``): fresh, deterministic batches that depend only
on (seed, step, rank); the same triplets as ``clerf generate``; bit-identical resume after kill -9;
deterministic 2-process runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clerf.config import GeneratorConfig, StreamConfig, TripletsConfig, load_config
from clerf.data_sources import stage_stream
from clerf.finetune import FinetuneTask, run_finetune
from clerf.geometry import is_rotation
from clerf.pretrain import run_pretrain
from clerf.streaming import (
    STREAM_IDENTITY_BASE,
    StreamBatchSampler,
    build_stream,
    held_out_labelled,
    make_training_loader,
)

REPO = Path(__file__).resolve().parents[1]
TINY_FT = [
    "generator.resolution=32", "encoder.input_size=32", "triplets.poses=uniform",
    "head.type=rotation6d", "head.loss=chordal", "finetune.stream.enabled=true",
    "finetune.stream.epoch_size=64", "finetune.stream.val_size=16",
    "finetune.train.batch_size=8", "finetune.train.epochs=2", "finetune.train.progress=false",
    "finetune.train.log_every=1", "finetune.augment.enabled=false",
]  # fmt: skip


def _ft_cfg(*extra: str):
    return load_config(None, TINY_FT + list(extra))


# --------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_are_disjoint_across_ranks_and_epochs_and_cover_a_prefix(world):
    b, epoch_size = 4, 50
    seen: list[int] = []
    for epoch in range(3):
        for rank in range(world):
            s = StreamBatchSampler(epoch_size, b, rank=rank, world_size=world)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == epoch_size // (b * world)
            for ids in batches:
                assert ids == list(range(ids[0], ids[0] + b)) and ids[0] % b == 0
            seen += [i for ids in batches for i in ids]
    assert len(seen) == len(set(seen))  # never repeated: every batch is fresh
    assert sorted(seen) == list(range(len(seen)))  # no gaps either


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        StreamBatchSampler(10, 2, rank=2, world_size=2)


# --------------------------------------------------------------------------- labelled stream


def test_labelled_batch_depends_only_on_its_ids():
    cfg = _ft_cfg()
    a, b = stage_stream(cfg, "finetune"), stage_stream(cfg, "finetune")
    x = a.read_batch(range(16, 24))
    y = b.read_batch(list(range(16, 24)))
    assert torch.equal(x["images"], y["images"]) and torch.equal(x["rotations"], y["rotations"])
    z = a.read_batch(range(24, 32))
    assert not torch.equal(x["images"], z["images"])
    assert x["images"].dtype == torch.uint8 and x["images"].shape == (8, 3, 32, 32)
    assert is_rotation(x["rotations"]).all()
    assert torch.equal(x["identities"], torch.arange(16, 24) + STREAM_IDENTITY_BASE)
    with pytest.raises(ValueError, match="consecutive"):
        a.read_batch([0, 2])


def test_a_new_seed_gives_new_images_and_poses():
    x = stage_stream(_ft_cfg(), "finetune").read_batch(range(8))
    y = stage_stream(_ft_cfg("seed=1"), "finetune").read_batch(range(8))
    assert not torch.equal(x["rotations"], y["rotations"])
    assert not torch.equal(x["images"], y["images"])


def test_uniform_stream_poses_are_haar_distributed():
    # The rotation angle of a Haar rotation has density (1 - cos t) / pi: mean = pi/2 + 2/pi.
    from clerf.geometry import geodesic_distance

    src = stage_stream(_ft_cfg(), "finetune")
    from triplets.poses import seeded_generator

    R = src.poses.sample(20000, seeded_generator(0, 5))
    ang = torch.deg2rad(geodesic_distance(R.double(), torch.eye(3, dtype=torch.float64)))
    assert abs(float(ang.mean()) - (torch.pi / 2 + 2 / torch.pi)) < 0.02


def test_held_out_set_is_fixed_and_shares_no_identity_with_training():
    cfg = _ft_cfg()
    sections = dict(stream=cfg.finetune.stream, generator=cfg.generator, triplets=cfg.triplets)
    v1 = held_out_labelled(12, 1_000_003, **sections)
    v2 = held_out_labelled(12, 1_000_003, **sections)
    assert torch.equal(v1["images"], v2["images"]) and v1["images"].shape == (12, 3, 32, 32)
    train = stage_stream(cfg, "finetune").read_batch(range(12))
    # other seed and other identity range: no held-out image equals a training image
    assert not (v1["images"][:, None] == train["images"][None]).flatten(2).all(-1).any()


def test_a_stream_is_built_from_its_sections_alone():
    # the builder takes the sections it reads (plain dataclasses do), not the experiment tree;
    # the stage's stream (picked from a loaded config) is the same stream
    cfg = _ft_cfg()
    src = build_stream("labelled", stream=StreamConfig(enabled=True, epoch_size=64),
                       generator=GeneratorConfig(resolution=32),
                       triplets=TripletsConfig(poses="uniform"), seed=0)  # fmt: skip
    a, b = src.read_batch(range(8)), stage_stream(cfg, "finetune").read_batch(range(8))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["rotations"], b["rotations"])
    with pytest.raises(ValueError, match="kind must be one of"):
        build_stream("pairs", stream=StreamConfig(), generator=GeneratorConfig(),
                     triplets=TripletsConfig(), seed=0)  # fmt: skip


def test_loader_over_a_stream_yields_the_sampler_batches():
    cfg = _ft_cfg()
    src = stage_stream(cfg, "finetune")
    loader = make_training_loader(src, 8, seed=0, rank=1, world_size=2)
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 64 // 16
    # epoch 1, rank 1, micro 0: global batch (1 * 4 + 0) * 2 + 1 = 9 -> ids [72, 80)
    assert batches[0]["index"].tolist() == list(range(72, 80))
    assert torch.equal(batches[0]["images"], src.read_batch(range(72, 80))["images"])


def test_too_small_an_epoch_is_a_clear_error():
    from clerf.errors import DataError

    src = stage_stream(_ft_cfg(), "finetune")
    with pytest.raises(DataError, match="fewer than one batch"):
        make_training_loader(src, 64, seed=0, world_size=2)


def test_render_in_workers_equals_render_in_process():
    cfg = _ft_cfg()
    a = list(make_training_loader(stage_stream(cfg, "finetune"), 8, seed=0, num_workers=0))
    b = list(make_training_loader(stage_stream(cfg, "finetune"), 8, seed=0, num_workers=2))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["rotations"], y["rotations"])


# --------------------------------------------------------------------------- triplet stream


def test_triplet_stream_equals_the_store_clerf_generate_writes(tmp_path):
    from triplets.generate import run_generate
    from triplets.store import TripletDataset

    over = ["generator.resolution=16", "triplets.count=12", "triplets.poses=uniform",
            "triplets.sampling_block=5", "triplets.num_identities=50", "store.chunk_images=6",
            "seed=3", "pretrain.stream.enabled=true", "pretrain.stream.epoch_size=12"]
    cfg = load_config(None, over)
    stored = TripletDataset(run_generate(cfg, tmp_path / "t.h5", progress=False))
    src = stage_stream(cfg, "pretrain")
    for lo, hi in ((0, 12), (3, 9), (7, 8)):
        want, got = stored.read_batch(list(range(lo, hi))), src.read_batch(range(lo, hi))
        assert torch.equal(got["images"], want["images"]), (lo, hi)
        assert torch.allclose(got["rotations"], want["rotations"].float(), atol=1e-6)
        assert torch.equal(got["identities"], want["identities"].long())


def test_pretrain_streams_triplets(tmp_path):
    cfg = load_config(None, [
        "generator.resolution=32", "encoder.input_size=32", "encoder.embedding_dim=16",
        "encoder.projection_hidden=32", "triplets.poses=uniform", "triplets.num_identities=1000000",
        "pretrain.stream.enabled=true", "pretrain.stream.epoch_size=16",
        "pretrain.stream.val_size=12", "pretrain.val_size=12", "pretrain.train.batch_size=4",
        "pretrain.train.epochs=2", "pretrain.train.progress=false",
    ])  # fmt: skip
    summary = run_pretrain(cfg, tmp_path / "pre")
    assert summary["steps"] == 8 and summary["images_seen"] == 8 * 4 * 3
    assert "val/nn_geodesic_deg" in summary["evaluation"]
    info = json.loads((tmp_path / "pre" / "encoder" / "config.json").read_text())
    assert info["training"]["train_data"]["source"] == "stream"


def test_finetune_streams_and_records_the_source(tmp_path):
    summary = run_finetune(_ft_cfg(), tmp_path / "ft")
    assert summary["steps"] == 16 and summary["images_seen"] == 128
    assert summary["evaluation"]["val/geodesic_deg"] > 0
    meta = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    data = meta["training"]["train_data"]
    assert data["source"] == "stream" and data["generator"] == "procedural"
    assert data["epoch_size"] == 64


def test_stream_needs_no_store():
    task = FinetuneTask(_ft_cfg("finetune.train_store="))
    assert task.val_images.shape[0] == 16


# --------------------------------------------------------------------------- processes


def _env(**extra):
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _cli(out: Path, *extra: str) -> list[str]:
    return ["-m", "clerf", "finetune", str(REPO / "configs" / "full_range_cpu.yaml"), "--out",
            str(out), *TINY_FT, *extra]


@pytest.mark.slow
def test_kill_9_then_rerun_gives_bit_identical_weights(tmp_path):
    extra = ["finetune.train.epochs=3", "finetune.train.checkpoint_every=1",
             "finetune.stream.val_size=0"]  # fmt: skip
    ref = tmp_path / "ref"
    res = subprocess.run([sys.executable, *_cli(ref, *extra)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_cli(out, *extra)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    ck = out / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ck.glob("step_*") if (p / "loop_state.json").is_file()] \
            if ck.is_dir() else []  # fmt: skip
        if any(int(p.name[5:]) >= 5 for p in done):  # mid-epoch 0 of 3 (8 steps per epoch)
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(int(p.name[5:]) for p in ck.glob("step_*") if (p / "loop_state.json").is_file())
    assert 5 <= saved < 24
    res = subprocess.run([sys.executable, *_cli(out, *extra)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == saved and summary["steps"] == 24
    a = load_file(ref / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_process_streaming_is_deterministic(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    weights = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = subprocess.run([*launch, *_cli(out, "finetune.train.epochs=1")], cwd=REPO,
                             env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                             timeout=400)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2  # really two processes
        # 64 images per epoch / 2 ranks / batch 8 = 4 steps, each 2 x 8 images
        assert summary["steps"] == 4 and summary["images_seen"] == 64
        stats = summary["rank_param_stats"]
        assert len(stats) == 2 and stats[0] == stats[1]
        weights.append(load_file(out / "model" / "model.safetensors"))
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k

