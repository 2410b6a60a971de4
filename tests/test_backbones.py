"""Backbones by name: torchvision's ResNets, timm's convolutional models, a user's own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clerf.config import load_config
from clerf.errors import ConfigError, DataError
from clerf.geometry import random_rotation
from clerf.models.backbones import deploy_copy, register_backbone
from clerf.models.encoder import Encoder, EncoderSpec, build_encoder
from clerf.models.pose_model import HeadPoseModel

timm = pytest.importorskip("timm")


@register_backbone("test_tiny_cnn", features=8)
def _tiny(weights: str | None) -> tuple[nn.Module, int]:
    """A backbone registered from this module alone."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
    return net, 8


def test_a_backbone_registered_in_one_module_trains_saves_and_loads(tmp_path):
    cfg = load_config(None, ["encoder.arch=test_tiny_cnn", "encoder.input_size=16",
                             "head.type=rotation6d", "head.hidden=0"])  # fmt: skip
    model = HeadPoseModel(build_encoder(cfg.encoder), cfg.head)
    assert model.encoder.feature_dim == 8
    loss, _ = model.loss(model(torch.rand(4, 3, 16, 16)), random_rotation(4))
    loss.backward()
    model.save_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 16, 16)
    back = HeadPoseModel.from_pretrained(tmp_path / "m")
    assert torch.equal(back.rotations(x), model.eval().rotations(x))


def test_unknown_backbone_names_the_key():
    with pytest.raises(ConfigError, match=r"encoder.arch: expected one of resnet18, resnet34, "
                                          r"resnet50.*timm.*got 'resnet9000'"):
        Encoder(EncoderSpec(arch="resnet9000"))


@pytest.mark.parametrize("arch", ["repvgg_a0", "mobilenetv3_small_100", "timm/resnet18"])
def test_timm_backbones_train_save_and_load_strictly(tmp_path, arch):
    model = HeadPoseModel(Encoder(EncoderSpec(arch=arch, input_size=32)), {"type": "sphere",
                          "hidden": 16, "sphere_points": 64})  # fmt: skip
    name = arch.removeprefix("timm/")
    with torch.no_grad():
        width = timm.create_model(name, num_classes=0).eval()(torch.rand(1, 3, 32, 32)).shape[1]
    assert model.encoder.feature_dim == width
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss, _ = model.loss(model(torch.rand(4, 3, 32, 32)), random_rotation(4))
    loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "m")
    back = HeadPoseModel.from_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(back.rotations(x), model.eval().rotations(x))
    assert back.encoder.spec.arch == arch


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_locally_saved_timm_state_dict_loads_offline_and_strictly(tmp_path, suffix):
    """The offline route for pretrained weights: a timm classifier's saved state dict (its
    classifier dropped) gives exactly that model's pooled features."""
    full = timm.create_model("resnet10t", num_classes=1000).eval()
    path = tmp_path / f"resnet10t{suffix}"
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    enc = Encoder(EncoderSpec(arch="resnet10t", input_size=32), weights=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = full.forward_head(full.forward_features(enc.normalize(x)), pre_logits=True)
        assert torch.allclose(enc.features(x), want, atol=1e-6)
    del state["conv1.0.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(DataError, match=r"missing: conv1.0.weight"):
        Encoder(EncoderSpec(arch="resnet10t"), weights=str(tmp_path / "broken.safetensors"))
    with pytest.raises(DataError, match="no such file"):
        Encoder(EncoderSpec(arch="resnet10t"), weights=str(tmp_path / "none.safetensors"))


def test_repvgg_is_reparameterised_for_deployment_with_the_same_outputs():
    model = HeadPoseModel(Encoder(EncoderSpec(arch="repvgg_a0", input_size=32)),
                          {"type": "rotation6d", "hidden": 0}).eval()  # fmt: skip
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    deployed = deploy_copy(model)
    branches = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) < branches
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed.rotations(x), model.rotations(x), atol=1e-4)
    # the model itself is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == branches


@pytest.mark.slow
def test_repvgg_exports_to_onnx_reparameterised(tmp_path):
    pytest.importorskip("onnxruntime")
    from clerf.inference.export import export_onnx
    from clerf.inference.model import load_pose_model

    model = HeadPoseModel(Encoder(EncoderSpec(arch="repvgg_a0", input_size=32)),
                          {"type": "rotation6d", "hidden": 0})  # fmt: skip
    model.save_pretrained(tmp_path / "m")
    summary = export_onnx(load_pose_model(tmp_path / "m"), tmp_path / "m.onnx")
    assert summary["check"]["reparameterized"] is True
    assert summary["check"]["reparam_max_abs_diff"] <= 1e-4
