"""The scripts in examples/ run as written, at toy scale, through the public Python API."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_examples_train_predict_and_reuse_the_encoder(tmp_path):
    from PIL import Image

    from clerf.models.encoder import Encoder

    # a photo without a face: predict notes it, writes its record and exits normally
    Image.new("RGB", (96, 80), (120, 90, 60)).save(tmp_path / "wall.png")
    res = _load("train_and_predict").main(
        ["--out", str(tmp_path / "ex"), "--toy", "--photo", str(tmp_path / "wall.png")])
    for stage in ("pretrain/encoder", "finetune/model", "evaluate/report.json",
                  "predict/predictions.json"):
        assert (tmp_path / "ex" / stage).exists(), stage
    results = res["evaluate"]["models"][0]["results"]
    assert set(results) == {"standard", "rotated", "flipped"}
    assert res["predict"]["inputs"][0]["status"] == "no face found"
    # the default photo (scikit-image's astronaut, a real face): faces are found and printed
    res = _load("train_and_predict").main(["--out", str(tmp_path / "ex2"), "--toy"])
    assert res["predict"]["faces"] and res["predict"]["inputs"][0]["status"] == "ok"

    # the encoder the first script wrote, inside a model of the user's own
    mod = _load("encoder_in_your_model")
    out = mod.main(["--encoder", str(tmp_path / "ex" / "pretrain"), "--steps", "2", "--toy"])
    assert all(math.isfinite(v) and 0 <= v <= 180 for v in out.values())
    enc = Encoder.from_pretrained(tmp_path / "ex" / "pretrain")
    model = mod.MyPoseRegressor(enc)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3, 3)
