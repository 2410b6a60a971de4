"""Pointing'04 loader on fixtures in its exact on-disk format: names, boxes, labels, split."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
from fixtures_data import make_pointing04, pointing04_stem, write_pointing04_box
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.spatial.transform import Rotation

from clerf.cli import main
from clerf.data import open_dataset
from clerf.data.crop import crop_box, get_preset
from clerf.data.pointing04 import (
    POINTING04_SPLITS,
    parse_pointing04_name,
    pointing04_rotation,
    read_pointing04_box,
)
from clerf.errors import DataError
from clerf.geometry import euler_from_rotation, rotation_from_euler
from triplets.store import open_store

TILTS = (-90, -60, -30, -15, 0, 15, 30, 60, 90)


def test_file_names_parse_as_distributed():
    assert parse_pointing04_name("person01100-90+0") == (1, 1, 0, -90.0, 0.0)
    assert parse_pointing04_name("person01146+0+0") == (1, 1, 46, 0.0, 0.0)
    assert parse_pointing04_name("person15291+60+90") == (15, 2, 91, 60.0, 90.0)
    # the fixture writer's pose numbering is Pointing'04's own (checked on the real file list)
    assert pointing04_stem(1, 1, -60, -90) == "person01101-60-90"
    assert pointing04_stem(1, 1, 0, 45) == "person01149+0+45"
    assert pointing04_stem(1, 2, 90, 0) == "person01292+90+0"
    for bad in ("person0110-90+0", "image00002", "person01146+0+7", "person01146+45+0",
                "person01100-90+15"):
        with pytest.raises(DataError, match="Pointing'04"):
            parse_pointing04_name(bad)


def test_label_is_the_gaze_direction_at_the_extremes():
    """tilt/pan = elevation/azimuth of the target: the facing axis (row 2) points there."""
    R = pointing04_rotation(60.0, 90.0)
    # face to the image's left (pan > 0, like clerf's positive yaw) and up (tilt > 0)
    np.testing.assert_allclose(R[2].numpy(), [-0.5, np.sqrt(3) / 2, 0.0], atol=1e-12)
    np.testing.assert_allclose(R[0].numpy(), [0.0, 0.0, 1.0], atol=1e-12)  # left-right axis level
    e = euler_from_rotation(R)
    np.testing.assert_allclose([float(e.pitch), float(e.yaw), float(e.roll)], [90, 30, 90],
                               atol=1e-9)  # not pitch = tilt, yaw = pan
    np.testing.assert_allclose(pointing04_rotation(-90.0, 0.0)[2].numpy(), [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(pointing04_rotation(90.0, 0.0)[2].numpy(), [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(pointing04_rotation(0.0, -90.0)[2].numpy(), [1, 0, 0], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TILTS), st.integers(-6, 6))
def test_label_matches_scipy_oracle_and_spherical_direction(tilt, step):
    pan = 15 * step
    R = pointing04_rotation(float(tilt), float(pan)).numpy()
    oracle = Rotation.from_euler("XY", [tilt, pan], degrees=True).as_matrix()  # intrinsic x, y
    np.testing.assert_allclose(R, oracle, atol=1e-12)
    t, p = np.deg2rad(tilt), np.deg2rad(pan)
    facing = [-np.cos(t) * np.sin(p), np.sin(t), np.cos(t) * np.cos(p)]
    np.testing.assert_allclose(R[2], facing, atol=1e-12)
    assert abs(R[0, 1]) < 1e-12  # no roll of the head against the vertical
    if tilt == 0:  # on the frontal row pan is clerf's yaw, at pan 0 tilt is its pitch
        want = rotation_from_euler(torch.tensor(0.0, dtype=torch.float64), float(pan), 0.0)
        np.testing.assert_allclose(R, want.numpy(), atol=1e-12)
    if pan == 0:
        want = rotation_from_euler(torch.tensor(float(tilt), dtype=torch.float64), 0.0, 0.0)
        np.testing.assert_allclose(R, want.numpy(), atol=1e-12)


def test_scan_reads_boxes_identities_and_labels(tmp_path):
    boxes = make_pointing04(tmp_path, people=(1, 11, 13), series=(1, 2))
    ds = open_dataset("pointing04", tmp_path)
    assert len(ds) == 3 * 2 * 4 and ds.report.kept == 24 and ds.report.rejected_angle == 0
    assert ds.report.max_abs_angle is None  # all 93 poses kept, no filter
    by_key = {s.key: s for s in ds.samples}
    assert set(by_key) == set(boxes)
    for key, s in by_key.items():
        assert s.box == pytest.approx(boxes[key])
        assert s.identity == int(key[6:8]) and s.subset == key[:8]
        _, _, _, tilt, pan = parse_pointing04_name(key.split("/")[1])
        R = rotation_from_euler(*(torch.tensor(a, dtype=torch.float64) for a in s.euler))
        np.testing.assert_allclose(R.numpy(), pointing04_rotation(tilt, pan).numpy(), atol=1e-9)


def test_fixed_subject_split(tmp_path):
    assert POINTING04_SPLITS == {"train": tuple(range(1, 11)), "val": (11, 12),
                                 "test": (13, 14, 15)}
    make_pointing04(tmp_path, people=(1, 11, 13))
    for subsets, people in ((["train"], {1}), (["val"], {11}), (["test"], {13}),
                            (["Person01", "test"], {1, 13})):
        ds = open_dataset("pointing04", tmp_path, subsets=subsets)
        assert {s.identity for s in ds.samples} == people, subsets
        assert len(ds) == 4 * len(people)
    with pytest.raises(DataError, match="unknown subset 'Person16'"):
        open_dataset("pointing04", tmp_path, subsets=["Person16"])
    with pytest.raises(DataError, match="Person02"):  # asked for, not on disk
        open_dataset("pointing04", tmp_path, subsets=["Person01", "Person02"])


def test_bad_files_are_named(tmp_path):
    make_pointing04(tmp_path, people=(1,))
    folder = tmp_path / "Person01"
    stem = pointing04_stem(1, 1, 0, 0)
    (folder / f"{stem}.txt").write_text(f"{stem}.jpg\n\nFace\n10\n", encoding="ascii")
    with pytest.raises(DataError, match=re.escape(f"{stem}.txt: expected the face box")):
        open_dataset("pointing04", tmp_path)
    ds = open_dataset("pointing04", tmp_path, skip_bad=True)
    assert len(ds) == 3 and ds.report.skipped_bad == 1
    write_pointing04_box(folder / f"{stem}.txt", 10, 10, 0, 5)
    with pytest.raises(DataError, match="width and height must be positive"):
        read_pointing04_box(folder / f"{stem}.txt")
    (folder / f"{stem}.txt").unlink()
    missing = re.escape(f"{stem}.jpg: face box file {stem}.txt is missing")
    with pytest.raises(DataError, match=missing):
        open_dataset("pointing04", tmp_path)
    with pytest.raises(DataError, match="no Pointing'04 person folder"):
        open_dataset("pointing04", tmp_path / "Person01")


def test_prepare_store_crops_the_box_and_keeps_the_person(tmp_path, capsys):
    boxes = make_pointing04(tmp_path / "P", people=(1, 13))
    out = tmp_path / "p.h5"
    code = main(["prepare", "--no-progress", "pointing04", str(tmp_path / "P"), "--out", str(out),
                 "--resolution", "24", "prepare.subsets=[Person01,Person13]"])
    err = capsys.readouterr().err
    assert code == 0, err
    store = open_store(out, verify=True)
    assert store.attrs["num_images"] == 8 and store.attrs["crop_preset"] == "pointing04_box"
    preset = get_preset("pointing04_box")
    with h5py.File(out) as f:
        for i in range(8):
            key = f["source_key"][i].decode()
            assert f["identities"][i] == int(key[6:8])
            box = crop_box(boxes[key], preset, 0.2)
            assert tuple(f["crop_box"][i]) == box
            assert box[2] - box[0] > boxes[key][2] - boxes[key][0]  # the margin grows the box
            img = Image.open(tmp_path / "P" / f"{key}.jpg").convert("RGB")
            assert f["images"][i].shape == (3, 24, 24) and img.size == (96, 72)


def test_label_budget_is_balanced_nested_and_seeded(tmp_path):
    from clerf.data.prepare import select_budget

    make_pointing04(tmp_path, people=(1, 2, 3), series=(1, 2))
    samples = open_dataset("pointing04", tmp_path).samples  # 3 people x 8 images
    b5 = select_budget(samples, 5, seed=0)
    b9 = select_budget(samples, 9, seed=0)
    assert len(b5) == 5 and len(b9) == 9
    counts = [sum(s.identity == p for s in b9) for p in (1, 2, 3)]
    assert counts == [3, 3, 3]  # evenly over the people
    assert max(sum(s.identity == p for s in b5) for p in (1, 2, 3)) == 2
    assert {s.key for s in b5} <= {s.key for s in b9}  # a smaller budget is nested
    assert [s.key for s in b9] == [s.key for s in samples if s in b9]  # order kept
    assert select_budget(samples, 9, seed=0) == b9
    assert select_budget(samples, 9, seed=1) != b9
    assert select_budget(samples, 100, seed=0) == samples


def test_prepare_with_a_label_budget(tmp_path, capsys):
    make_pointing04(tmp_path / "P", people=(1, 2), series=(1, 2))
    out = tmp_path / "b.h5"
    code = main(["prepare", "--no-progress", "pointing04", str(tmp_path / "P"), "--out", str(out),
                 "--resolution", "16", "--split", "train", "prepare.max_images=6"])
    err = capsys.readouterr().err
    assert code == 0, err
    store = open_store(out, verify=True)
    assert store.attrs["num_images"] == 6 and store.attrs["budget_max_images"] == 6
    assert store.attrs["budget_of_kept"] == 16
    with h5py.File(out) as f:
        assert sorted(f["identities"][:].tolist()) == [1, 1, 1, 2, 2, 2]
    code = main(["prepare", "--no-progress", "pointing04", str(tmp_path / "P"), "--out",
                 str(tmp_path / "c.h5"), "prepare.max_images=-1"])
    assert code != 0 and "prepare.max_images" in capsys.readouterr().err
