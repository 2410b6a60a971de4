"""Protocol views: exact labels checked with the procedural renderer as the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clerf.errors import ConfigError
from clerf.evaluation.protocols import (
    DEFAULT_ROTATED_ANGLES,
    GeneratorSource,
    TensorSource,
    build_views,
)
from clerf.geometry import (
    hflip_rotation,
    random_rotation,
    rot_z,
    rotate_inplane,
    sample_euler_box,
    vflip_rotation,
)

procedural = pytest.importorskip("generators.procedural")


def test_views_of_each_protocol():
    assert [v.name for v in build_views("standard")] == ["none"]
    rot = build_views("rotated")
    assert [v.angle for v in rot] == list(DEFAULT_ROTATED_ANGLES)
    assert {v.name for v in rot} >= {"rot+15", "rot-90", "rot+180"}
    assert [v.name for v in build_views("flipped")] == ["hflip", "vflip"]
    assert not build_views("full_range")[0].euler and build_views("rotated")[0].euler
    with pytest.raises(ConfigError, match="unknown protocol 'sideways'.*standard"):
        build_views("sideways")
    with pytest.raises(ConfigError, match="duplicate"):
        build_views("rotated", [15, 15.0])
    with pytest.raises(ConfigError, match=">= 1 angle"):
        build_views("rotated", [])


def test_labels_are_the_geometry_rules():
    R = random_rotation(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.rand(5, 3, 16, 16)
    for v in build_views("rotated", [15.0, -90.0]):
        assert torch.allclose(v.apply(x, R)[1], rotate_inplane(R, v.angle), atol=1e-12)
    h, vv = build_views("flipped")
    assert torch.allclose(h.apply(x, R)[1], hflip_rotation(R), atol=1e-12)
    assert torch.allclose(vv.apply(x, R)[1], vflip_rotation(R), atol=1e-12)
    img, lab = build_views("standard")[0].apply(x, R)
    assert img is x and lab is R


def test_image_turns_clockwise_on_screen():
    # A bright pixel above the centre moves to the right of the centre after +90 deg.
    x = torch.zeros(1, 3, 9, 9)
    x[0, :, 1, 4] = 1.0
    view = build_views("rotated", [90.0])[0]
    out, _ = view.apply(x, torch.eye(3, dtype=torch.float64)[None])
    assert out[0, 0].argmax().item() == 4 * 9 + 7
    y = torch.zeros(1, 3, 9, 9)
    y[0, :, 2, 1] = 1.0  # row 2, column 1
    eye = torch.eye(3, dtype=torch.float64)[None]
    hflip, vflip = build_views("flipped")
    assert hflip.apply(y, eye)[0][0, 0].argmax().item() == 2 * 9 + 7
    assert vflip.apply(y, eye)[0][0, 0].argmax().item() == 6 * 9 + 1


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, images in [0, 1]) per image over the central disc where the head is."""
    s = a.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    m = (((xx - (s - 1) / 2) ** 2 + (yy - (s - 1) / 2) ** 2) <= (0.45 * s) ** 2).float()
    mse = (((a - b) ** 2) * m).sum(dim=(1, 2, 3)) / (3 * m.sum())
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@pytest.mark.slow
def test_protocol_labels_match_the_renderer():
    """render(R) seen through a view == render(view's label), and a wrong rule fails.

    Rendered at 128 px and area-downsampled to 64 px (the resampling error of a rotation is
    then small); scene aligned with the camera (head on the optical axis, light along it,
    symmetric identities, plain background) so that it transforms exactly with the image.
    """
    gen = procedural.ProceduralHead.aligned(seed=3)
    n, size, ss = 3, 64, 2
    R = sample_euler_box(n, pitch=(-40, 40), yaw=(-60, 60), roll=(-30, 30),
                         generator=torch.Generator().manual_seed(0))
    ids = torch.arange(n)

    def render(rot: torch.Tensor) -> torch.Tensor:
        img = gen.render(ids, rot.float(), size * ss).images.float() / 255.0
        return F.avg_pool2d(img, ss)

    base = gen.render(ids, R, size * ss).images.float() / 255.0
    for view in build_views("rotated", [30.0, -90.0]) + build_views("flipped"):
        img, label = view.apply(base, R.double())
        seen = F.avg_pool2d(img, ss)
        good = _psnr(seen, render(label))
        assert (good >= 30.0).all(), (view.name, good)
        # the wrong rules: roll + phi (rotation about the head's own axis), or no change
        wrong = rot_z(torch.full((n,), view.angle)) @ R if view.angle is not None else R
        bad = _psnr(seen, render(wrong))
        assert (bad < 27.0).all(), (view.name, bad)


def test_generator_source_is_fixed_by_its_seed():
    src = GeneratorSource(6, seed=4, resolution=32)
    a_img, a_R = src.read(0, 6)
    b_img, b_R = src.read(2, 5)
    assert a_img.shape == (6, 3, 32, 32) and a_img.dtype == torch.uint8
    assert torch.equal(a_img[2:5], b_img) and torch.equal(a_R[2:5], b_R)
    again = GeneratorSource(6, seed=4, resolution=32).read(0, 6)[1]
    assert torch.equal(again, a_R)
    assert src.describe()["rotations"].startswith("uniform")
    with pytest.raises(ConfigError, match="full_range_n"):
        GeneratorSource(0)
    with pytest.raises(ConfigError, match="unknown generator"):
        GeneratorSource(2, generator="nope")


def test_tensor_source_checks_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        TensorSource(torch.zeros(2, 3, 8, 8), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="not a rotation"):
        TensorSource(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.ones(2, 3, 3))


def test_lowres_views_resample_the_image_and_keep_the_label():
    """HopeNet's low-resolution protocol: one view per factor; the label is the stored one; the
    image keeps its size, loses its fine detail (a 1-px checkerboard becomes flat grey at factor
    2 and more) and keeps its coarse content (a smooth ramp survives)."""
    from clerf.evaluation.protocols import LOWRES_FACTORS, downsample_upsample

    views = build_views("lowres")
    assert [v.name for v in views] == [f"down{f}" for f in LOWRES_FACTORS]
    assert [v.factor for v in views] == [1, 2, 3, 4, 6] and all(v.euler for v in views)
    R = random_rotation(2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ii, jj = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    checker = ((ii + jj) % 2).float().expand(2, 3, 48, 48).contiguous()
    ramp = (jj.float() / 47).expand(2, 3, 48, 48).contiguous()
    for v in views:
        out, lab = v.apply(checker, R)
        assert out.shape == checker.shape and lab is R
        if v.factor == 1:
            assert torch.equal(out, checker)
        else:
            assert (out[..., 8:-8, 8:-8] - 0.5).abs().max() < 0.1, v.name
            smooth = downsample_upsample(ramp, v.factor)
            assert (smooth - ramp)[..., 8:-8, 8:-8].abs().max() < 0.03, v.name
