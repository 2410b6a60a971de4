"""HeadPoseModel: predict shapes and conventions, strict save/load round trip, freezing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clerf.errors import ConfigError, DataError
from clerf.geometry import euler_from_rotation, is_rotation
from clerf.models.encoder import Encoder, EncoderSpec
from clerf.models.heads import BinnedEulerHead, CombinedHead, Rotation6DHead
from clerf.models.pose_model import MODEL_KIND, HeadPoseModel, PosePrediction


def _model(head: dict, size: int = 32, seed: int = 0) -> HeadPoseModel:
    torch.manual_seed(seed)
    return HeadPoseModel(Encoder(EncoderSpec(arch="resnet18", input_size=size)), head)


@pytest.mark.parametrize("head", [{"type": "binned"}, {"type": "rotation6d", "hidden": 16},
                                  {"type": "both", "hidden": 0}])
def test_predict_shapes_and_euler_agree_with_matrices(head):
    m = _model(head)
    imgs = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8)
    p = m.predict(imgs, batch_size=2)
    assert isinstance(p, PosePrediction)
    assert p.rotations.shape == (5, 3, 3) and p.rotations.dtype == torch.float32
    assert is_rotation(p.rotations, tol=1e-4).all()
    e = euler_from_rotation(p.rotations)
    for a in ("pitch", "yaw", "roll"):
        assert getattr(p.euler, a).shape == (5,)
        torch.testing.assert_close(getattr(p.euler, a), getattr(e, a))
    d = p.as_dict()
    assert len(d["rotation"]) == 5 and len(d["yaw"]) == 5


def test_predict_is_batch_size_independent_and_accepts_float_and_single_images():
    m = _model({"type": "rotation6d", "hidden": 8})
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = m.predict(imgs, batch_size=6).rotations
    b = m.predict(imgs, batch_size=1).rotations
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = m.predict(imgs.float() / 255.0).rotations
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    single = m.predict(imgs[0]).rotations
    assert single.shape == (1, 3, 3)
    torch.testing.assert_close(single[0], a[0], atol=1e-5, rtol=0)


def test_predict_restores_mode_and_rejects_bad_input():
    m = _model({"type": "binned"})
    m.train()
    m.predict(torch.zeros(1, 3, 32, 32))
    assert m.training
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.predict(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.predict(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="uint8 or float"):
        m.predict(torch.zeros(1, 3, 32, 32, dtype=torch.int32))


def test_predict_matches_manual_preprocessing():
    # an independent route: normalise by hand with the saved mean/std at input size
    m = _model({"type": "rotation6d", "hidden": 0}).eval()
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(m.preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m.preprocessing["std"]).view(1, 3, 1, 1)
    # the disk mask by hand: pixel centres within radius * side of the image centre
    r = m.preprocessing["circle_mask"] * 32
    yy, xx = np.mgrid[0:32, 0:32] - 15.5
    disk = torch.from_numpy((yy**2 + xx**2 <= r * r).astype(np.float32))
    assert 0 < r and 0 < disk.mean() < 1
    with torch.no_grad():
        feats = m.encoder.backbone((x - mean) / std * disk)
        R = m.head.rotation(m.head(feats))
    torch.testing.assert_close(m.predict(x).rotations, R, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", [{"type": "binned", "alpha": 1.0},
                                  {"type": "both", "bins": {"start": -180.0, "width": 3.0,
                                                            "num_bins": 120},
                                   "predict_from": "binned", "hidden": 8}])
def test_save_from_pretrained_round_trip_is_bit_exact(tmp_path, head):
    m = _model(head, seed=3)
    # make BatchNorm buffers non-trivial
    m.train()
    m(torch.rand(4, 3, 32, 32))
    m.save_pretrained(tmp_path / "m", training={"steps": 7})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["kind"] == MODEL_KIND and meta["preprocessing"]["input_size"] == 32
    assert meta["training"] == {"steps": 7}
    m2 = HeadPoseModel.from_pretrained(tmp_path / "m")
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert not m2.training
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(m.predict(x).rotations, m2.predict(x).rotations)
    assert type(m2.head) is type(m.head)
    assert m2.head.describe() == m.head.describe()


def test_from_pretrained_accepts_stage_output_dir(tmp_path):
    m = _model({"type": "rotation6d"})
    m.save_pretrained(tmp_path / "run" / "model")
    m2 = HeadPoseModel.from_pretrained(tmp_path / "run")
    assert isinstance(m2.head, Rotation6DHead)


def test_from_pretrained_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model({"type": "binned"})
    d = m.save_pretrained(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    state.pop("head.fc.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(DataError, match=r"missing: head.fc.bias.*unexpected: extra.weight"):
        HeadPoseModel.from_pretrained(d)
    # a config that describes a different head: shapes do not match
    m.save_pretrained(tmp_path / "m2")
    meta = json.loads((tmp_path / "m2" / "config.json").read_text())
    meta["head"]["bins"] = {"start": -180.0, "width": 3.0, "num_bins": 120}
    (tmp_path / "m2" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="shape mismatch"):
        HeadPoseModel.from_pretrained(tmp_path / "m2")
    with pytest.raises(DataError, match="no such model directory"):
        HeadPoseModel.from_pretrained(tmp_path / "nope")
    # an encoder directory is not a head pose model
    Encoder(EncoderSpec(input_size=32)).save_pretrained(tmp_path / "enc")
    with pytest.raises(DataError, match="kind is 'clerf.encoder'"):
        HeadPoseModel.from_pretrained(tmp_path / "enc")


def test_head_types_and_bad_type():
    assert isinstance(_model({"type": "binned"}).head, BinnedEulerHead)
    assert isinstance(_model({"type": "both"}).head, CombinedHead)
    with pytest.raises(ConfigError, match="head.type"):
        _model({"type": "euler"})


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_statistics():
    m = _model({"type": "rotation6d", "hidden": 8})
    m.train()
    m.set_encoder_frozen(True)
    bn = m.encoder.backbone.bn1
    before = bn.running_mean.clone()
    out = m(torch.rand(4, 3, 32, 32))
    loss, _ = m.loss(out, torch.eye(3).expand(4, 3, 3))
    loss.backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert all(p.grad is not None for p in m.head.parameters())
    assert torch.equal(bn.running_mean, before) and not m.encoder.training and m.head.training
    m.set_encoder_frozen(False, keep_frozen=("backbone.conv1", "backbone.bn1"))
    assert m.encoder.training
    m.zero_grad()
    out = m(torch.rand(4, 3, 32, 32))
    m.loss(out, torch.eye(3).expand(4, 3, 3))[0].backward()
    assert m.encoder.backbone.conv1.weight.grad is None
    assert m.encoder.backbone.layer1[0].conv1.weight.grad is not None


def test_head_config_dataclass_and_dictconfig_are_accepted():
    from dataclasses import asdict

    from clerf.config import load_config
    from clerf.models.heads import BinnedHeadConfig, CombinedHeadConfig

    m = _model({"type": "binned"})
    a = HeadPoseModel(Encoder(EncoderSpec(input_size=32)), CombinedHeadConfig(hidden=8))
    b = HeadPoseModel(Encoder(EncoderSpec(input_size=32)),
                      load_config(None, ["head.type=both", "head.hidden=8"]).head)
    assert a.head_config == b.head_config and a.head_config["bins"]["num_bins"] == 66
    assert isinstance(a.head, CombinedHead) and m.head_config == asdict(BinnedHeadConfig())


def test_torch_hub_head_pose_model_is_the_saved_model(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    m = _model({"type": "rotation6d", "hidden": 16}).eval()
    m.save_pretrained(tmp_path / "run" / "model")
    hub = torch.hub.load(str(repo), "head_pose_model", source="local",
                         pretrained=str(tmp_path / "run"))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert isinstance(hub, HeadPoseModel)
    assert torch.equal(hub.predict(x).rotations, m.predict(x).rotations)
