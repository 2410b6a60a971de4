"""Labels are checked when a store is read: a NaN, scaled or singular rotation, or a triplet index
past the images, is refused by every reader (inspect --verify, evaluate, finetune, pretrain) in one
line naming the store, the dataset and the row; digests that match do not make labels valid."""

from __future__ import annotations

import pytest
import torch
from fixtures_damage import DAMAGES, damaged_copy
from fixtures_evaluation import save_tiny_model, write_store

from clerf.cli import main
from clerf.errors import DataError
from clerf.geometry import first_non_rotation, random_rotation
from tests.test_finetune import _cli_args, _write_store, axis_blobs
from tests.test_pretrain import REPO, _make_store, _overrides
from triplets.store import open_store, verify_store

EXPECT = {"nan": "row 5 is not finite", "scaled": "row 5 is not a rotation matrix",
          "singular": "row 5 is not a rotation matrix", "index": "dataset 'triplets' row 5"}


@pytest.fixture(scope="module")
def triplet_store(tmp_path_factory):
    return _make_store(tmp_path_factory.mktemp("lab") / "t.h5", 8, res=32)


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return code


def test_first_non_rotation_names_the_first_bad_matrix():
    R = random_rotation(6, torch.Generator().manual_seed(0)).double()
    assert first_non_rotation(R) is None
    R[4] *= 1.5
    R[2, 1, 1] = float("nan")
    assert first_non_rotation(R) == ((2,), "not finite (NaN or infinity)")
    R[2] = R[3]
    idx, why = first_non_rotation(R)
    assert idx == (4,) and "det = 3.375" in why


@pytest.mark.parametrize("how", DAMAGES)
def test_open_and_verify_refuse_damaged_labels(triplet_store, tmp_path, how):
    bad = damaged_copy(triplet_store, tmp_path / f"{how}.h5", how)
    with pytest.raises(DataError) as info:
        open_store(bad, verify=True)
    msg = str(info.value)
    assert msg.startswith(str(bad)) and EXPECT[how] in msg and "\n" not in msg
    verify_store(open_store(triplet_store))  # the good one still reads


@pytest.mark.parametrize("how", DAMAGES)
def test_cli_inspect_verify_refuses(triplet_store, tmp_path, capsys, how):
    bad = damaged_copy(triplet_store, tmp_path / f"{how}.h5", how)
    assert _one_line_error(capsys, main(["inspect", str(bad), "--verify"]), str(bad),
                           EXPECT[how]) == 1


@pytest.mark.parametrize("how", ["nan", "index"])
def test_cli_pretrain_refuses(triplet_store, tmp_path, capsys, how):
    bad = damaged_copy(triplet_store, tmp_path / f"{how}.h5", how)
    args = ["pretrain", str(REPO / "configs" / "pretrain_small.yaml"), "--out",
            str(tmp_path / "o"), *_overrides((bad, triplet_store))]  # fmt: skip
    assert _one_line_error(capsys, main(args), EXPECT[how]) == 1
    assert not (tmp_path / "o").exists()  # checked before anything is written


@pytest.mark.parametrize("how", ["nan", "scaled", "singular"])
def test_cli_finetune_and_evaluate_refuse(tmp_path, capsys, how):
    R = random_rotation(32, torch.Generator().manual_seed(5))
    good = _write_store(tmp_path / "blobs.h5", axis_blobs(R, 16), R)
    bad = damaged_copy(good, tmp_path / f"{how}.h5", how)
    assert _one_line_error(capsys, main(_cli_args(bad, tmp_path / "ft")), EXPECT[how]) == 1
    assert not (tmp_path / "ft").exists()

    write_store(tmp_path / "data.h5", n=12, resolution=32)
    save_tiny_model(tmp_path / "model", seed=0)
    bad = damaged_copy(tmp_path / "data.h5", tmp_path / f"eval_{how}.h5", how)
    code = main(["evaluate", str(tmp_path / "model"), "--data", str(bad), "--out",
                 str(tmp_path / "ev"), "--no-figures"])  # fmt: skip
    assert _one_line_error(capsys, code, str(bad), EXPECT[how]) == 1
    assert not (tmp_path / "ev").exists()


def test_interleaved_layout_must_match_its_table(triplet_store, tmp_path):
    import shutil

    import h5py

    bad = tmp_path / "swapped.h5"
    shutil.copy(triplet_store, bad)
    with h5py.File(bad, "r+") as f:
        f["triplets"][3] = [9, 10, 2]  # in range, but not what the interleaved layout reads
    with pytest.raises(DataError, match=r"dataset 'triplets' row 3 is \[9, 10, 2\], but the "
                                        r"store says its layout is interleaved"):  # fmt: skip
        open_store(bad)
