"""``clerf prepare``: fixtures -> labelled stores; oracle pipeline, counts, resume, CLI errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from fixtures_data import make_300wlp, make_aflw2000, make_biwi_npz
from PIL import Image

from clerf.cli import main
from clerf.config import load_config
from clerf.data.crop import crop_box, landmark_box
from clerf.data.mat import read_pose_mat
from clerf.errors import DataError
from clerf.geometry import rotation_from_euler
from triplets.store import LabelledDataset, content_hash, open_store


def _prepare(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["prepare", "--no-progress", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_aflw2000_store_matches_independent_pil_torchvision_pipeline(tmp_path, capsys):
    """Oracle: PIL open/convert/crop + torchvision Resize + CenterCrop, the peers' test route."""
    from torchvision import transforms

    fx = make_aflw2000(tmp_path / "AFLW2000", n=5, n_extreme=1)
    out = tmp_path / "aflw.h5"
    code, stdout, err = _prepare(capsys, "aflw2000", str(fx.root), "--out", str(out),
                                 "--resolution", "24")
    assert code == 0, err
    assert "scanned 5, kept 4, rejected by the protocol filter (|angles| <= 99 deg) 1" in err
    store = open_store(out, verify=True)
    assert store.attrs["kind"] == "labelled" and store.attrs["num_images"] == 4
    assert store.attrs["count_kept"] == 4 and store.attrs["count_rejected_angle"] == 1
    assert store.attrs["source_dataset"] == "aflw2000"
    assert store.attrs["crop_preset"] == "hopenet_test"
    assert store.attrs["crop_missing_landmarks"] == "peers"
    assert store.attrs["count_missing_landmarks"] == 2  # samples 0 and 2 have -1 landmarks
    assert json.loads(store.attrs["rejected_keys_json"]) == fx.rejected
    tf = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(24)])
    with h5py.File(out) as f:
        for i, fs in enumerate(fx.samples):
            assert f["source_key"][i].decode() == fs.key
            mat = read_pose_mat(fx.root / f"{fs.key}.mat")
            # HopeNet's AFLW2000 arithmetic on the raw pt2d, -1 entries included
            pt2d = scipy.io.loadmat(str(fx.root / f"{fs.key}.mat"))["pt2d"]
            x0, y0 = min(pt2d[0, :]), min(pt2d[1, :])
            x1, y1 = max(pt2d[0, :]), max(pt2d[1, :])
            k = 0.2
            bx0 = x0 - 2 * k * abs(x1 - x0)
            by0 = y0 - 2 * k * abs(y1 - y0)
            bx1 = x1 + 2 * k * abs(x1 - bx0)
            by1 = y1 + 0.6 * k * abs(y1 - by0)
            box = (int(bx0), int(by0), int(bx1), int(by1))
            assert tuple(f["crop_box"][i]) == box
            if i % 2 == 0:  # -1 landmarks: the peers' box reaches past the image's top-left
                assert box[0] < 0 and box[1] < 0
            np.testing.assert_allclose(f["dataset_euler"][i], mat.euler, rtol=0, atol=1e-12)
            pil = Image.open(fx.root / f"{fs.key}.jpg").convert("RGB").crop(box)
            want = np.asarray(tf(pil)).transpose(2, 0, 1)
            np.testing.assert_array_equal(f["images"][i], want)
            R = rotation_from_euler(*(torch.tensor(a, dtype=torch.float64) for a in mat.euler))
            np.testing.assert_allclose(f["rotations"][i], R.numpy(), atol=1e-6)
            np.testing.assert_allclose(f["euler"][i], mat.euler, atol=1e-3)
            assert f["identities"][i] == -1
    item = LabelledDataset(out)[0]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.uint8


def test_300wlp_train_store_k_boxes_identities_flip(tmp_path, capsys):
    fx = make_300wlp(tmp_path / "300W_LP", per_subset=2)
    out = tmp_path / "w.h5"
    code, _, err = _prepare(capsys, "300wlp", str(fx.root), "--out", str(out), "seed=7")
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["split"] == "train" and f.attrs["crop_preset"] == "hopenet_train"
        assert f.attrs["crop_k_seed"] == 7
        keys = [k.decode() for k in f["source_key"][:]]
        ks = f["crop_k"][:]
        assert ((ks >= 0.2) & (ks < 0.4)).all() and len(set(ks.tolist())) == len(ks)
        for i, key in enumerate(keys):
            pts = read_pose_mat(fx.root / f"{key}.mat").pt2d
            want = crop_box(landmark_box(pts), "hopenet_train", float(ks[i]))
            # stored k is float32; the box was computed with the float64 k
            assert np.abs(np.array(f["crop_box"][i]) - np.array(want)).max() <= 1
        ids = dict(zip(keys, f["identities"][:].tolist(), strict=True))
        per_subset = json.loads(f.attrs["counts_per_subset_json"])
    assert ids["HELEN/HELEN_100_1_0"] == ids["HELEN_Flip/HELEN_100_1_0"]  # same face
    assert ids["HELEN/HELEN_100_1_0"] != ids["HELEN/HELEN_101_1_1"]
    assert per_subset["AFW_Flip"]["rejected_angle"] == 1
    # the same seed gives the same crops; another seed other crops
    out2 = tmp_path / "w2.h5"
    assert _prepare(capsys, "300wlp", str(fx.root), "--out", str(out2), "seed=7")[0] == 0
    assert content_hash(out) == content_hash(out2)
    out3 = tmp_path / "w3.h5"
    assert _prepare(capsys, "300wlp", str(fx.root), "--out", str(out3), "seed=8")[0] == 0
    assert content_hash(out) != content_hash(out3)


def test_biwi_store_is_the_npz_in_rgb(tmp_path, capsys):
    images, pose = make_biwi_npz(tmp_path / "b.npz", n=4, size=32, extreme_row=None)
    out = tmp_path / "b.h5"
    code, _, err = _prepare(capsys, "biwi", str(tmp_path / "b.npz"), "--out", str(out),
                            "--resolution", "32")
    assert code == 0, err
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["images"][:], images[..., ::-1].transpose(0, 3, 1, 2))
        assert f.attrs["crop_preset"] == "none"
        np.testing.assert_allclose(f["euler"][:, 1], pose[:, 0], atol=1e-3)  # yaw
        assert json.loads(f.attrs["dataset_params"]) == {"signs": "fsanet", "channels": "bgr"}


def test_biwi_prepare_filters_only_when_asked(tmp_path, capsys):
    make_biwi_npz(tmp_path / "b.npz", n=5, size=16, extreme_row=2)  # row 2: yaw -100
    out = tmp_path / "whole.h5"
    code, _, err = _prepare(capsys, "biwi", str(tmp_path / "b.npz"), "--out", str(out),
                            "--resolution", "16")
    assert code == 0, err
    assert "kept 5" in err and "1 kept with an angle beyond +-99 deg" in err
    with h5py.File(out) as f:
        assert f.attrs["num_images"] == 5 and f.attrs["count_beyond_99_deg"] == 1
        assert f.attrs["protocol_max_abs_angle_deg"] == -1.0  # off
        np.testing.assert_allclose(f["dataset_euler"][2, 1], -100.0)  # yaw as in the .npz
    out2 = tmp_path / "filtered.h5"
    code, _, err = _prepare(capsys, "biwi", str(tmp_path / "b.npz"), "--out", str(out2),
                            "--resolution", "16", "prepare.biwi_filter=true")
    assert code == 0, err
    assert "kept 4, rejected by the protocol filter (|angles| <= 99 deg) 1" in err
    with h5py.File(out2) as f:
        assert f.attrs["num_images"] == 4 and f.attrs["count_beyond_99_deg"] == 1


def test_skip_bad_counts_are_stored(tmp_path, capsys):
    fx = make_300wlp(tmp_path / "L", per_subset=1, missing_mat=True, extreme=False)
    out = tmp_path / "s.h5"
    code, _, err = _prepare(capsys, "300wlp", str(fx.root), "--out", str(out))
    assert code == 1 and "IBUG_100_1_0.mat is missing" in err and not out.exists()
    code, _, err = _prepare(capsys, "300wlp", str(fx.root), "--out", str(out), "--skip-bad")
    assert code == 0 and "warning: skipped 1 bad file(s)" in err and "IBUG_100_1_0.jpg" in err
    with h5py.File(out) as f:
        assert f.attrs["count_skipped_bad"] == 1 and f.attrs["num_images"] == 7
        assert "IBUG_100_1_0.jpg" in f.attrs["skipped_bad_json"]


def test_interrupted_prepare_resumes_to_the_same_file(tmp_path, capsys, monkeypatch):
    import clerf.data.prepare as prep

    fx = make_300wlp(tmp_path / "L", per_subset=2, extreme=False)
    ref = tmp_path / "ref.h5"
    args = ["300wlp", str(fx.root), "--resolution", "16", "store.chunk_images=4"]
    assert _prepare(capsys, *args, "--out", str(ref))[0] == 0

    real = prep.process_sample
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 9:  # after two committed chunks of 4
            raise OSError("disk unplugged")
        return real(*a, **k)

    monkeypatch.setattr(prep, "process_sample", dying)
    out = tmp_path / "part.h5"
    code, _, err = _prepare(capsys, *args, "--out", str(out))
    assert code == 1 and "disk unplugged" in err
    monkeypatch.setattr(prep, "process_sample", real)
    with pytest.raises(DataError, match="incomplete"):
        open_store(out)
    code, _, err = _prepare(capsys, *args, "--out", str(out))
    assert code == 1 and "--resume" in err
    code, _, err = _prepare(capsys, *args, "--out", str(out), "--resume")
    assert code == 0, err
    assert content_hash(out) == content_hash(ref)
    open_store(out, verify=True)
    # a resume with other settings is refused, naming what differs
    code, _, err = _prepare(capsys, "300wlp", str(fx.root), "--resolution", "16",
                            "store.chunk_images=4", "--out", str(out), "--resume",
                            "--crop", "hopenet_test")
    assert code == 1 and "already exists and is complete" in err


def test_resume_with_different_config_is_refused(tmp_path, capsys, monkeypatch):
    import clerf.data.prepare as prep

    fx = make_aflw2000(tmp_path / "A", n=6, n_extreme=0)
    real = prep.process_sample
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("killed")
        return real(*a, **k)

    monkeypatch.setattr(prep, "process_sample", dying)
    out = tmp_path / "p.h5"
    base = ["aflw2000", str(fx.root), "--out", str(out), "store.chunk_images=2"]
    assert _prepare(capsys, *base)[0] == 1
    monkeypatch.setattr(prep, "process_sample", real)
    code, _, err = _prepare(capsys, *base, "--resume", "--crop", "train_rule_k02")
    assert code == 1 and "different configuration" in err and "crop" in err


def test_overwrite_and_existing_output(tmp_path, capsys):
    fx = make_aflw2000(tmp_path / "A", n=3, n_extreme=0)
    out = tmp_path / "o.h5"
    assert _prepare(capsys, "aflw2000", str(fx.root), "--out", str(out))[0] == 0
    code, _, err = _prepare(capsys, "aflw2000", str(fx.root), "--out", str(out))
    assert code == 1 and "already exists and is complete; use --overwrite" in err
    assert open_store(out).attrs["num_images"] == 3  # untouched
    code, _, err = _prepare(capsys, "aflw2000", str(fx.root), "--out", str(out), "--overwrite",
                            "--resolution", "16")
    assert code == 0 and open_store(out).attrs["resolution"] == 16


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["aflw2000", "{tmp}/nope"], 1, "AFLW2000 directory not found"),
        (["lfw", "{tmp}"], 1, "unknown dataset 'lfw'"),
        (["aflw2000", "{A}", "--crop", "tight"], 2, "prepare.crop: unknown crop preset 'tight'"),
        (["aflw2000", "{A}", "--resume", "--overwrite"], 2, "exclude each other"),
        (["aflw2000", "{A}", "prepare.resize=squash"], 2,
         "key 'prepare.resize': Invalid value 'squash', expected one of ['center'"),
        (["aflw2000", "{A}", "prepare.bogus=1"], 2, "prepare.bogus"),
        (["aflw2000", "{A}", "prepare.max_abs_angle=10"], 1, "no sample left"),
        (["aflw2000", "{A}", "prepare.subsets=[AFW]"], 2, "300wlp and pointing04 only"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, code, message):
    fx = make_aflw2000(tmp_path / "A", n=2, n_extreme=0)
    argv = [a.format(tmp=tmp_path, A=fx.root) for a in argv]
    got, stdout, err = _prepare(capsys, *argv, "--out", str(tmp_path / "x.h5"))
    assert got == code, err
    assert message in err
    assert err.strip().splitlines()[-1].startswith("clerf prepare: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "x.h5").exists()


def test_workers_give_the_same_store(tmp_path):
    from clerf.data.prepare import run_prepare

    fx = make_300wlp(tmp_path / "L", per_subset=2)
    hashes = []
    for w in (0, 2):
        cfg = load_config(None, ["prepare.dataset=300wlp", f"prepare.root={fx.root}",
                                 f"prepare.workers={w}", "prepare.resolution=16"])
        res = run_prepare(cfg, tmp_path / f"w{w}.h5")
        assert res.num_images == 14
        hashes.append(content_hash(res.path))
    assert hashes[0] == hashes[1]
