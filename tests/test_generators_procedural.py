"""The procedural head generator: contract, conventions (docs/conventions.md 2 and 3), determinism.

The oracle tests here are the ones the whole project relies on: they pin what a rotation label
means in a rendered image, and the exact in-plane and flip rules, with a renderer whose scene
transforms with the camera (``ProceduralHead.aligned``).
"""

from __future__ import annotations

import math

import kornia
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.geometry import (
    camera_direction,
    hflip_rotation,
    random_rotation,
    rot_z,
    rotate_inplane,
    rotation_from_euler,
)
from generators import available_generators, build_generator
from generators.base import identity_seed
from generators.procedural import LENS_ID_OFFSET, PARTS, ProceduralHead

P = {name: i for i, name in enumerate(PARTS)}
FACE_PARTS = [P[n] for n in ("nose_tip", "nose_bridge", "eye_r", "eye_l", "lip_upper",
                             "lip_lower")]  # fmt: skip


def euler(p: float, y: float, r: float) -> torch.Tensor:
    return rotation_from_euler(torch.tensor([p]), torch.tensor([y]), torch.tensor([r]))


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(col, row) centroid of a boolean (H, W) mask, pixel centres at integers."""
    assert mask.any(), "part not visible"
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return float(cols.float().mean()), float(rows.float().mean())


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, peak 255) of (3, H, W) images over a (H, W) mask."""
    err = ((a.float() - b.float()) ** 2).mean(0)[mask]
    return float(10 * torch.log10(255.0**2 / err.mean().clamp_min(1e-12)))


def non_frontal(n: int, gen: torch.Generator, min_deg: float = 30.0) -> torch.Tensor:
    """Random rotations whose camera direction is at least ``min_deg`` from frontal."""
    out = []
    while len(out) < n:
        R = random_rotation(1, gen)[0]
        if math.degrees(math.acos(float(camera_direction(R)[2]))) >= min_deg:
            out.append(R)
    return torch.stack(out)


# --------------------------------------------------------------------------- contract


def test_registry_and_contract() -> None:
    assert "procedural" in available_generators()
    g = build_generator("procedural", seed=1, device="cpu", supersample=1)
    assert isinstance(g, ProceduralHead)
    ids = torch.arange(3)
    R = random_rotation(3, torch.Generator().manual_seed(0), dtype=torch.float64)
    out = g.render(ids, R, 32)
    assert out.images.shape == (3, 3, 32, 32) and out.images.dtype == torch.uint8
    assert out.rotations.dtype == torch.float32 and out.rotations.shape == (3, 3, 3)
    torch.testing.assert_close(out.rotations, R.float())
    assert out.images.device.type == "cpu"
    empty = g.render(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, 3), 32)
    assert empty.images.shape == (0, 3, 32, 32) and empty.rotations.shape == (0, 3, 3)
    # params rebuild the same generator
    g2 = build_generator("procedural", seed=1, **g.params())
    assert torch.equal(g2.render(ids, R, 32).images, out.images)


def test_bad_input() -> None:
    g = ProceduralHead(seed=0)
    ids = torch.arange(2)
    R = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="not a rotation"):
        g.render(ids, R * 1.1, 32)
    with pytest.raises(ValueError, match="not a rotation"):
        g.render(ids, torch.diag(torch.tensor([-1.0, 1, 1])).expand(2, 3, 3), 32)
    for res in (8, 2048, 31.5, "64", True):
        with pytest.raises(ValueError, match="resolution"):
            g.render(ids, R, res)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rotations: expected shape"):
        g.render(ids, torch.eye(3).expand(3, 3, 3), 32)
    with pytest.raises(ValueError, match="identities"):
        g.render(torch.zeros(2), R, 32)
    with pytest.raises(ValueError, match="background"):
        ProceduralHead(background="stripes")
    with pytest.raises(ValueError, match="fov_range"):
        ProceduralHead(fov_range=(30, 10))
    with pytest.raises(ValueError, match="unknown generator 'nope'"):
        build_generator("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        build_generator("procedural", colour="red")


def test_determinism_and_identity_independence() -> None:
    R = random_rotation(4, torch.Generator().manual_seed(5))
    ids = torch.tensor([7, 3, 11, 7])
    a = ProceduralHead(seed=2).render(ids, R, 32).images
    b = ProceduralHead(seed=2).render(ids, R, 32).images
    assert torch.equal(a, b)
    # identity 11 alone, in another batch, renders the same face
    alone = ProceduralHead(seed=2).render(torch.tensor([11]), R[2:3], 32).images
    assert torch.equal(alone[0], a[2])
    # another seed, or another identity, is another face
    c = ProceduralHead(seed=3).render(ids, R, 32).images
    assert not torch.equal(a[0], c[0])
    d = ProceduralHead(seed=2).render(torch.tensor([8]), R[0:1], 32).images
    assert not torch.equal(a[0], d[0])
    assert identity_seed(0, 1) != identity_seed(1, 0) and identity_seed(2, 7) == identity_seed(2, 7)


def test_identity_variation_is_wide() -> None:
    g = ProceduralHead(seed=0)
    sc = g.scene(torch.arange(400))
    glasses = sc.glasses.float().mean()
    beard = sc.active[:, P["beard"]].float().mean()
    bald = (~sc.active[:, P["hair_cap"]]).float().mean()
    assert 0.15 < glasses < 0.35 and 0.1 < beard < 0.3 and 0.05 < bald < 0.2
    skin = sc.albedo[:, P["face"]].mean(-1)
    assert skin.max() - skin.min() > 0.5  # dark to light skin
    assert sc.axes[:, P["skull"]].std(0).min() > 0.02  # head proportions vary
    assert sc.fov.max() - sc.fov.min() > 20 and sc.shift.abs().max() > 0
    assert (sc.clutter[..., 0].sum(-1) > 0).float().mean() > 0.5
    assert (sc.occluder[:, 0] > 0).any() and (sc.bg_tex > 0).any() and (sc.bg_grad > 0).any()
    # the aligned scene switches off everything that does not turn with the camera
    a = ProceduralHead.aligned(seed=0).scene(torch.arange(50))
    assert (a.shift == 0).all() and (a.clutter[..., 0] == 0).all() and (a.occluder[:, 0] == 0).all()
    assert (a.bg_grad == 0).all() and (a.bg_tex == 0).all()
    z = torch.tensor([[0.0, 0, 1]], dtype=a.light.dtype)
    torch.testing.assert_close(a.light, z.expand(50, 3))


# --------------------------------------------------------------------------- docs/conventions.md 2


@pytest.mark.parametrize("seed", [0, 1])
def test_yaw_pitch_roll_meaning(seed: int) -> None:
    """yaw +30: nose tip left of the head centre; pitch +30: above; roll +30: eye line CW."""
    g = ProceduralHead(seed=seed, translation=0.0, occluder_prob=0.0, glasses_prob=0.0)
    poses = [(0, 30, 0), (0, -30, 0), (30, 0, 0), (-30, 0, 0), (0, 0, 30), (0, 0, -30)]
    n_id, res = 4, 96
    ids = torch.arange(n_id).repeat_interleave(len(poses))
    e = torch.tensor(poses, dtype=torch.float32).repeat(n_id, 1)
    maps = g.render_maps(ids, rotation_from_euler(e[:, 0], e[:, 1], e[:, 2]), res).part_ids
    centre = (res - 1) / 2  # the head centre projects to the image centre (no translation)
    for j in range(len(ids)):
        m, (pitch, yaw, roll), who = maps[j], poses[j % len(poses)], f"identity {int(ids[j])}"
        x, y = centroid(m == P["nose_tip"])
        if yaw:  # positive yaw turns the face toward the image's left
            assert math.copysign(1, -yaw) * (x - centre) > 2, f"{who}, yaw {yaw}: nose x {x:.1f}"
        if pitch:  # positive pitch tilts the face up (image rows grow downward)
            assert math.copysign(1, -pitch) * (y - centre) > 1, f"{who}, pitch {pitch}: {y:.1f}"
        if roll:
            xr, yr = centroid(m == P["eye_r"])
            xl, yl = centroid(m == P["eye_l"])
            # image y points down, so a clockwise turn by +30 deg is atan2(dy, dx) = +30 deg
            angle = math.degrees(math.atan2(yr - yl, xr - xl))
            assert abs(angle - roll) < 4, f"{who}, roll {roll}: eye line at {angle:.1f}"


def test_projected_anchors_agree_with_rendered_parts() -> None:
    """The camera model (``project``) and the rendered part ids agree on where the nose is."""
    g = ProceduralHead(seed=4, occluder_prob=0.0, glasses_prob=0.0)
    ids = torch.arange(3)
    R = rotation_from_euler(torch.tensor([10.0, -20, 5]), torch.tensor([-35.0, 25, 0]),
                            torch.tensor([0.0, 15, -20]))  # fmt: skip
    maps = g.render_maps(ids, R, 128)
    eyes = g.part_centres(ids)
    for i in range(3):
        px = g.project(ids[i : i + 1], R[i : i + 1], 128, eyes["eye_r"][i : i + 1].unsqueeze(1))
        x, y = centroid(maps.part_ids[i] == P["eye_r"])
        assert abs(px[0, 0, 0] - x) < 2.5 and abs(px[0, 0, 1] - y) < 2.5


@settings(max_examples=40, deadline=None)
@given(
    q=st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(
        lambda v: sum(x * x for x in v) > 0.1
    ),
    phi=st.floats(-180, 180),
)
def test_projection_turns_with_inplane_rule(q: list[float], phi: float) -> None:
    """Camera math: projecting with ``R @ Rz(phi)`` = projecting with ``R``, then turning the
    image clockwise by ``phi`` about its centre (no rendering, exact up to float error)."""
    w, x, y, z = (v / math.sqrt(sum(c * c for c in q)) for v in q)
    R = torch.tensor(
        [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]],
        dtype=torch.float64,
    ).unsqueeze(0)  # fmt: skip
    g = ProceduralHead.aligned(seed=0)
    ids = torch.tensor([5])
    pts = torch.tensor([[0.0, -0.3, 0.9], [0.5, 0.4, -0.2], [-0.7, 0.0, 0.1]], dtype=torch.float64)
    res = 64
    a = g.project(ids, R, res, pts)[0].double() - (res - 1) / 2
    b = g.project(ids, rotate_inplane(R, phi), res, pts)[0].double() - (res - 1) / 2
    c, s = math.cos(math.radians(phi)), math.sin(math.radians(phi))
    # clockwise on screen with image y down: (x, y) -> (x c - y s, x s + y c)
    turned = torch.stack([a[:, 0] * c - a[:, 1] * s, a[:, 0] * s + a[:, 1] * c], -1)
    torch.testing.assert_close(b, turned, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- docs/conventions.md 3


def _oracle_setup(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    R = non_frontal(n, gen)
    mag = 20 + torch.rand(n, generator=gen) * 140  # |phi| in [20, 160] deg: the wrong rule shows
    phi = torch.where(torch.rand(n, generator=gen) < 0.5, -mag, mag)
    return torch.arange(n) + 10 * seed, R, phi


@pytest.mark.slow
def test_inplane_rotation_oracle() -> None:
    """``render(rotate_inplane(R, phi))`` == ``render(R)`` turned clockwise by phi (PSNR >= 30 dB
    on the head region after rendering at 256 px and area-downsampling to 64 px); the wrong rule
    ``Rz(phi) @ R`` (roll + phi) fails the same threshold."""
    g = ProceduralHead.aligned(seed=11)
    ids, R, phi = _oracle_setup(6, seed=0)
    hi, res = 256, 64
    f = hi // res
    base = g.render(ids, R, hi).images.float()
    good = g.render_maps(ids, rotate_inplane(R, phi), hi)
    wrong = g.render(ids, rot_z(phi) @ R, hi).images.float()
    # kornia's rotate turns counter-clockwise for positive angles: clockwise is -phi
    turned = kornia.geometry.transform.rotate(base, -phi)
    down = lambda x: F.avg_pool2d(x, f)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(res) - (res - 1) / 2, torch.arange(res) - (res - 1) / 2,
                            indexing="ij")  # fmt: skip
    disc = xx**2 + yy**2 < (res / 2 - 1) ** 2  # what a rotation keeps inside the frame
    for i in range(len(ids)):
        head = F.max_pool2d((good.part_ids[i] >= 0).float()[None, None], f)[0, 0] > 0
        mask = head & disc
        assert mask.sum() > 200
        ok = psnr(down(turned[i : i + 1])[0], down(good.images[i : i + 1].float())[0], mask)
        bad = psnr(down(turned[i : i + 1])[0], down(wrong[i : i + 1])[0], mask)
        assert ok >= 30, f"sample {i}: phi {float(phi[i]):.1f}, PSNR {ok:.1f} dB"
        assert bad < 30, f"sample {i}: wrong rule passes with {bad:.1f} dB"


def test_kornia_rotate_sign_is_pinned() -> None:
    """kornia ``rotate(img, +a)`` turns the image counter-clockwise on screen (y down)."""
    img = torch.zeros(1, 1, 33, 33)
    img[0, 0, 16, 28] = 1.0  # a dot right of the centre
    out = kornia.geometry.transform.rotate(img, torch.tensor([90.0]))
    r, c = divmod(int(out[0, 0].argmax()), 33)
    assert (r, c) == (4, 16)  # now above the centre: counter-clockwise


def test_hflip_oracle() -> None:
    """``render(hflip_rotation(R))`` == mirrored ``render(R)`` for symmetric identities."""
    g = ProceduralHead.aligned(seed=5, supersample=2)
    ids, R, _ = _oracle_setup(6, seed=1)
    res = 64
    base = g.render(ids, R, res).images
    flipped = g.render_maps(ids, hflip_rotation(R), res)
    for i in range(len(ids)):
        mask = F.max_pool2d((flipped.part_ids[i] >= 0).float()[None, None], 3, 1, 1)[0, 0] > 0
        assert psnr(base[i].flip(-1), flipped.images[i], mask) >= 30
        assert psnr(base[i], flipped.images[i], mask) < 30  # not trivially symmetric
    # without symmetry the mirror image is a different face
    asym = ProceduralHead(seed=5, background="plain", clutter=False, translation=0.0,
                         light="camera", occluder_prob=0.0)  # fmt: skip
    a = asym.render(ids, R, res).images
    b = asym.render_maps(ids, hflip_rotation(R), res)
    masks = [F.max_pool2d((b.part_ids[i] >= 0).float()[None, None], 3, 1, 1)[0, 0] > 0
             for i in range(len(ids))]  # fmt: skip
    assert min(psnr(a[i].flip(-1), b.images[i], masks[i]) for i in range(len(ids))) < 30


# --------------------------------------------------------------------------- every rotation


def test_any_rotation_renders_a_head() -> None:
    """Back of the head, profile, upside-down, random SO(3): finite, the head always visible."""
    g = ProceduralHead(seed=9, occluder_prob=0.0)
    special = rotation_from_euler(torch.tensor([0.0, 0, 0, 90, -90, 0]),
                                  torch.tensor([180.0, 90, 0, 0, 0, 89.999]),
                                  torch.tensor([0.0, 0, 180, 0, 0, 0]))  # fmt: skip
    R = torch.cat([special, random_rotation(10, torch.Generator().manual_seed(3))])
    ids = torch.arange(len(R))
    maps = g.render_maps(ids, R, 48)
    for i in range(len(R)):
        head = maps.part_ids[i] >= 0
        assert head.float().mean() > 0.15, f"rotation {i}: head covers {head.float().mean():.2f}"
        assert torch.isfinite(maps.depth[i][head]).all()
    # from behind: no face parts; upside down: the nose is above the eyes
    back = maps.part_ids[0]
    assert not torch.isin(back, torch.tensor(FACE_PARTS)).any()
    up = g.render_maps(torch.tensor([1]), euler(0, 0, 180), 96).part_ids[0]
    _, y_nose = centroid(up == P["nose_tip"])
    _, y_eye = centroid((up == P["eye_r"]) | (up == P["eye_l"]))
    assert y_nose < y_eye


def test_lens_rims_and_supersampling() -> None:
    g = ProceduralHead(seed=0, glasses_prob=1.0, occluder_prob=0.0, supersample=2)
    maps = g.render_maps(torch.arange(2), euler(0, 10, 0).expand(2, 3, 3), 64)
    assert (maps.part_ids >= LENS_ID_OFFSET).any()  # frames drawn
    assert maps.images.shape == (2, 3, 64, 64) and maps.part_ids.shape == (2, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:  # pragma: no cover - GPU only
    R = random_rotation(4, torch.Generator().manual_seed(0))
    ids = torch.arange(4)
    a = ProceduralHead(seed=0).render(ids, R, 64).images
    b = ProceduralHead(seed=0, device="cuda").render(ids, R.cuda(), 64).images.cpu()
    assert (a.int() - b.int()).abs().float().mean() < 1.0


def test_studio_style_is_another_domain_with_the_same_geometry() -> None:
    from clerf.geometry import random_rotation

    R = random_rotation(6, torch.Generator().manual_seed(3))
    ids = torch.arange(6)
    base = ProceduralHead(seed=2, occluder_prob=0.0)
    studio = ProceduralHead(seed=2, occluder_prob=0.0, style="studio")
    a, b = base.render_maps(ids, R, 48), studio.render_maps(ids, R, 48)
    # same identities' shapes and cameras: the same parts at the same pixels
    assert torch.equal(a.part_ids, b.part_ids) and torch.allclose(a.depth, b.depth)
    # another palette, lighting and backdrop: the images differ clearly
    diff = (a.images.float() - b.images.float()).abs().mean(dim=(1, 2, 3))
    assert (diff > 10.0).all(), diff
    # deterministic, and recorded in the parameters
    assert torch.equal(studio.render(ids, R, 48).images, b.images)
    assert studio.params()["style"] == "studio" and base.params()["style"] == "default"
    with pytest.raises(ValueError, match="style"):
        ProceduralHead(style="cartoon")
