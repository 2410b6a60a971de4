"""Components register by name and own their configs: a new head is one module (this one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from clerf.config import HEADS, HeadConfig, comparable, load_config
from clerf.errors import ConfigError
from clerf.geometry import geodesic_distance, random_rotation, rotation_from_euler
from clerf.models.encoder import Encoder, EncoderSpec
from clerf.models.heads import PoseHead
from clerf.models.pose_model import HeadPoseModel
from clerf.registry import Registry, need

# --------------------------------------------------------------------------- a head, here alone


class EulerRegressionHead(PoseHead):
    """Three angles regressed directly (a deliberately plain head, defined only in this test)."""

    def __init__(self, in_features: int, scale: float) -> None:
        super().__init__()
        self.in_features, self.scale = in_features, scale
        self.fc = nn.Linear(in_features, 3)

    def forward(self, features):
        return {"euler_deg": self.fc(features) * self.scale}

    def rotation(self, outputs):
        e = outputs["euler_deg"]
        return rotation_from_euler(e[:, 0], e[:, 1], e[:, 2])

    def loss(self, outputs, rotations):
        geo = geodesic_distance(self.rotation(outputs), rotations.to(outputs["euler_deg"]))
        return torch.deg2rad(geo).mean(), {"geodesic_deg": geo.mean().detach()}


@HEADS.register("test_euler_regression")
@dataclass
class EulerRegressionConfig(HeadConfig):
    type: str = "test_euler_regression"
    #: degrees per unit of the linear layer's output
    scale: float = 30.0

    def validate(self, path: str = "head") -> None:
        super().validate(path)
        need(self.scale > 0, f"{path}.scale", "a number > 0", self.scale)

    def build(self, in_features: int) -> EulerRegressionHead:
        return EulerRegressionHead(in_features, self.scale)


def test_a_head_registered_in_one_module_loads_builds_trains_and_saves(tmp_path):
    cfg = load_config(None, ["head.type=test_euler_regression", "head.scale=45",
                             "encoder.input_size=16"])  # fmt: skip
    assert dict(cfg.head) == {"type": "test_euler_regression", "scale": 45.0}
    model = HeadPoseModel(Encoder(EncoderSpec(input_size=16)), cfg.head)
    assert isinstance(model.head, EulerRegressionHead) and model.head.scale == 45.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    R = random_rotation(4, torch.Generator().manual_seed(0))
    loss, parts = model.loss(model(torch.rand(4, 3, 16, 16)), R)
    loss.backward()
    opt.step()
    assert set(parts) == set(model.head.loss_keys)
    model.save_pretrained(tmp_path / "m")
    back = HeadPoseModel.from_pretrained(tmp_path / "m")
    assert back.head_config == asdict(EulerRegressionConfig(scale=45.0))
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(back.eval().rotations(x), model.eval().rotations(x))


def test_the_new_heads_checks_and_keys_name_the_key():
    with pytest.raises(ConfigError, match=r"head.scale: expected a number > 0, got -1"):
        load_config(None, ["head.type=test_euler_regression", "head.scale=-1"])
    with pytest.raises(ConfigError, match=r"'test_euler_regression' head's keys: type, scale"):
        load_config(None, ["head.type=test_euler_regression", "head.alpha=2"])
    with pytest.raises(ConfigError, match=r"head.type: expected one of binned, rotation6d, both, "
                                          r"sphere, .*test_euler_regression, got 'nope'"):
        load_config(None, ["head.type=nope"])


def test_changing_the_type_keeps_the_keys_the_new_head_has(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("head:\n  type: sphere\n  hidden: 64\n  sphere_points: 128\n")
    # a later source changes the type: the file's sphere-only keys are dropped, hidden stays
    cfg = load_config(base, ["head.type=rotation6d"])
    assert dict(cfg.head) == {"type": "rotation6d", "hidden": 64, "loss": "geodesic"}
    derived = tmp_path / "derived.yaml"
    derived.write_text("base: base.yaml\nhead:\n  type: binned\n  alpha: 1.0\n")
    assert set(load_config(derived).head) == {"type", "bins", "alpha", "decode"}
    # in the source that names the type, a key the type lacks is an error naming the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("head:\n  type: binned\n  hidden: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'head.hidden'.*'binned' head's keys"):
        load_config(bad)


def test_models_and_runs_saved_with_the_flat_head_section_still_load(tmp_path):
    flat = {"type": "rotation6d", "bins": {"start": -99.0, "width": 3.0, "num_bins": 66},
            "alpha": 2.0, "decode": "auto", "hidden": 8, "loss": "chordal", "binned_weight": 1.0,
            "rotation6d_weight": 1.0, "predict_from": "auto", "sphere_points": 512,
            "sphere_sigma_deg": 8.0}  # fmt: skip
    model = HeadPoseModel(Encoder(EncoderSpec(input_size=16)), flat, legacy=True)
    assert model.head_config == {"type": "rotation6d", "hidden": 8, "loss": "chordal"}
    with pytest.raises(ConfigError, match=r"head.alpha: not a key of the head 'rotation6d' "
                                          r"\(its keys: type, hidden, loss\)"):
        HeadPoseModel(Encoder(EncoderSpec(input_size=16)), flat)
    # a run directory saved then compares equal to the same run configured now
    now = {"head": {"type": "rotation6d", "hidden": 8, "loss": "chordal"}}
    assert comparable({"head": flat}) == comparable(now)


def test_a_registry_checks_what_registers():
    reg: Registry = Registry("widget", "widget.type")

    @dataclass
    class Wrong:
        type: str = "other"

    with pytest.raises(TypeError, match="must default to 'w'"):
        reg.register("w")(Wrong)
    with pytest.raises(TypeError, match="not a dataclass"):
        reg.register("w")(type("Plain", (), {}))
    @dataclass
    class Impostor(HeadConfig):
        type: str = "binned"

    with pytest.raises(TypeError, match="'binned' is already registered"):
        HEADS.register("binned")(Impostor)
