"""The label-free consistency protocol (``clerf evaluate MODEL --consistency ...``)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from fixtures_evaluation import save_tiny_model
from test_search import _moment_model

from clerf.cli import main
from clerf.evaluation.consistency import (
    DEFAULT_TURNS,
    consistency_views,
    crop_disagreements,
    summarize_disagreements,
    undo,
)
from clerf.evaluation.protocols import DEFAULT_ROTATED_ANGLES
from clerf.geometry import geodesic_distance, random_rotation

skdata = pytest.importorskip("skimage.data")


def test_default_turns_hold_the_rotated_protocol():
    assert set(DEFAULT_ROTATED_ANGLES) <= set(DEFAULT_TURNS)
    names = [v.name for v in consistency_views()]
    assert len(names) == 23 + 2 and "rot+180" in names and names[-2:] == ["hflip", "vflip"]
    with pytest.raises(Exception, match="twice"):
        consistency_views([90, -270])


def test_undo_inverts_the_label_rules():
    """undo(view, label of the view) is the original label, for every view (oracle: the
    protocols' own View.apply label composition)."""
    from clerf.evaluation.protocols import View

    R = random_rotation(16, generator=torch.Generator().manual_seed(0)).double()
    imgs = torch.zeros(16, 3, 8, 8)
    for v in consistency_views():
        _, R_v = View("c", v.name, angle=v.angle, flip=v.flip).apply(imgs, R)
        assert float(geodesic_distance(undo(v, R_v), R).max()) < 1e-9, v


def test_a_consistent_model_scores_zero_and_a_blind_one_scores_the_turn():
    """The moment model is consistent by construction: ~0 deg; a model that ignores its input
    disagrees by the turn itself (the protocol can fail)."""
    crops = [skdata.astronaut()[40:190, 150:300], skdata.camera()[60:260, 140:340]]
    crops = [np.repeat(c[..., None], 3, 2) if c.ndim == 2 else c for c in crops]
    views = consistency_views([15, 90, 180])
    rows = crop_disagreements(_moment_model(), crops, ["a", "c"], views)
    s = summarize_disagreements(rows, views)
    assert s["views"]["rot+90"]["mean"] < 0.5 and s["views"]["rot+180"]["mean"] < 0.5
    assert s["views"]["rot+15"]["mean"] < 3.0 and s["flips"]["mean"] < 0.5
    const = _moment_model()
    const.module.forward = lambda x: torch.eye(3).expand(x.shape[0], 3, 3)
    s = summarize_disagreements(crop_disagreements(const, crops, ["a", "c"], views), views)
    assert s["views"]["rot+90"]["mean"] == pytest.approx(90.0, abs=1e-3)
    assert s["views"]["rot+15"]["mean"] == pytest.approx(15.0, abs=1e-3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("consistency") / "model", seed=0)


def test_cli_on_crops_writes_report(model_dir, tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    lfw = skdata.lfw_subset()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), (lfw[i] * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["evaluate", str(model_dir), str(model_dir), "--name", "a", "--name", "b",
                 "--consistency", str(folder), "--crops", "--angles", "90,180", "--out",
                 str(out), "--cpu"]) == 0
    assert "consistency.md" in capsys.readouterr().out
    rep = json.loads((out / "consistency.json").read_text())
    assert [m["name"] for m in rep["models"]] == ["a", "b"] and rep["mode"] == "crops"
    s = rep["models"][0]["summary"]
    assert s["all"]["n"] == s["all"]["found"] == 3 * 4
    # the same model twice: the same numbers
    assert rep["models"][0]["summary"] == rep["models"][1]["summary"]
    assert (out / "consistency.png").stat().st_size > 0
    assert "| a | 3 |" in (out / "consistency.md").read_text()


@pytest.mark.slow
def test_cli_on_a_photo_with_the_detector(model_dir, tmp_path):
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert main(["evaluate", str(model_dir), "--consistency", str(photo), "--angles", "90",
                 "--angle-step", "30", "--out", str(out), "--cpu", "--no-figures"]) == 0
    rep = json.loads((out / "consistency.json").read_text())
    s = rep["models"][0]["summary"]
    assert rep["models"][0]["faces"] == 1 and s["all"]["found"] == 3  # rot+90, hflip, vflip


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    def err(args, code):
        assert main(["evaluate", *args]) == code
        text = capsys.readouterr().err.strip()
        assert "Traceback" not in text and len(text.splitlines()) == 1, text
        return text

    out = str(tmp_path / "o")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert "broken.png: cannot read" in err([str(model_dir), "--consistency", str(bad),
                                             "--out", out], 1)
    ok = tmp_path / "ok.png"
    cv2.imwrite(str(ok), np.zeros((20, 20, 3), np.uint8))
    assert "--angle-step" in err([str(model_dir), "--consistency", str(ok), "--angle-step",
                                  "7", "--out", out], 2)
    assert "--crops only applies" in err([str(model_dir), "--crops", "--out", out], 2)
    assert "no such file" in err([str(model_dir), "--consistency", str(tmp_path / "x.png"),
                                  "--out", out], 1)
