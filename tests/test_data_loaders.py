"""Real-data loaders on fixtures written in the exact formats (300W-LP, AFLW2000, BIWI .npz)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from fixtures_data import (
    make_300wlp,
    make_aflw2000,
    make_biwi_npz,
    write_jpg,
    write_pose_mat,
)
from scipy.spatial.transform import Rotation

from clerf.data import open_dataset, rotations_of, within_protocol
from clerf.data.base import dataset_class
from clerf.data.biwi import biwi_rotation_from_raw
from clerf.data.mat import read_pose_mat, read_rgb_image
from clerf.errors import DataError
from clerf.geometry import hflip_rotation, rotation_from_euler

# --------------------------------------------------------------------------- .mat and images


def test_read_pose_mat_radians_to_degrees(tmp_path):
    pts = np.arange(136, dtype=np.float64).reshape(2, 68)
    p = write_pose_mat(tmp_path / "a.mat", 12.5, -40.0, 7.25, pt2d=pts)
    m = read_pose_mat(p)
    assert m.euler == pytest.approx((12.5, -40.0, 7.25), abs=1e-4)  # float32 in the file
    np.testing.assert_array_equal(m.pt2d, pts)


def test_read_pose_mat_errors_name_the_file(tmp_path):
    p = write_pose_mat(tmp_path / "nopose.mat", 0, 0, 0, pt2d=np.zeros((2, 68)), with_pose=False)
    with pytest.raises(DataError, match=r"nopose\.mat: no 'Pose_Para'.*Shape_Para"):
        read_pose_mat(p)
    with pytest.raises(DataError, match=r"missing\.mat: label file not found"):
        read_pose_mat(tmp_path / "missing.mat")
    (tmp_path / "junk.mat").write_bytes(b"this is not matlab")
    with pytest.raises(DataError, match=r"junk\.mat: not a readable MATLAB"):
        read_pose_mat(tmp_path / "junk.mat")
    short = {"Pose_Para": np.zeros((1, 2)), "pt2d": np.zeros((2, 3))}
    scipy.io.savemat(tmp_path / "short.mat", short)
    with pytest.raises(DataError, match=r"short\.mat: 'Pose_Para' has 2 values"):
        read_pose_mat(tmp_path / "short.mat")
    scipy.io.savemat(tmp_path / "nopts.mat", {"Pose_Para": np.zeros((1, 7))})
    with pytest.raises(DataError, match=r"nopts\.mat: no 'pt2d'"):
        read_pose_mat(tmp_path / "nopts.mat")
    assert read_pose_mat(tmp_path / "nopts.mat", need_landmarks=False).pt2d is None


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    p = write_jpg(tmp_path / "g.jpg", 20, 30, gray=True)
    img = read_rgb_image(p)
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_unreadable_and_truncated_images(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DataError, match=r"x\.jpg: unreadable image"):
        read_rgb_image(tmp_path / "x.jpg")
    good = write_jpg(tmp_path / "t.jpg", 64, 64).read_bytes()
    (tmp_path / "t.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"t\.jpg: unreadable image"):
        read_rgb_image(tmp_path / "t.jpg")


# --------------------------------------------------------------------------- labels -> rotation


def test_label_to_rotation_matches_scipy_oracle(tmp_path):
    """One sample through the whole loader; oracle: scipy's intrinsic-free 'xyz' composition.

    scipy ``from_euler('xyz', [pitch, yaw, roll])`` (lower case = extrinsic) is
    ``Rz(roll) @ Ry(yaw) @ Rx(pitch)``, the canonical matrix of docs/conventions.md section 1.
    """
    fx = make_aflw2000(tmp_path / "A", n=2, n_extreme=0)
    ds = open_dataset("aflw2000", fx.root)
    s = ds.samples[0]
    R = rotations_of([s], dtype=torch.float64)[0].numpy()
    want = Rotation.from_euler("xyz", list(fx.samples[0].euler), degrees=True).as_matrix()
    np.testing.assert_allclose(R, want, atol=1e-6)


def test_within_protocol_is_inclusive_and_rejects_nan():
    assert within_protocol((99.0, -99.0, 0.0), 99.0)
    assert not within_protocol((99.0001, 0.0, 0.0), 99.0)
    assert not within_protocol((math.nan, 0.0, 0.0), 99.0)
    assert within_protocol((150.0, 0.0, 0.0), None)


# --------------------------------------------------------------------------- 300W-LP


def test_300wlp_scan_filter_counts_and_flip_folders(tmp_path, caplog):
    fx = make_300wlp(tmp_path / "300W_LP", per_subset=2)
    with caplog.at_level(logging.INFO, logger="clerf.data"):
        ds = open_dataset("300W-LP", fx.root)
    r = ds.report
    assert (r.scanned, r.kept, r.rejected_angle, r.skipped_bad) == (16, 14, 2, 0)
    assert "scanned 16, kept 14" in caplog.text and "rejected by the protocol filter" in caplog.text
    assert sorted(r.rejected_keys) == sorted(fx.rejected)
    assert [s.key for s in ds.samples] == [s.key for s in fx.samples]  # scan order = fixture order
    assert r.per_subset["AFW"] == {"scanned": 2, "kept": 1, "rejected_angle": 1, "skipped_bad": 0}
    for got, want in zip(ds.samples, fx.samples, strict=True):
        assert got.euler == pytest.approx(want.euler, abs=1e-4)
    # _Flip labels are read as they are: the flipped twin's matrix is F R F of the original's,
    # i.e. exactly one mirror (a second flip would give back R).
    by_key = {s.key: s for s in ds.samples}
    R = rotations_of([by_key["HELEN/HELEN_101_1_1"]], torch.float64)
    Rf = rotations_of([by_key["HELEN_Flip/HELEN_101_1_1"]], torch.float64)
    torch.testing.assert_close(Rf, hflip_rotation(R), atol=1e-5, rtol=0)
    # ... and the _Flip image is read unmirrored from disk: it equals the mirrored original
    a = ds.load_image(by_key["LFPW/LFPW_100_1_0"]).astype(int)
    b = ds.load_image(by_key["LFPW_Flip/LFPW_100_1_0"]).astype(int)
    assert np.abs(a[:, ::-1] - b).mean() < 3 and np.abs(a - b).mean() > 10


def test_300wlp_grayscale_sample_loads_as_rgb(tmp_path):
    fx = make_300wlp(tmp_path / "L", per_subset=1, extreme=False)
    ds = open_dataset("300wlp", fx.root)
    gray = next(s for s in ds.samples if s.key.startswith("HELEN/"))
    img = ds.load_image(gray)
    assert img.shape[2] == 3 and (img[..., 0] == img[..., 2]).all()


def test_300wlp_missing_mat_is_an_error_or_counted_skip(tmp_path, caplog):
    fx = make_300wlp(tmp_path / "L", per_subset=2, missing_mat=True)
    with pytest.raises(DataError, match=r"IBUG_100_1_0\.jpg: label file IBUG_100_1_0\.mat is miss"):
        open_dataset("300wlp", fx.root)
    with caplog.at_level(logging.WARNING, logger="clerf.data"):
        ds = open_dataset("300wlp", fx.root, skip_bad=True)
    assert ds.report.skipped_bad == 1 and ds.report.kept == 13
    assert ds.report.bad[0][0].endswith("IBUG_100_1_0.jpg")
    assert "skipped 1 bad file(s)" in caplog.text  # never silently


def test_300wlp_bad_mat_and_bad_image_with_skip(tmp_path):
    fx = make_300wlp(tmp_path / "L", per_subset=2, extreme=False)
    (fx.root / "AFW" / "AFW_101_1_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"AFW_101_1_1\.jpg: unreadable image \(cannot identify"):
        open_dataset("300wlp", fx.root)
    write_pose_mat(fx.root / "AFW" / "AFW_100_1_0.mat", 0, 0, 0, np.zeros((2, 68)), False)
    with pytest.raises(DataError, match=r"AFW_100_1_0\.mat: no 'Pose_Para'"):
        open_dataset("300wlp", fx.root)
    ds = open_dataset("300wlp", fx.root, skip_bad=True)
    reasons = list(dict(ds.report.bad).values())
    assert len(reasons) == 2 and ds.report.kept == 14 and ds.report.skipped_bad == 2
    assert "no 'Pose_Para'" in reasons[0] and "unreadable image" in reasons[1]
    assert ds.report.scanned == ds.report.kept + ds.report.rejected_angle == 14


def test_300wlp_layout_errors(tmp_path):
    with pytest.raises(DataError, match="300W-LP directory not found"):
        open_dataset("300wlp", tmp_path / "nope")
    (tmp_path / "W" / "AFW").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing subset folder\(s\) AFW_Flip, HELEN.*found.*AFW"):
        open_dataset("300wlp", tmp_path / "W")
    with pytest.raises(DataError, match="no .jpg/.mat pairs"):
        open_dataset("300wlp", tmp_path / "W", subsets=["AFW"])
    with pytest.raises(DataError, match="unknown subset"):
        dataset_class("300wlp")(tmp_path, subsets=["XYZ"])
    with pytest.raises(DataError, match="unknown dataset 'lfw'.*300wlp, aflw2000, biwi"):
        dataset_class("lfw")


# --------------------------------------------------------------------------- AFLW2000


def test_aflw2000_filter_missing_landmarks_and_gray(tmp_path, caplog):
    fx = make_aflw2000(tmp_path / "AFLW2000", n=6, n_extreme=2)
    with caplog.at_level(logging.WARNING, logger="clerf.data"):
        ds = open_dataset("aflw2000", fx.root)
    assert (ds.report.scanned, ds.report.kept, ds.report.rejected_angle) == (6, 4, 2)
    assert "the full set has 2000" in caplog.text
    assert ds.report.rejected_keys == fx.rejected
    s0 = ds.samples[0]
    assert (s0.pt2d == -1).any()  # missing landmarks are kept as -1 in the sample ...
    from clerf.data.crop import landmark_box

    assert landmark_box(s0.pt2d) == pytest.approx(fx.samples[0].box)  # ... and excluded here
    assert ds.load_image(ds.samples[1]).shape == (48, 48, 3)  # the grayscale one


def test_aflw2000_empty_dir(tmp_path):
    (tmp_path / "E").mkdir()
    with pytest.raises(DataError, match="no AFLW2000 pairs"):
        open_dataset("aflw2000", tmp_path / "E")


# --------------------------------------------------------------------------- BIWI


def test_biwi_npz_signs_channels_and_filter(tmp_path):
    images, pose = make_biwi_npz(tmp_path / "biwi.npz", n=5, extreme_row=2)
    # BIWI is evaluated whole: the +-99 filter only when asked, the count logged either way
    ds = open_dataset("biwi", tmp_path / "biwi.npz")
    assert (ds.report.scanned, ds.report.kept, ds.report.rejected_angle) == (5, 5, 0)
    assert ds.report.beyond_protocol == 1
    assert "5 kept, " not in ds.report.summary()
    assert "1 kept with an angle beyond +-99 deg" in ds.report.summary()
    asked = open_dataset("biwi", tmp_path / "biwi.npz", max_abs_angle=99.0)
    assert (asked.report.kept, asked.report.rejected_angle, asked.report.beyond_protocol) == (
        4, 1, 1)
    s = ds.samples[1]
    assert s.row == 1 and s.key == "BIWI/000001"
    yaw, pitch, roll = pose[1]
    assert s.euler == (pitch, yaw, roll)  # fsanet: no sign change, (yaw, pitch, roll) reordered
    np.testing.assert_array_equal(ds.load_image(s), images[1][..., ::-1])  # BGR -> RGB
    rgb = open_dataset("biwi", tmp_path / "biwi.npz", channels="rgb")
    np.testing.assert_array_equal(rgb.load_image(rgb.samples[1]), images[1])
    mirrored = open_dataset("biwi", tmp_path / "biwi.npz", signs="mirrored")
    assert mirrored.samples[1].euler == (pitch, -yaw, -roll)
    torch.testing.assert_close(
        rotations_of(mirrored.samples, torch.float64),
        hflip_rotation(rotations_of(ds.samples, torch.float64)),
    )


def test_biwi_fsanet_reading_has_300wlp_semantics(tmp_path):
    """Positive yaw in the .npz turns the nose toward image-left, as in 300W-LP
    (docs/conventions.md 2)."""
    np.savez(tmp_path / "b.npz", image=np.zeros((1, 8, 8, 3), np.uint8), pose=[[30.0, 0.0, 0.0]])
    R = rotations_of(open_dataset("biwi", tmp_path / "b.npz").samples, torch.float64)[0]
    assert R[2, 0] < -0.4  # row 2 = nose direction; x component negative = image-left


def test_biwi_raw_matrix_route_equals_fsanet_euler_route():
    """Oracle: FSA-Net's Euler formulas on the raw BIWI matrix, then rotation_from_euler, equal
    the exact matrix route F @ M.T @ F used by :func:`biwi_rotation_from_raw`."""
    gen = torch.Generator().manual_seed(3)
    from clerf.geometry import random_rotation

    M = random_rotation(50, gen, dtype=torch.float64)
    Rt = M.transpose(-1, -2)
    roll = -torch.rad2deg(torch.atan2(Rt[:, 1, 0], Rt[:, 0, 0]))
    yaw = -torch.rad2deg(torch.atan2(-Rt[:, 2, 0], torch.hypot(Rt[:, 2, 1], Rt[:, 2, 2])))
    pitch = torch.rad2deg(torch.atan2(Rt[:, 2, 1], Rt[:, 2, 2]))
    torch.testing.assert_close(biwi_rotation_from_raw(M), rotation_from_euler(pitch, yaw, roll))


def test_biwi_bad_files(tmp_path):
    with pytest.raises(DataError, match="BIWI .npz file not found"):
        open_dataset("biwi", tmp_path / "none.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"k\.npz: no 'image' or 'pose' array.*found: images"):
        open_dataset("biwi", tmp_path / "k.npz")
    np.savez(tmp_path / "s.npz", image=np.zeros((2, 4, 4, 3), np.uint8), pose=np.zeros((3, 3)))
    with pytest.raises(DataError, match=r"'pose' must be \(2, 3\)"):
        open_dataset("biwi", tmp_path / "s.npz")
    np.savez(tmp_path / "f.npz", image=np.zeros((2, 4, 4, 3), np.float32), pose=np.zeros((2, 3)))
    with pytest.raises(DataError, match="uint8"):
        open_dataset("biwi", tmp_path / "f.npz")
    Path(tmp_path / "z.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(DataError, match=r"z\.npz: not a readable \.npz"):
        open_dataset("biwi", tmp_path / "z.npz")
    with pytest.raises(DataError, match="unknown signs"):
        dataset_class("biwi")(tmp_path / "k.npz", signs="upside")
    np.savez(tmp_path / "n.npz", image=np.zeros((2, 4, 4, 3), np.uint8),
             pose=[[np.nan, 0, 0], [1.0, 2.0, 3.0]])
    with pytest.raises(DataError, match="non-finite angles"):
        open_dataset("biwi", tmp_path / "n.npz")
    assert open_dataset("biwi", tmp_path / "n.npz", skip_bad=True).report.skipped_bad == 1


@pytest.mark.parametrize("mode", ["header", "full"])
def test_truncated_jpeg_caught_by_scan(tmp_path, mode):
    fx = make_aflw2000(tmp_path / "A", n=3, n_extreme=0)
    p = fx.root / "image00013.jpg"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"image00013\.jpg: unreadable image"):
        open_dataset("aflw2000", fx.root, verify_images=mode)
    ds = open_dataset("aflw2000", fx.root, verify_images=mode, skip_bad=True)
    assert ds.report.skipped_bad == 1 and ds.report.kept == 2
    assert open_dataset("aflw2000", fx.root, verify_images="none").report.kept == 3
    with pytest.raises(DataError, match="verify_images must be one of"):
        open_dataset("aflw2000", fx.root, verify_images="maybe")


def _corrupt_mid_stream(p) -> None:
    """Insert a start-of-image marker inside the entropy-coded data: the file still ends with
    FF D9 (the header check passes) but PIL stops with 'broken data stream' half-way."""
    data = p.read_bytes()
    m = data.find(b"\xff\xda") + (len(data) - data.find(b"\xff\xda")) // 2
    p.write_bytes(data[:m] + b"\xff\xd8" + data[m:])


def test_jpeg_with_trailing_bytes_is_accepted_as_decoders_accept_it(tmp_path):
    from PIL import Image

    from clerf.data.mat import read_rgb_image

    fx = make_aflw2000(tmp_path / "A", n=3, n_extreme=0)
    p = fx.root / "image00013.jpg"
    p.write_bytes(p.read_bytes() + b"\x00" * 200 + b"trailer")  # FF D9 no longer at the end
    Image.open(p).load()  # the decoder reads it
    for mode in ("header", "full"):
        ds = open_dataset("aflw2000", fx.root, verify_images=mode)
        assert ds.report.kept == 3 and ds.report.skipped_bad == 0
    assert read_rgb_image(p).shape == (48, 48, 3)


def test_jpeg_corrupted_mid_stream_is_skipped_and_counted_under_skip_bad(tmp_path, capsys):
    from PIL import Image

    from clerf.cli import main

    fx = make_aflw2000(tmp_path / "A", n=4, n_extreme=0)
    p = fx.root / "image00024.jpg"
    _corrupt_mid_stream(p)
    assert p.read_bytes()[-2:] == b"\xff\xd9"
    with pytest.raises(OSError, match="broken data stream"):
        Image.open(p).load()
    # the cheap check alone lets it through; without --skip-bad pass 2 stops on it
    assert open_dataset("aflw2000", fx.root).report.kept == 4
    out = tmp_path / "o.h5"
    base = ["prepare", "aflw2000", str(fx.root), "--out", str(out), "--no-progress",
            "store.chunk_images=2"]
    assert main(base) == 1
    assert "image00024.jpg: unreadable image" in capsys.readouterr().err
    # under --skip-bad it is skipped and counted like any other bad file, and the run finishes
    assert main([*base, "--skip-bad", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 bad file(s)" in err and "image00024.jpg" in err
    import h5py

    with h5py.File(out) as f:
        assert f.attrs["count_skipped_bad"] == 1 and f.attrs["num_images"] == 3
        assert "image00024.jpg" in f.attrs["skipped_bad_json"]


def test_prepare_decode_failure_after_scan_keeps_the_file_resumable(tmp_path, capsys):
    from clerf.cli import main

    fx = make_aflw2000(tmp_path / "A", n=4, n_extreme=0)
    good = (fx.root / "image00024.jpg").read_bytes()
    (fx.root / "image00024.jpg").write_bytes(b"garbage")
    out = tmp_path / "o.h5"
    args = ["prepare", "aflw2000", str(fx.root), "--out", str(out), "--no-progress",
            "store.chunk_images=2", "prepare.verify_images=none"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "image00024.jpg: unreadable image" in err and "--resume" in err
    (fx.root / "image00024.jpg").write_bytes(good)
    assert main([*args, "--resume"]) == 0
