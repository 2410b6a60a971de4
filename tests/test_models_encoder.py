"""Tests of the encoder, strict save/load (clerf.models.io), clerf.load_encoder and hubconf."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import clerf
from clerf.errors import ConfigError, DataError
from clerf.models.encoder import Encoder, EncoderSpec, build_encoder, load_encoder
from clerf.models.io import load_state_strict, load_weights_file, strip_prefixes

REPO = Path(__file__).resolve().parents[1]


def _tiny(arch="resnet18", dim=16, size=32, hidden=32) -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderSpec(arch=arch, embedding_dim=dim, projection_hidden=hidden,
                               input_size=size))  # fmt: skip


@pytest.fixture(scope="module")
def enc() -> Encoder:
    return _tiny().eval()


def test_shapes_and_unit_norm(enc):
    x = torch.rand(3, 3, 32, 32)
    z = enc(x)
    assert z.shape == (3, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert enc.features(x).shape == (3, enc.feature_dim) == (3, 512)


@pytest.mark.parametrize("arch, feat", [("resnet34", 512), ("resnet50", 2048)])
def test_other_architectures(arch, feat):
    e = _tiny(arch=arch, hidden=0).eval()
    assert e.feature_dim == feat
    assert e(torch.rand(1, 3, 32, 32)).shape == (1, 16)


def test_uint8_input_equals_float_input(enc):
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(enc(u8), enc(u8.float() / 255.0), atol=1e-6)


def test_normalisation_is_inside():
    enc = Encoder(EncoderSpec(input_size=32, embedding_dim=8, circle_mask=0.0))
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(enc.normalize(x), (x - mean) / std)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.normalize(torch.rand(3, 32, 32))


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder.arch"):
        EncoderSpec(arch="vit_b_16")
    with pytest.raises(ConfigError, match="encoder.std"):
        EncoderSpec(std=[0.2, 0.0, 0.2])
    with pytest.raises(ConfigError, match="encoder.weights.*IMAGENET1K_V1"):
        Encoder(EncoderSpec(), weights="IMAGENET_NOPE")


def test_build_encoder_from_config_section():
    from clerf.config import load_config

    cfg = load_config(overrides=["encoder.embedding_dim=24", "encoder.input_size=32"])
    e = build_encoder(cfg.encoder)
    assert e.embedding_dim == 24 and e.spec.input_size == 32 and e.weights_source is None


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_bit_exact(enc, tmp_path):
    enc.save_pretrained(tmp_path / "e", training={"steps": 7})
    back = Encoder.from_pretrained(tmp_path / "e").eval()
    a, b = enc.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), back(x))
    meta = json.loads((tmp_path / "e" / "config.json").read_text())
    assert meta["kind"] == "clerf.encoder" and meta["arch"] == "resnet18"
    assert meta["embedding_dim"] == 16 and meta["input_size"] == 32
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["conventions_version"] == clerf.CONVENTIONS_VERSION
    assert meta["training"] == {"steps": 7} and back.training_summary == {"steps": 7}


def test_clerf_load_encoder_accepts_a_pretrain_output_dir(enc, tmp_path):
    enc.save_pretrained(tmp_path / "run" / "encoder")
    back = clerf.load_encoder(tmp_path / "run")
    assert torch.equal(back.projection[0].weight, enc.projection[0].weight)
    assert clerf.load_encoder is load_encoder


def test_mismatch_is_an_error_listing_keys(enc, tmp_path):
    d = tmp_path / "e"
    enc.save_pretrained(d)
    state = load_file(str(d / "model.safetensors"))
    state.pop("projection.2.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(DataError) as exc:
        Encoder.from_pretrained(d)
    msg = str(exc.value)
    assert "1 missing: projection.2.bias" in msg and "1 unexpected: extra.weight" in msg


def test_shape_mismatch_from_a_wrong_config(enc, tmp_path):
    d = tmp_path / "e"
    enc.save_pretrained(d)
    meta = json.loads((d / "config.json").read_text())
    meta["embedding_dim"] = 8
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"shape mismatch.*projection\.2\.weight \(16, 32\) vs "
                                        r"\(8, 32\)"):  # fmt: skip
        Encoder.from_pretrained(d)


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(DataError, match="no such encoder"):
        clerf.load_encoder(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="missing config.json"):
        clerf.load_encoder(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text('{"kind": "clerf.head_pose_model"}')
    with pytest.raises(DataError, match="expected 'clerf.encoder'"):
        clerf.load_encoder(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        clerf.load_encoder(tmp_path / "x")


def test_corrupt_weights_file(enc, tmp_path):
    d = tmp_path / "e"
    enc.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="not a readable safetensors"):
        Encoder.from_pretrained(d)


def test_prefixes_of_wrappers_are_stripped(enc):
    state = {f"module._orig_mod.{k}": v for k, v in enc.state_dict().items()}
    assert set(strip_prefixes(state)) == set(enc.state_dict())
    fresh = _tiny()
    load_state_strict(fresh, state, source="ddp checkpoint")
    assert torch.equal(fresh.projection[2].weight, enc.projection[2].weight)


def test_torch_files_are_read_with_weights_only(tmp_path, enc):
    good = tmp_path / "w.pt"
    torch.save({"state_dict": enc.state_dict()}, good)
    assert set(load_weights_file(good)) == set(enc.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(DataError, match="weights_only=True"):
        load_weights_file(bad)
    (tmp_path / "w.npz").touch()
    with pytest.raises(DataError, match="unknown weights format"):
        load_weights_file(tmp_path / "w.npz")


def test_save_is_atomic_on_failure(enc, tmp_path, monkeypatch):
    d = tmp_path / "e"
    enc.save_pretrained(d, training={"v": 1})
    import clerf.models.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_model_dir(d, enc, "clerf.encoder", {"training": {"v": 2}})
    # the previous save is intact and no temporary folder is left behind
    assert json.loads((d / "config.json").read_text())["training"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


# --------------------------------------------------------------------------- light import, hub


def test_import_clerf_stays_light():
    code = (
        "import sys, clerf, clerf.geometry, clerf.config, clerf.cli\n"
        "heavy = [m for m in ('torchvision', 'accelerate', 'h5py') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "f = clerf.load_encoder\n"
        "assert callable(f) and 'clerf.models.encoder' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_torch_hub_local(enc, tmp_path):
    enc.save_pretrained(tmp_path / "e")
    loaded = torch.hub.load(str(REPO), "encoder", source="local", pretrained=str(tmp_path / "e"))
    assert torch.equal(loaded.projection[0].weight, enc.projection[0].weight)
    fresh = torch.hub.load(str(REPO), "encoder", source="local", arch="resnet18",
                           embedding_dim=8, input_size=32)  # fmt: skip
    assert fresh.embedding_dim == 8


def test_torchvision_weights_name_without_internet_is_a_clear_error(monkeypatch):
    import urllib.error

    import torchvision.models

    seen = {}

    def offline(name, weights=None):
        seen["weights"] = weights
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(DataError, match=r"could not load torchvision weights "
                                        r"resnet18.IMAGENET1K_V1 \(needs internet"):  # fmt: skip
        Encoder(EncoderSpec(), weights="IMAGENET1K_V1")
    assert seen["weights"] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1


def test_circle_mask_hides_the_corners_that_rotation_empties():
    from clerf.augment import GeometricParams, PoseAugment

    torch.manual_seed(0)
    enc = Encoder(EncoderSpec(embedding_dim=8, input_size=32, circle_mask=0.44)).eval()
    x = torch.rand(1, 3, 32, 32)
    corners = x.clone()
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    outside = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) > (0.44 * 32) ** 2
    corners[..., outside] = 0.0  # what a rotated image's padding looks like
    with torch.no_grad():
        assert torch.equal(enc(x), enc(corners))
    # With the default framing (scale >= 1, translate 0.04) a rotated image keeps real content
    # everywhere inside the disk: no padding reaches the encoder.
    aug = PoseAugment({"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
                       "p_grayscale": 0.0, "p_blur": 0.0, "p_noise": 0.0}, output_size=32)
    ones = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    p = aug.sample_geometric(64, torch.Generator().manual_seed(1))
    p = GeometricParams(torch.full((64,), 45.0), p.hflip, p.vflip, torch.ones(64),
                        torch.full((64, 2), 0.04))  # worst case: 45 deg, smallest zoom, max shift
    out, _ = aug(ones, torch.eye(3).expand(64, 3, 3), params=p)
    assert (out[..., ~outside] > 0.99).all()
    with pytest.raises(ConfigError, match="encoder.circle_mask"):
        EncoderSpec(circle_mask=0.1)


def test_spec_defaults_equal_the_config_defaults():
    import dataclasses

    from clerf.config import EncoderConfig

    def defaults(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}  # fmt: skip

    cfg, spec = defaults(EncoderConfig), defaults(EncoderSpec)
    cfg.pop("weights")  # not part of the spec: only how a fresh backbone is initialised
    assert cfg == spec  # one source of defaults: a bare EncoderSpec() is the config's encoder
    assert EncoderSpec().circle_mask == 0.44
