"""The generate stage and CLI (triplets/generate.py, clerf generate): content, determinism,
resume after errors and after kill -9, existing-output policy, distributed shards."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from clerf.cli import main
from clerf.config import load_config
from clerf.errors import ConfigError, DataError
from clerf.geometry import geodesic_distance
from tests.test_triplets_helpers import ROOT, decode_identity_code, identity_code, small_config
from triplets.generate import run_generate, shard_ranges
from triplets.store import StoreWriter, TripletDataset, content_hash, open_store, store_state


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_generated_store_follows_the_triplet_rules(tmp_path):
    cfg = load_config(small_config(tmp_path))
    out = run_generate(cfg, tmp_path / "t.h5", progress=False)
    s = open_store(out, verify=True)
    assert s.num_triplets == 40 and s.resolution == 16 and s.attrs["num_shards"] == 1
    f = s.file
    imgs, ids, rots = f["images"][:], f["identities"][:], f["rotations"][:]
    # pixels say which identity was rendered: the stored labels belong to the images
    assert np.array_equal(decode_identity_code(imgs), identity_code(ids))
    R = torch.from_numpy(rots.astype(np.float64)).view(40, 3, 3, 3)
    i = ids.reshape(40, 3)
    assert (i[:, 1] != i[:, 0]).all() and (i[:, 2] == i[:, 0]).all()
    assert torch.equal(R[:, 0], R[:, 1])
    assert (geodesic_distance(R[:, 0], R[:, 2]) >= 40.0 - 1e-3).all()
    assert s.attrs["seed"] == 3 and "triplets:" in s.attrs["config_yaml"]
    assert s.attrs["sampling_block"] == 16


def test_same_config_same_content_and_seed_changes_it(tmp_path):
    cfg = load_config(small_config(tmp_path))
    a = run_generate(cfg, tmp_path / "a.h5", progress=False)
    b = run_generate(cfg, tmp_path / "b.h5", progress=False)
    assert content_hash(a) == content_hash(b)
    # the HDF5 chunk size changes the layout, not the data
    c = run_generate(load_config(small_config(tmp_path), ["store.chunk_images=6"]),
                     tmp_path / "c.h5", progress=False)
    assert content_hash(c) == content_hash(a)
    d = run_generate(load_config(small_config(tmp_path), ["seed=4"]), tmp_path / "d.h5",
                     progress=False)
    assert content_hash(d) != content_hash(a)


def test_write_error_mid_run_then_resume(tmp_path, monkeypatch):
    cfg = load_config(small_config(tmp_path))
    ref = run_generate(cfg, tmp_path / "ref.h5", progress=False)
    real = StoreWriter._write_arrays
    calls = {"n": 0}

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(StoreWriter, "_write_arrays", failing)
    out = tmp_path / "t.h5"
    with pytest.raises(DataError, match="No space left.*--resume"):
        run_generate(cfg, out, progress=False)
    monkeypatch.undo()
    assert store_state(out) == "partial"
    with pytest.raises(DataError, match="use --resume"):
        run_generate(cfg, out, progress=False)
    run_generate(cfg, out, resume=True, progress=False)
    assert content_hash(out) == content_hash(ref)


@pytest.mark.parametrize("bad", [
    ["generator.name=nosuch"], ["triplets.delta=500"], ["generator.name=eg3d",
                                                        "generator.params.network=untrusted.pkl"],
])
def test_failed_overwrite_leaves_the_old_store_unchanged(tmp_path, bad):
    cfg = small_config(tmp_path)
    out = tmp_path / "t.h5"
    assert main(["generate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    before = content_hash(out)
    (tmp_path / "untrusted.pkl").write_bytes(b"not a network")
    assert main(["generate", str(cfg), "--out", str(out), "--overwrite", "--no-progress",
                 *bad]) == 2
    assert store_state(out) == "complete" and content_hash(out) == before


def test_overwrite_failing_mid_write_keeps_the_old_store(tmp_path, monkeypatch):
    cfg = load_config(small_config(tmp_path))
    out = run_generate(cfg, tmp_path / "t.h5", progress=False)
    before = content_hash(out)
    monkeypatch.setattr(StoreWriter, "_write_arrays", lambda *a: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(DataError, match="No space left"):
        run_generate(load_config(small_config(tmp_path), ["seed=9"]), out, overwrite=True,
                     progress=False)
    monkeypatch.undo()
    assert content_hash(out) == before
    run_generate(load_config(small_config(tmp_path), ["seed=9"]), out, overwrite=True,
                 progress=False)  # a later --overwrite succeeds and leaves no temporary file
    assert content_hash(out) != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resume_with_other_config_is_refused(tmp_path, monkeypatch):
    cfg = load_config(small_config(tmp_path))
    out = tmp_path / "t.h5"
    monkeypatch.setattr(StoreWriter, "_write_arrays", lambda *a: (_ for _ in ()).throw(
        OSError(5, "Input/output error")))
    with pytest.raises(DataError):
        run_generate(cfg, out, progress=False)
    monkeypatch.undo()
    other = load_config(small_config(tmp_path), ["triplets.delta=50"])
    with pytest.raises(DataError, match=r"different configuration \(triplets.delta: 40.0 then"):
        run_generate(other, out, resume=True, progress=False)


def test_cli_generate_and_errors(tmp_path, capsys):
    cfg = small_config(tmp_path)
    out = tmp_path / "t.h5"
    # overrides may come after the options
    assert main(["generate", str(cfg), "--out", str(out), "--no-progress",
                 "triplets.count=10"]) == 0
    assert "wrote" in capsys.readouterr().out and open_store(out).num_triplets == 10
    assert main(["generate", str(cfg), "--out", str(out), "triplets.count=10"]) == 1
    err = capsys.readouterr().err
    assert "already exists and is complete; use --overwrite" in err and "Traceback" not in err
    assert main(["generate", str(cfg), "--out", str(out), "--overwrite", "--no-progress",
                 "triplets.count=12"]) == 0
    assert open_store(out).num_triplets == 12
    assert main(["generate", str(cfg), "--out", str(tmp_path / "x.h5"),
                 "triplets.delta=181"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "impossible" in err and "180" in err
    assert main(["generate", str(cfg), "--out", str(tmp_path / "x.h5"),
                 "store.chunk_images=10"]) == 2
    assert "multiple of 3" in capsys.readouterr().err
    assert main(["generate", str(cfg), "--out", str(tmp_path / "x.h5"), "--resume",
                 "--overwrite"]) == 2
    assert main(["generate", str(cfg), "--out", str(tmp_path / "x.h5"),
                 "generator.name=nosuch"]) == 2
    assert "unknown generator 'nosuch'" in capsys.readouterr().err
    assert main(["generate", str(cfg), "--out", str(tmp_path / "x.h5"),
                 "generator.resolution=7"]) == 2
    assert "generator.resolution must be an integer number of pixels in [16, 1024], got 7" in \
        capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_run_generate_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="triplets.count must be positive"):
        run_generate(load_config(small_config(tmp_path), ["triplets.count=0"]), tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="num_identities must be at least 2"):
        run_generate(load_config(small_config(tmp_path), ["triplets.num_identities=1"]),
                     tmp_path / "x.h5")


def test_shard_ranges_tile_and_align():
    for total, chunk, world in ((120, 12, 2), (120, 12, 3), (30, 12, 4), (9, 3, 5)):
        r = shard_ranges(total, chunk, world)
        assert r[0][0] == 0 and r[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(r, r[1:], strict=False))
        assert all(a % chunk == 0 for a, _ in r)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_equals_uninterrupted(tmp_path):
    cfg_path = small_config(tmp_path, triplets__count=120, generator__params={"delay": 0.04})
    ref = run_generate(load_config(cfg_path), tmp_path / "ref.h5", progress=False)
    out = tmp_path / "t.h5"
    cmd = [sys.executable, "-m", "clerf", "generate", str(cfg_path), "--out", str(out),
           "--no-progress"]
    rng = random.Random(0)
    partial_seen = 0
    for attempt in range(4):
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait for the file to appear, then kill after a random extra time
        t0 = time.time()
        while not out.exists() and proc.poll() is None and time.time() - t0 < 60:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.35))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = store_state(out)
        assert state in ("partial", "complete"), state
        if state == "partial":
            partial_seen += 1
            with pytest.raises(DataError, match="incomplete"):
                open_store(out)
    assert partial_seen >= 1
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert content_hash(out) == content_hash(ref)
    open_store(out, verify=True)


@pytest.mark.slow
def test_two_processes_write_shards_equal_to_one_process(tmp_path):
    cfg_path = small_config(tmp_path, triplets__count=20)
    ref = run_generate(load_config(cfg_path), tmp_path / "ref.h5", progress=False)
    out = tmp_path / "dist.h5"
    env = _env()
    env["ACCELERATE_USE_CPU"] = "1"
    port = str(29500 + random.Random(os.getpid()).randrange(2000))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "clerf", "generate", str(cfg_path), "--out", str(out), "--no-progress"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    s = open_store(out, verify=True)
    assert s.attrs["num_shards"] == 2 and s.attrs["world_size"] == 2  # really 2 processes
    with h5py.File(out, "r") as f:
        assert f["images"].is_virtual
    assert content_hash(out) == content_hash(ref)
    batch = TripletDataset(out).read_batch(np.arange(20))
    assert torch.equal(batch["images"], TripletDataset(ref).read_batch(np.arange(20))["images"])
    # a missing shard is reported, never read as zeros
    shard = next((tmp_path / "dist.h5.shards").glob("shard-00001-*.h5"))
    shard.rename(tmp_path / "moved.h5")
    with pytest.raises(DataError, match="shard file .* is missing"):
        open_store(out)
    (tmp_path / "moved.h5").rename(shard)
    # --overwrite under two processes: new shards written beside, then swapped in
    other = run_generate(load_config(cfg_path, ["seed=4"]), tmp_path / "other.h5", progress=False)
    run = subprocess.run(cmd + ["--overwrite", "seed=4"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert content_hash(out) == content_hash(other)
    assert open_store(out, verify=True).attrs["num_shards"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # ... and by one process: one file, the old shards gone
    run_generate(load_config(cfg_path), out, overwrite=True, progress=False)
    assert content_hash(out) == content_hash(ref) and not (tmp_path / "dist.h5.shards").exists()


def test_real_procedural_generator_if_available(tmp_path):
    pytest.importorskip("generators.procedural")
    cfg = load_config(small_config(tmp_path), [
        "generator.name=procedural", "generator.resolution=32", "triplets.count=4",
        "store.chunk_images=6"])
    out = run_generate(cfg, tmp_path / "p.h5", progress=False)
    s = open_store(out, verify=True)
    imgs = s.file["images"][:]
    assert imgs.shape == (12, 3, 32, 32) and imgs.std() > 5  # real renders, not blank
    R = torch.from_numpy(s.file["rotations"][:].astype(np.float64)).view(4, 3, 3, 3)
    assert (geodesic_distance(R[:, 0], R[:, 2]) >= 40.0 - 0.5).all()
