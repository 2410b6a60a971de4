"""EG3D / PanoHead adapters, tested with a stand-in network that has the GANs' call interface.

The stand-in (its source is below, written into a temporary "checkout" folder, as a user's EG3D
code would be) renders the procedural head from the 25-number camera it receives, inverting the
camera mapping. So the adapter's output at a target ``R`` must match ``procedural`` at ``R`` by
the same oracle as in ``test_generators_procedural.py``. The camera mapping itself is checked
against EG3D's published sampler formulas, re-derived here independently.
"""

from __future__ import annotations

import importlib
import math
import pickle
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from clerf.geometry import (
    camera_direction,
    rot_z,
    rotate_inplane,
    rotation_from_euler,
    split_camera_inplane,
)
from generators import build_generator
from generators.camera import (
    EG3D_FFHQ,
    PANOHEAD,
    camera_from_rotation,
    camera_position,
    rotation_from_camera,
)
from generators.gan import EG3DGenerator, PanoHeadGenerator
from generators.procedural import ProceduralHead

STANDIN_SOURCE = textwrap.dedent(
    '''
    """A stand-in for a user's EG3D/PanoHead network (same call interface)."""
    import torch

    from generators.camera import camera_position, rotation_from_camera
    from generators.procedural import ProceduralHead


    class StandInGAN(torch.nn.Module):
        z_dim = 512
        c_dim = 25
        w_dim = 512

        def __init__(self, img_resolution=128, radius=2.7, pivot=(0.0, 0.0, 0.2), draws=False):
            super().__init__()
            self.img_resolution = img_resolution
            self.radius, self.pivot = radius, pivot
            self.head = ProceduralHead.aligned(seed=123)
            self.calls = []
            # EG3D's renderer draws depth jitter and importance samples from torch's global
            # generator; draws=True imitates that with noise drawn the same way.
            self.draws = draws

        @staticmethod
        def identity_of(z):
            """Which procedural identity a latent code stands for."""
            return ((z[:, 0] * 1000).round().long() % 997).abs()

        def mapping(self, z, c, truncation_psi=1.0, truncation_cutoff=None):
            assert z.shape[1] == self.z_dim and c.shape[1] == self.c_dim
            self.calls.append(("mapping", c.detach().cpu().clone(), truncation_psi))
            return z[:, None, :].repeat(1, 14, 1)

        def synthesis(self, ws, c, noise_mode="random"):
            self.calls.append(("synthesis", c.detach().cpu().clone(), noise_mode))
            c = c.double().cpu()
            R = rotation_from_camera(c)  # invert the camera mapping
            # as EG3D's cameras: on the sphere of the preset radius about the world origin,
            # looking at the pivot
            dist = camera_position(c).norm(dim=-1)
            assert torch.allclose(dist, torch.full_like(dist, self.radius), atol=1e-4)
            ray = camera_position(c) - torch.tensor(self.pivot, dtype=c.dtype)
            assert torch.allclose(ray / ray.norm(dim=-1, keepdim=True), R[:, :, 2], atol=1e-4)
            ids = self.identity_of(ws[:, 0].cpu())
            img = self.head.render(ids, R.float(), self.img_resolution).images
            img = img.float().to(ws.device) / 127.5 - 1.0
            if self.draws:
                img = img + (torch.rand(img.shape) - 0.5).to(img.device) * 0.05
            return {"image": img}
    '''
)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """The stand-in module, importable from a temporary checkout folder."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    name = f"clerf_standin_{abs(hash(str(tmp_path))) % 10**8}"
    (checkout / f"{name}.py").write_text(STANDIN_SOURCE)
    monkeypatch.syspath_prepend(str(checkout))
    mod = importlib.import_module(name)
    yield mod, checkout, name
    sys.modules.pop(name, None)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    err = ((a.float() - b.float()) ** 2).mean(0)[mask]
    return float(10 * torch.log10(255.0**2 / err.mean().clamp_min(1e-12)))


# --------------------------------------------------------------------------- camera mapping


def _eg3d_sampler(h: float, v: float, lookat: torch.Tensor, radius: float) -> torch.Tensor:
    """EG3D's ``LookAtPoseSampler.sample`` + ``create_cam2world_matrix``, re-derived from their
    documented formulas (angles in radians): polar angle ``arccos(1 - 2 v / pi)``; camera at
    ``radius * (sin(phi) cos(pi - h), cos(phi), sin(phi) sin(pi - h))``; world up (0, 1, 0);
    right = -normalize(up x forward), up' = normalize(forward x right); columns (right, up',
    forward)."""
    phi = math.acos(1 - 2 * v / math.pi)
    origin = radius * torch.tensor(
        [math.sin(phi) * math.cos(math.pi - h), math.cos(phi),
         math.sin(phi) * math.sin(math.pi - h)],  # fmt: skip
        dtype=torch.float64,
    )
    fwd = lookat.double() - origin
    fwd = fwd / fwd.norm()
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    right = -torch.linalg.cross(up, fwd)
    right = right / right.norm()
    up2 = torch.linalg.cross(fwd, right)
    up2 = up2 / up2.norm()
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.stack([right, up2, fwd], -1)
    m[:3, 3] = origin
    return m


@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (30.0, 0.0), (-50.0, 20.0), (120.0, -35.0)])
def test_camera_matches_eg3d_sampler(yaw: float, pitch: float) -> None:
    """Our camera for a roll-free label equals EG3D's sampler at h = pi/2 + yaw and
    v = pi (1 + sin(pitch)) / 2 (its vertical argument is not the elevation), pivot at 0."""
    d = torch.float64
    R = rotation_from_euler(torch.tensor([pitch], dtype=d), torch.tensor([yaw], dtype=d), 0.0)
    c = camera_from_rotation(R, PANOHEAD)
    h = math.pi / 2 + math.radians(yaw)
    v = math.pi * (1 + math.sin(math.radians(pitch))) / 2
    ref = _eg3d_sampler(h, v, torch.zeros(3), 2.7)
    torch.testing.assert_close(c[0, :16].view(4, 4), ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(c[0, 16:].view(3, 3)[0, 0].item(), 4.2647)
    # the sampler's frontal camera has label identity, and its label round-trips
    torch.testing.assert_close(rotation_from_camera(c), R, atol=1e-12, rtol=0)


def test_eg3d_sampler_label_is_derived_from_the_matrix() -> None:
    """``LookAtPoseSampler(pi/2, pi/2 + p)`` does not give pitch ``p``: the label read from its
    matrix is ``asin(2 p / pi)``-ish (docs/conventions.md 4)."""
    p = math.radians(20)
    m = _eg3d_sampler(math.pi / 2, math.pi / 2 + p, torch.zeros(3), 2.7)
    c = torch.cat([m.flatten(), torch.zeros(9, dtype=torch.float64)])[None]
    R = rotation_from_camera(c)[0]
    pitch = math.degrees(math.atan2(R[2, 1], R[2, 2]))
    assert abs(pitch - math.degrees(math.asin(2 * p / math.pi))) < 1e-6
    assert abs(pitch - 20.0) > 2  # not what was asked for
    # with the EG3D pivot, the frontal camera looks at (0, 0, 0.2) from 2.7 about the origin
    c2 = camera_from_rotation(torch.eye(3, dtype=torch.float64)[None], EG3D_FFHQ)
    expected = torch.tensor([0, 0, 2.7], dtype=torch.float64)
    torch.testing.assert_close(camera_position(c2)[0], expected)


_GRID = [(h, v) for h in (0.6, 1.1, math.pi / 2, 2.0, 2.6, 4.0)
         for v in (0.7, 1.2, math.pi / 2, 2.3)]


@pytest.mark.parametrize("h,v", _GRID)
def test_eg3d_camera_is_eg3d_samplers_camera(h: float, v: float) -> None:
    """For a grid of directions, clerf's EG3D camera of the sampler's label IS the sampler's
    camera: same rotation and translation (to 1e-7) as ``LookAtPoseSampler.sample(h, v,
    (0, 0, 0.2), radius=2.7)``; and its centre meets the ray-sphere condition: on the sphere of
    radius 2.7 about the origin, on the viewing ray through the pivot, in front of it."""
    pivot = torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64)
    ref = _eg3d_sampler(h, v, pivot, 2.7)
    c_ref = torch.cat([ref.flatten(), torch.zeros(9, dtype=torch.float64)])[None]
    label = rotation_from_camera(c_ref)
    c = camera_from_rotation(label, EG3D_FFHQ)
    torch.testing.assert_close(c[0, :16].view(4, 4), ref, atol=1e-7, rtol=0)
    pos = camera_position(c)[0]
    assert abs(float(pos.norm()) - 2.7) < 1e-12
    ray = pos - pivot
    d = label[0, :, 2]  # the viewing direction of the label (toward the camera)
    assert float(torch.linalg.cross(ray, d).norm()) < 1e-12 and float(ray @ d) > 0
    # not 2.7 from the pivot (clerf's former rule), except where the two spheres meet
    if abs(float(d[2])) > 0.1:
        assert abs(float(ray.norm()) - 2.7) > 1e-3


def test_rotation_from_camera_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected \\(B, 25\\)"):
        rotation_from_camera(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="not a rotation"):
        rotation_from_camera(torch.zeros(1, 25))


# --------------------------------------------------------------------------- adapter oracle


@pytest.mark.slow
def test_adapter_matches_procedural_oracle(standin) -> None:
    """eg3d adapter at target R (with roll) == procedural at R; roll + phi would fail."""
    mod, _, _ = standin
    net = mod.StandInGAN(img_resolution=160)
    gen = EG3DGenerator.from_network(net, seed=4, truncation_psi=0.5)
    ref = ProceduralHead.aligned(seed=123)
    R0 = rotation_from_euler(torch.tensor([15.0, -20, 5, 30]), torch.tensor([35.0, -40, 20, 10]),
                             torch.tensor([0.0, 0, 0, 0]))  # fmt: skip
    phi = torch.tensor([40.0, -75.0, 120.0, -30.0])
    R = rotate_inplane(R0, phi)
    ids = torch.arange(4)
    out = gen.render(ids, R, 40)
    assert out.images.shape == (4, 3, 40, 40) and out.images.dtype == torch.uint8
    torch.testing.assert_close(out.rotations, R.float(), atol=1e-5, rtol=0)
    # conditioning is the frontal camera; truncation is passed through
    kind, cond, psi = net.calls[0]
    assert kind == "mapping" and psi == 0.5
    conds = torch.cat([c for k, c, _ in net.calls if k == "mapping"])
    eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    torch.testing.assert_close(rotation_from_camera(conds.double()), eye, atol=1e-6, rtol=0)
    j = net.identity_of(gen.latents(ids))
    good = ref.render_maps(j, R, 160)
    down = lambda x: F.avg_pool2d(x.float(), 4)  # noqa: E731
    wrong = down(ref.render(j, rot_z(phi) @ R0, 160).images)
    yy, xx = torch.meshgrid(torch.arange(40) - 19.5, torch.arange(40) - 19.5, indexing="ij")
    disc = xx**2 + yy**2 < 19**2
    for i in range(4):
        head = (F.max_pool2d((good.part_ids[i] >= 0).float()[None, None], 4)[0, 0] > 0) & disc
        ok = psnr(out.images[i], down(good.images[i : i + 1])[0], head)
        bad = psnr(out.images[i], wrong[i], head)
        assert ok >= 30, f"sample {i}: PSNR {ok:.1f} dB"
        assert bad < 30, f"sample {i}: the wrong rule passes ({bad:.1f} dB)"


def test_reachable_ranges_and_resampling(standin) -> None:
    mod, _, _ = standin
    eg = EG3DGenerator.from_network(mod.StandInGAN(img_resolution=32), max_angle=60)
    pano = PanoHeadGenerator.from_network(mod.StandInGAN(img_resolution=32, pivot=(0, 0, 0)))
    R = rotation_from_euler(torch.tensor([0.0, 0, 0, 70, 0]), torch.tensor([0.0, 59, 61, 0, 180]),
                            torch.tensor([0.0, 170, 0, 0, 45]))  # fmt: skip
    assert eg.reachable(R).tolist() == [True, True, False, False, False]
    assert pano.reachable(R).tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError, match="outside the usable range"):
        eg.render(torch.arange(5), R, 32)
    rs = EG3DGenerator.from_network(mod.StandInGAN(img_resolution=32), unreachable="resample")
    a = rs.render(torch.arange(5), R, 32)
    b = rs.render(torch.arange(5), R, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.rotations, b.rotations)
    assert rs.reachable(a.rotations).all()
    torch.testing.assert_close(a.rotations[:2], R[:2], atol=1e-5, rtol=0)  # kept as asked
    # the in-plane angle of a resampled target is kept: same roll-free split
    _, phi_a = split_camera_inplane(a.rotations)
    _, phi_r = split_camera_inplane(R)
    torch.testing.assert_close(phi_a, phi_r.float(), atol=1e-3, rtol=0)
    # PanoHead renders the back of the head
    back = pano.render(torch.tensor([0]), rotation_from_euler(0.0, 180.0, 0.0)[None], 32)
    assert camera_direction(back.rotations.double())[0, 2] < -0.99


def test_renders_repeat_byte_for_byte_when_the_network_draws_random_numbers(standin) -> None:
    """A network drawing from torch's global generator (as EG3D's renderer does) still gives
    byte-identical renders: twice the same call, after other draws, alone or in another batch;
    the caller's global generator state is left as it was."""
    mod, _, _ = standin
    R = rotation_from_euler(torch.tensor([5.0, -10, 20]), torch.tensor([10.0, 30, -25]),
                            torch.tensor([0.0, 40, -90]))  # fmt: skip
    ids = torch.tensor([3, 7, 11])
    net = mod.StandInGAN(img_resolution=32, draws=True)
    gen = EG3DGenerator.from_network(net, seed=2)
    a = gen.render(ids, R, 32)
    # the mapping network is conditioned on EG3D's own frontal camera: (0, 0, 2.7), not 2.9
    conds = torch.cat([c for k, c, _ in net.calls if k == "mapping"]).double()
    expected = torch.tensor([0.0, 0.0, 2.7], dtype=torch.float64).expand(len(ids), 3)
    torch.testing.assert_close(camera_position(conds), expected, atol=1e-6, rtol=0)
    torch.rand(1000)  # someone else draws in between
    b = gen.render(ids, R, 32)
    assert torch.equal(a.images, b.images)
    alone = gen.render(ids[1:2], R[1:2], 32)  # as a resumed run or another shard would
    assert torch.equal(alone.images[0], a.images[1])
    other = gen.render(torch.tensor([7, 3]), R[[1, 0]], 32)  # other batch, other order
    assert torch.equal(other.images, a.images[[1, 0]])
    state = torch.get_rng_state()
    gen.render(ids, R, 32)
    assert torch.equal(torch.get_rng_state(), state)
    # the draws do reach the image: seeded differently (another seed) it differs
    gen2 = EG3DGenerator.from_network(mod.StandInGAN(img_resolution=32, draws=True), seed=2,
                                      rng="global")
    c, d = gen2.render(ids, R, 32), gen2.render(ids, R, 32)
    assert not torch.equal(c.images, d.images)  # EG3D's own behaviour: not repeatable
    with pytest.raises(ValueError, match="rng must be one of"):
        EG3DGenerator.from_network(mod.StandInGAN(img_resolution=32), rng="fixed")


# --------------------------------------------------------------------------- loading


LEGACY_SOURCE = textwrap.dedent(
    """
    import pickle


    def load_network_pkl(f, force_fp16=False):
        # as EG3D's legacy.py: it validates G, D and G_ema
        data = pickle.load(f)
        assert data['G'] is not None
        assert data['D'] is not None
        return data
    """
)


def test_loading_a_pickle_with_only_g_ema(standin, tmp_path) -> None:
    """EG3D's loader raises KeyError: 'G' on a G_ema-only pickle: clerf loads G_ema directly."""
    mod, checkout, _ = standin
    (checkout / "legacy.py").write_text(LEGACY_SOURCE)
    sys.modules.pop("legacy", None)
    pkl = tmp_path / "g_ema_only.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"G_ema": mod.StandInGAN(img_resolution=32)}, f)
    try:
        g = build_generator("eg3d", seed=0, checkout=str(checkout), network=str(pkl),
                            trust_pickle=True)  # fmt: skip
        assert g.render(torch.arange(1), torch.eye(3)[None], 32).images.shape == (1, 3, 32, 32)
        # a pickle that really holds nothing usable: one line, no traceback
        (tmp_path / "none.pkl").write_bytes(pickle.dumps({"D": None}))
        with pytest.raises(ValueError, match="holds no generator"):
            build_generator("eg3d", checkout=str(checkout), network=str(tmp_path / "none.pkl"),
                            trust_pickle=True)  # fmt: skip
    finally:
        sys.modules.pop("legacy", None)


def test_loading_a_real_pickle_from_a_checkout(standin, tmp_path) -> None:
    mod, checkout, name = standin
    pkl = tmp_path / "net.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"G_ema": mod.StandInGAN(img_resolution=32)}, f)
    # the checkout must be what makes the pickle loadable: forget the module and the path
    sys.modules.pop(name)
    sys.path.remove(str(checkout))
    g = build_generator("eg3d", seed=0, checkout=str(checkout), network=str(pkl),
                        trust_pickle=True)  # fmt: skip
    out = g.render(torch.arange(2), torch.eye(3).expand(2, 3, 3), 32)
    assert out.images.shape == (2, 3, 32, 32)
    assert g.params()["network"] == str(pkl)


def test_loading_refusals(standin, tmp_path) -> None:
    _, checkout, _ = standin
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(pickle.dumps({"G_ema": None}))
    with pytest.raises(ValueError, match="refusing to load .*runs arbitrary code.*trust_pickle"):
        build_generator("eg3d", checkout=str(checkout), network=str(pkl))
    with pytest.raises(ValueError, match="checkout folder not found"):
        build_generator("panohead", checkout=str(tmp_path / "nope"), network=str(pkl),
                        trust_pickle=True)  # fmt: skip
    with pytest.raises(ValueError, match="network pickle not found"):
        build_generator("eg3d", checkout=str(checkout), network=str(tmp_path / "no.pkl"),
                        trust_pickle=True)  # fmt: skip
    with pytest.raises(ValueError, match="no network pickle given"):
        build_generator("eg3d", checkout=str(checkout))
    with pytest.raises(ValueError, match="no checkout given"):
        build_generator("eg3d", network=str(pkl), trust_pickle=True)
    with pytest.raises(ValueError, match="holds no generator"):
        build_generator("eg3d", checkout=str(checkout), network=str(pkl), trust_pickle=True)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(ValueError, match="cannot unpickle"):
        build_generator("eg3d", checkout=str(checkout), network=str(bad), trust_pickle=True)
    with pytest.raises(ValueError, match="unreachable must be"):
        build_generator("eg3d", G=object(), unreachable="clamp")


def test_per_sample_renders_are_batched_with_the_draws_split_per_sample(standin, caplog) -> None:
    """rng=per_sample synthesises a batch in one network call (draws split per sample) and
    gives each image exactly as rendered alone; a network whose draws cannot be split (here
    randperm from the global generator) falls back to one sample at a time, with a warning,
    and the images are still those rendered alone."""
    mod, _, _ = standin
    R = rotation_from_euler(torch.tensor([5.0, -10, 20, 0]), torch.tensor([10.0, 30, -25, 5]),
                            torch.tensor([0.0, 40, -90, 10]))  # fmt: skip
    ids = torch.tensor([3, 7, 11, 5])
    net = mod.StandInGAN(img_resolution=32, draws=True)
    gen = EG3DGenerator.from_network(net, seed=2, batch_size=4)
    batch = gen.render(ids, R, 32)
    assert sum(k == "synthesis" for k, _, _ in net.calls) == 1  # one network call for four
    solo = torch.cat([gen.render(ids[i:i + 1], R[i:i + 1], 32).images for i in range(4)])
    assert torch.equal(batch.images, solo)

    class Shuffling(mod.StandInGAN):
        def synthesis(self, ws, c, noise_mode="random"):
            out = super().synthesis(ws, c, noise_mode)
            torch.randperm(3)  # a draw clerf cannot attribute to a sample
            return out

    gen2 = EG3DGenerator.from_network(Shuffling(img_resolution=32, draws=True), seed=2,
                                      batch_size=4)  # fmt: skip
    with caplog.at_level("WARNING", logger="clerf.generators"):
        again = gen2.render(ids, R, 32)
    assert "one sample at a time" in caplog.text
    assert torch.equal(again.images, batch.images)


def test_per_sample_rng_draws_equal_the_solo_seeded_draws() -> None:
    from generators.batched_rng import PerSampleRNG, Unattributable

    seeds = [11, 22, 33]
    with PerSampleRNG(seeds):
        a = torch.rand(6, 4)  # k = 2 rows per sample
        b = torch.randn_like(torch.zeros(3, 5))
        c = torch.rand(3, 2, generator=torch.Generator().manual_seed(0))  # passes through
    for i, s in enumerate(seeds):
        torch.manual_seed(s)
        torch.testing.assert_close(a[2 * i:2 * i + 2], torch.rand(2, 4), rtol=0, atol=0)
        torch.testing.assert_close(b[i:i + 1], torch.randn(1, 5), rtol=0, atol=0)
    torch.testing.assert_close(c, torch.rand(3, 2, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(Unattributable), PerSampleRNG(seeds):
        torch.rand(4, 2)  # not a multiple of the batch
