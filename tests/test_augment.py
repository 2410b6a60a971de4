"""Tests of clerf.augment: sign pins, exact label composition, triplet semantics, oracle."""

from __future__ import annotations

import importlib.util

import kornia
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.augment import (
    GeometricParams,
    PoseAugment,
    affine_matrix,
    compose_rotation,
    to_float_images,
    warp_images,
)
from clerf.geometry import (
    hflip_rotation,
    random_rotation,
    rot_z,
    rotate_inplane,
    rotation_from_euler,
    vflip_rotation,
)

NO_PHOTO = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p_grayscale=0.0,
                p_blur=0.0, p_noise=0.0)  # fmt: skip
HAS_PROCEDURAL = importlib.util.find_spec("generators.procedural") is not None


def _params(angle, hflip=False, vflip=False, n=None):
    angle = torch.as_tensor(angle, dtype=torch.float32).reshape(-1)
    n = angle.shape[0] if n is None else n
    return GeometricParams(
        angle.expand(n).clone(), torch.full((n,), hflip), torch.full((n,), vflip),
        torch.ones(n), torch.zeros(n, 2),
    )  # fmt: skip


def _dot_image(size=33, row=16, col=28):
    img = torch.zeros(1, 3, size, size)
    img[..., row, col] = 1.0
    return img


def _argmax_rc(img):
    flat = img[0, 0].flatten().argmax()
    return divmod(int(flat), img.shape[-1])


# --------------------------------------------------------------------------- sign pins


def test_kornia_rotate_positive_angle_is_counter_clockwise_on_screen():
    # A dot right of the centre goes to the TOP under kornia.rotate(+90): counter-clockwise.
    out = kornia.geometry.transform.rotate(_dot_image(), torch.tensor([90.0]))
    assert _argmax_rc(out) == (4, 16)


def test_our_positive_angle_is_clockwise_on_screen():
    # Ours: the dot right of the centre goes to the BOTTOM: clockwise, as docs/conventions.md 3
    # requires.
    out = warp_images(_dot_image(), _params(90.0))
    assert _argmax_rc(out) == (28, 16)
    out = warp_images(_dot_image(), _params(-90.0))
    assert _argmax_rc(out) == (4, 16)


@pytest.mark.parametrize("angle", [-170.0, -33.0, 12.5, 90.0, 180.0])
def test_warp_equals_kornia_rotate_with_negated_angle(angle):
    # Two independent routes: our affine matrix vs kornia's rotation matrix (opposite sign).
    img = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    ours = warp_images(img, _params(angle, n=2))
    theirs = kornia.geometry.transform.rotate(img, torch.full((2,), -angle))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_flips_equal_kornia_flips_exactly():
    img = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    h = warp_images(img, _params(0.0, hflip=True, n=3))
    v = warp_images(img, _params(0.0, vflip=True, n=3))
    assert torch.allclose(h, kornia.geometry.transform.hflip(img), atol=1e-5)
    assert torch.allclose(v, kornia.geometry.transform.vflip(img), atol=1e-5)


def test_affine_matrix_identity_and_centre_fixed():
    M = affine_matrix(_params([0.0, 37.0, -120.0]), size=31)
    assert torch.allclose(M[0], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), atol=1e-6)
    c = torch.tensor([15.0, 15.0, 1.0])
    assert torch.allclose(M @ c, torch.full((3, 2), 15.0), atol=1e-4)


# --------------------------------------------------------------------------- label composition


@settings(max_examples=40, deadline=None)
@given(
    angle=st.floats(-180, 180), hflip=st.booleans(), vflip=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_compose_rotation_is_the_geometry_rules_in_order(angle, hflip, vflip, seed):
    R = random_rotation(1, torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = _params(angle, hflip, vflip)
    expect = rotate_inplane(R, angle)
    if hflip:
        expect = hflip_rotation(expect)
    if vflip:
        expect = vflip_rotation(expect)
    got = compose_rotation(R, p)
    assert torch.allclose(got, expect, atol=1e-6)
    # a proper rotation, and the in-plane part keeps the camera direction's z component
    assert torch.allclose(got @ got.transpose(-1, -2), torch.eye(3, dtype=got.dtype), atol=1e-6)
    assert torch.allclose(torch.linalg.det(got), torch.ones(1, dtype=got.dtype), atol=1e-6)


def test_compose_rotation_frontal_face_inplane_is_roll():
    # For a frontal face the in-plane rotation is a roll change (docs/conventions.md 2: roll
    # clockwise).
    R = rotation_from_euler(0.0, 0.0, 0.0)[None]
    got = compose_rotation(R, _params(25.0))
    assert torch.allclose(got, rotation_from_euler(0.0, 0.0, 25.0)[None], atol=1e-6)


def test_framing_jitter_does_not_change_the_label():
    R = random_rotation(4, torch.Generator().manual_seed(3))
    p = GeometricParams(torch.zeros(4), torch.zeros(4, dtype=torch.bool),
                        torch.zeros(4, dtype=torch.bool), torch.tensor([0.8, 0.9, 1.1, 1.2]),
                        torch.full((4, 2), 0.05))  # fmt: skip
    assert torch.equal(compose_rotation(R, p), rotate_inplane(R, torch.zeros(4)))


# --------------------------------------------------------------------------- module behaviour


def _triplet_batch(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, 3, size, size), dtype=torch.uint8, generator=g)
    R = random_rotation(2 * b, g)
    rot = torch.stack([R[:b], R[:b], R[b:]], dim=1)  # anchor and positive share a rotation
    return images, rot


def test_triplets_anchor_positive_share_geometry_negative_does_not():
    images, rot = _triplet_batch()
    images[:, 1] = images[:, 0]  # same picture for anchor and positive
    aug = PoseAugment(dict(NO_PHOTO, p_hflip=0.5, p_vflip=0.5, scale=[1.0, 1.0], translate=0.0),
                      output_size=32)  # fmt: skip
    x, R = aug.triplets(images, rot, torch.Generator().manual_seed(5))
    assert x.shape == (4, 3, 3, 32, 32) and R.shape == (4, 3, 3, 3)
    assert torch.equal(R[:, 0], R[:, 1])
    assert torch.equal(x[:, 0], x[:, 1])  # same rotation and flips, no framing or photometric
    # the negative got other transforms: its composed rotation is not its input's in general
    delta = (R[:, 2] - rot[:, 2]).abs().amax(dim=(-1, -2))
    assert (delta > 1e-3).all()


def test_photometric_is_independent_for_anchor_and_positive():
    images, rot = _triplet_batch()
    images[:, 1] = images[:, 0]
    aug = PoseAugment({"p_noise": 1.0}, output_size=32)
    x, R = aug.triplets(images, rot, torch.Generator().manual_seed(5))
    assert torch.equal(R[:, 0], R[:, 1])
    assert not torch.allclose(x[:, 0], x[:, 1])


def test_seeded_generator_reproduces_the_batch():
    images, rot = _triplet_batch()
    aug = PoseAugment({"p_noise": 1.0, "p_blur": 0.5, "p_grayscale": 0.5}, output_size=24)
    a = aug.triplets(images, rot, torch.Generator().manual_seed(7))
    b = aug.triplets(images, rot, torch.Generator().manual_seed(7))
    c = aug.triplets(images, rot, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_output_is_float_in_unit_range_and_resized():
    images, rot = _triplet_batch(size=48)
    aug = PoseAugment({"p_noise": 1.0, "p_blur": 1.0}, output_size=32)
    x, _ = aug.triplets(images, rot, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape[-2:] == (32, 32)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_disabled_is_only_conversion():
    images, rot = _triplet_batch()
    aug = PoseAugment({"enabled": False}, output_size=32)
    x, R = aug.triplets(images, rot, torch.Generator().manual_seed(0))
    assert torch.equal(R, rot)
    assert torch.equal(x, images.float() / 255.0)


def test_to_float_images_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        to_float_images(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "bad, key",
    [({"p_hflip": 1.5}, "p_hflip"), ({"inplane_deg": 200}, "inplane_deg"),
     ({"scale": [1.2, 0.9]}, "scale"), ({"padding": "wrap"}, "padding"),
     ({"nonsense": 1}, "unknown")],
)  # fmt: skip
def test_bad_config_names_the_key(bad, key):
    from clerf.errors import ConfigError

    with pytest.raises(ConfigError, match=f"finetune.augment.*{key}"):
        PoseAugment(bad, output_size=32, section="finetune.augment")


def test_accepts_the_config_section():
    from clerf.config import load_config

    cfg = load_config(overrides=["pretrain.augment.p_vflip=0.5"])
    aug = PoseAugment(cfg.pretrain.augment, output_size=32)
    assert aug.cfg["p_vflip"] == 0.5 and aug.cfg["scale"] == [1.0, 1.15]


# --------------------------------------------------------------------------- oracle


def _psnr_disk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per image over the central disk (the head region, unchanged by rotation)."""
    s = a.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    c = (s - 1) / 2
    mask = ((yy - c) ** 2 + (xx - c) ** 2) <= (0.45 * s) ** 2
    mse = ((a - b) ** 2)[..., mask].mean(dim=(1, 2))
    return 10 * torch.log10(1.0 / mse)


@pytest.mark.skipif(not HAS_PROCEDURAL, reason="generators.procedural not available")
def test_oracle_augmented_render_matches_render_of_composed_rotation():
    """augment(render(R)) == render(composed R) on the head region; wrong rules fail."""
    from generators.procedural import ProceduralHead

    gen = ProceduralHead.aligned(seed=3)  # symmetric head, light along the optical axis
    n, hi, lo = 8, 128, 64  # render high-res, compare downsampled (less resampling error)
    R = random_rotation(n, torch.Generator().manual_seed(1))
    ids = torch.arange(n)
    src = gen.render(ids, R, hi).images
    g = torch.Generator().manual_seed(2)
    angle = torch.linspace(-170.0, 170.0, n)
    p = GeometricParams(angle, torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.5,
                        torch.ones(n), torch.zeros(n, 2))  # fmt: skip
    aug = PoseAugment(NO_PHOTO, output_size=lo)
    x, Rc = aug(src, R, params=p)
    ref = to_float_images(gen.render(ids, Rc, hi).images, lo)
    good = _psnr_disk(x, ref)
    assert good.min() > 28.0, good

    # Wrong compositions: "roll + phi" (rotation about the head's own axis), the opposite sign,
    # and forgetting the flips, all measurably fail.
    wrong_roll = torch.where(p.hflip[:, None, None], hflip_rotation(rot_z(angle) @ R),
                             rot_z(angle) @ R)  # fmt: skip
    wrong_roll = torch.where(p.vflip[:, None, None], vflip_rotation(wrong_roll), wrong_roll)
    wrong_sign = compose_rotation(R, GeometricParams(-angle, p.hflip, p.vflip, p.scale,
                                                     p.translate))  # fmt: skip
    no_flip = rotate_inplane(R, angle)
    for wrong in (wrong_roll, wrong_sign, no_flip):
        bad = _psnr_disk(x, to_float_images(gen.render(ids, wrong, hi).images, lo))
        differs = (wrong - Rc).abs().amax(dim=(-1, -2)) > 1e-3
        assert differs.any()
        assert (bad[differs] < 26.0).float().mean() >= 0.75, bad
        assert bad[differs].mean() < good.mean() - 10.0


def test_chroma_matrix_keeps_luma_and_scales_rotates_chroma():
    from clerf.augment import chroma_matrix

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sat = torch.tensor([1.0, 0.5, 1.3, 0.0])
    hue = torch.tensor([0.0, 0.4, -1.0, 2.0])
    M = chroma_matrix(sat, hue).double()
    y = torch.einsum("nij,njhw->nihw", M, x)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose((y * luma).sum(1), (x * luma).sum(1), atol=1e-6)
    assert torch.allclose(y[0], x[0], atol=1e-6)  # identity
    gray = (x[3] * luma[0]).sum(0, keepdim=True).expand(3, -1, -1)
    assert torch.allclose(y[3], gray, atol=1e-5)  # saturation 0 = grayscale
    # chroma magnitude scales by the saturation factor (rotation keeps it)
    from clerf.augment import _YIQ

    def chroma(v):
        return torch.einsum("ij,jhw->ihw", _YIQ, v)[1:].norm(dim=0)

    assert torch.allclose(chroma(y[1]), 0.5 * chroma(x[1]), atol=1e-6)
    assert torch.allclose(chroma(y[2]), 1.3 * chroma(x[2]), atol=1e-6)


def test_framing_is_drawn_per_image_in_triplets():
    # Head size and position must not tell the positive from the negative: scale and shift are
    # independent for the three images, while the label-changing transform is shared by a and p.
    images, rot = _triplet_batch(b=16)
    images[:] = images[:1, :1]  # one picture everywhere
    aug = PoseAugment(dict(NO_PHOTO, inplane_deg=0.0, p_hflip=0.0, scale=[1.0, 1.3],
                           translate=0.1), output_size=32)  # fmt: skip
    x, R = aug.triplets(images, rot, torch.Generator().manual_seed(0))
    assert torch.equal(R[:, 0], R[:, 1])
    assert not torch.allclose(x[:, 0], x[:, 1])  # different framing although same picture

