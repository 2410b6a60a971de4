"""Real-anchor triplets: real anchors referenced (not copied), positives rendered at their pose."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fixtures_data import make_300wlp

from clerf.config import load_config
from clerf.data.prepare import run_prepare
from clerf.errors import ConfigError, DataError
from clerf.geometry import euler_from_rotation, geodesic_distance
from generators.base import PoseGenerator, Rendered
from triplets.real_anchor import rendered_path, run_real_anchor
from triplets.store import TripletDataset, content_hash, open_store


class PoseCodeGenerator(PoseGenerator):
    """Deterministic test generator: pixels encode the identity and the rotation's first row."""

    def render(self, identities, rotations, resolution):
        b = len(identities)
        img = torch.zeros(b, 3, resolution, resolution, dtype=torch.uint8)
        img[:, 0] = (identities % 251).to(torch.uint8)[:, None, None]
        code = ((rotations[:, 0, :] + 1) * 100).round().to(torch.uint8)  # (B, 3)
        img[:, 1, 0, :3] = code
        return Rendered(img, rotations.to(torch.float32))


class YawLimitedGenerator(PoseCodeGenerator):
    """Like EG3D: only |yaw| <= 22 deg is renderable."""

    def reachable(self, rotations):
        return euler_from_rotation(rotations.double()).yaw.abs() <= 22.0


class LyingGenerator(PoseCodeGenerator):
    """Reports a rotation 10 deg off the one asked for (a broken adapter)."""

    def render(self, identities, rotations, resolution):
        out = super().render(identities, rotations, resolution)
        from clerf.geometry import rot_z

        return Rendered(out.images, out.rotations @ rot_z(torch.tensor(10.0)).to(torch.float32))


GEN = "test_triplets_real_anchor:PoseCodeGenerator"


def _real_store(tmp_path: Path) -> Path:
    fx = make_300wlp(tmp_path / "L", per_subset=2)
    cfg = load_config(None, ["prepare.dataset=300wlp", f"prepare.root={fx.root}",
                             "prepare.resolution=16"])
    return run_prepare(cfg, tmp_path / "real.h5").path


def _cfg(*extra: str):
    return load_config(None, [f"generator.name={GEN}", "triplets.delta=40",
                              "triplets.negatives=uniform", "triplets.sampling_block=4",
                              "store.chunk_images=6", *extra])


def test_real_anchor_store_structure_and_rules(tmp_path):
    real = _real_store(tmp_path)
    res = run_real_anchor(_cfg(), real, tmp_path / "ra.h5")
    assert res.num_triplets == 14 and res.unreachable == 0
    store = open_store(res.path, verify=True)  # checks both source files and their digests
    assert store.kind == "triplets" and store.num_triplets == 14
    ds = TripletDataset(res.path)
    with h5py.File(real) as fr, h5py.File(res.path) as fe:
        assert fe["images"].is_virtual  # the real images are referenced, not copied
        files = {Path(v.file_name).name for v in fe["images"].virtual_sources()}
        assert files == {"real.h5", "ra.h5.rendered.h5"}
        real_imgs, real_rots = fr["images"][:], fr["rotations"][:]
    batch = ds.read_batch(np.arange(14))
    for j in range(14):
        np.testing.assert_array_equal(batch["images"][j, 0].numpy(), real_imgs[j])  # anchor
        torch.testing.assert_close(batch["rotations"][j, 0], torch.from_numpy(real_rots[j]))
    R = batch["rotations"].double()
    assert float(geodesic_distance(R[:, 0], R[:, 1]).max()) < 0.05  # positive at the anchor's R
    assert float(geodesic_distance(R[:, 0], R[:, 2]).min()) >= 40 - 1e-3  # negative >= delta
    ids = batch["identities"]
    assert (ids[:, 1] == ids[:, 2]).all()  # hard negatives: the render pair differs in pose only
    # the positive image really was rendered at the anchor's rotation (pixel code)
    code = batch["images"][:, 1, 1, 0, :3].float() / 100 - 1
    torch.testing.assert_close(code, R[:, 0, 0, :].float(), atol=0.011, rtol=0)


def test_real_anchor_deterministic_and_resumable(tmp_path, monkeypatch):
    real = _real_store(tmp_path)
    ref = run_real_anchor(_cfg(), real, tmp_path / "ref.h5")
    calls = {"n": 0}
    real_render = PoseCodeGenerator.render

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("power cut")
        return real_render(self, *a, **k)

    monkeypatch.setattr(PoseCodeGenerator, "render", dying)
    out = tmp_path / "ra.h5"
    with pytest.raises(OSError, match="power cut"):
        run_real_anchor(_cfg(), real, out)
    monkeypatch.setattr(PoseCodeGenerator, "render", real_render)
    assert not out.exists() and rendered_path(out).exists()
    with pytest.raises(DataError, match="--resume"):
        run_real_anchor(_cfg(), real, out)
    run_real_anchor(_cfg(), real, out, resume=True)
    assert content_hash(out) == content_hash(ref.path)
    with pytest.raises(DataError, match="already exists and is complete"):
        run_real_anchor(_cfg(), real, out)
    calls["n"] = 0
    monkeypatch.setattr(PoseCodeGenerator, "render", dying)
    with pytest.raises(OSError, match="power cut"):  # a failed --overwrite loses nothing
        run_real_anchor(_cfg("seed=3"), real, out, overwrite=True)
    monkeypatch.setattr(PoseCodeGenerator, "render", real_render)
    assert content_hash(out) == content_hash(ref.path)
    with pytest.raises(ConfigError):
        run_real_anchor(_cfg("triplets.delta=500"), real, out, overwrite=True)
    assert content_hash(out) == content_hash(ref.path)
    other = run_real_anchor(_cfg("seed=3"), real, out, overwrite=True)
    assert content_hash(other.path) != content_hash(ref.path)


def test_anchor_repeats_tile_the_anchors_with_new_renders(tmp_path):
    real = _real_store(tmp_path)
    one = run_real_anchor(_cfg(), real, tmp_path / "one.h5")
    res = run_real_anchor(_cfg("triplets.anchor_repeats=3"), real, tmp_path / "three.h5")
    assert res.num_triplets == 3 * one.num_triplets == 42
    table = open_store(res.path).triplet_table()
    np.testing.assert_array_equal(table[:, 0], np.tile(np.arange(14), 3))  # tiled passes
    batch = TripletDataset(res.path).read_batch(np.arange(42))
    R, ids = batch["rotations"].double(), batch["identities"]
    assert float(geodesic_distance(R[:, 0], R[:, 1]).max()) < 0.05
    assert float(geodesic_distance(R[:, 0], R[:, 2]).min()) >= 40 - 1e-3
    # each pass over an anchor brings its own rendered identity (not a copy of the first pass)
    assert (ids[:14, 1] != ids[14:28, 1]).any() and (ids[14:28, 1] != ids[28:, 1]).any()
    with h5py.File(res.path) as f:
        assert int(f.attrs["anchor_repeats"]) == 3
    with pytest.raises(ConfigError, match="anchor_repeats"):
        run_real_anchor(_cfg("triplets.anchor_repeats=0"), real, tmp_path / "zero.h5")


def test_unreachable_anchors_are_counted(tmp_path, caplog):
    real = _real_store(tmp_path)
    cfg = _cfg("generator.name=test_triplets_real_anchor:YawLimitedGenerator")
    res = run_real_anchor(cfg, real, tmp_path / "ra.h5")
    with h5py.File(real) as f:
        yaw = np.abs(f["euler"][:, 1])
    assert res.unreachable == int((yaw > 22).sum()) > 0
    assert res.num_triplets == int((yaw <= 22).sum())
    assert "outside what generator" in caplog.text
    table = open_store(res.path).triplet_table()
    assert (yaw[table[:, 0]] <= 22).all()


def test_errors(tmp_path):
    real = _real_store(tmp_path)
    cfg = _cfg("generator.name=test_triplets_real_anchor:LyingGenerator")
    with pytest.raises(DataError, match="away from its real anchor's rotation"):
        run_real_anchor(cfg, real, tmp_path / "a.h5")
    with pytest.raises(ConfigError, match="impossible"):
        run_real_anchor(_cfg("triplets.delta=200"), real, tmp_path / "b.h5")
    with pytest.raises(DataError, match="store not found"):
        run_real_anchor(_cfg(), tmp_path / "none.h5", tmp_path / "c.h5")


@pytest.mark.slow
def test_procedural_generator_real_anchor(tmp_path):
    pytest.importorskip("generators.procedural")
    real = _real_store(tmp_path)
    cfg = load_config(None, ["generator.name=procedural", "triplets.delta=30",
                             "store.chunk_images=8"])
    res = run_real_anchor(cfg, real, tmp_path / "p.h5")
    batch = TripletDataset(res.path).read_batch(np.arange(res.num_triplets))
    R = batch["rotations"].double()
    assert float(geodesic_distance(R[:, 0], R[:, 1]).max()) < POS_TOL
    assert batch["images"][:, 1].float().std() > 5  # something was drawn


POS_TOL = 0.5


def test_cli_real_anchor(tmp_path, capsys):
    from clerf.cli import main

    real = _real_store(tmp_path)
    out = tmp_path / "cli.h5"
    code = main(["real-anchor", str(real), "--out", str(out), "--no-progress",
                 f"generator.name={GEN}", "store.chunk_images=6"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "wrote 14 real-anchor triplets" in cap.out
    code = main(["real-anchor", str(real), "--out", str(out), "--no-progress",
                 f"generator.name={GEN}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("clerf real-anchor: error:") and "--overwrite" in err
    code = main(["real-anchor", str(tmp_path / "nope.h5"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "store not found" in err and "Traceback" not in err
    # with the progress bar on, a bad input is still the one line alone (no bar drawn first)
    code = main(["real-anchor", str(tmp_path / "nope.h5"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("clerf real-anchor: error:")
