"""The pose-geometry core against docs/conventions.md, with scipy as an independent oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from clerf import geometry as g

angle = st.floats(-180.0, 180.0, allow_nan=False)
yaw_open = st.floats(-89.0, 89.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


def _rand_R(seed: int, n: int = 16, dtype=torch.float64) -> torch.Tensor:
    return g.random_rotation(n, torch.Generator().manual_seed(seed), dtype=dtype)


def _scipy_R(pitch: float, yaw: float, roll: float) -> np.ndarray:
    # Intrinsic Z-Y-X: R = Rz(roll) @ Ry(yaw) @ Rx(pitch).
    return Rotation.from_euler("ZYX", [roll, yaw, pitch], degrees=True).as_matrix()


# ----------------------------------------------------------------------------- Euler


@given(angle, angle, angle)
def test_rotation_from_euler_matches_scipy(pitch, yaw, roll):
    R = g.rotation_from_euler(
        torch.tensor(pitch, dtype=torch.float64),
        torch.tensor(yaw, dtype=torch.float64),
        torch.tensor(roll, dtype=torch.float64),
    )
    np.testing.assert_allclose(R.numpy(), _scipy_R(pitch, yaw, roll), atol=1e-12)


def test_elementary_rotations_are_right_handed():
    # Rz(90) maps x to y; Rx(90) maps y to z; Ry(90) maps z to x.
    e = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(g.rot_z(90.0).double() @ e[0], e[1], atol=1e-7, rtol=0)
    torch.testing.assert_close(g.rot_x(90.0).double() @ e[1], e[2], atol=1e-7, rtol=0)
    torch.testing.assert_close(g.rot_y(90.0).double() @ e[2], e[0], atol=1e-7, rtol=0)


@given(st.floats(-179.0, 179.0), yaw_open, st.floats(-179.0, 179.0))
def test_euler_from_rotation_matches_scipy(pitch, yaw, roll):
    R = torch.from_numpy(_scipy_R(pitch, yaw, roll))
    e = g.euler_from_rotation(R)
    roll_s, yaw_s, pitch_s = Rotation.from_matrix(R.numpy()).as_euler("ZYX", degrees=True)
    assert float(e.pitch) == pytest.approx(pitch_s, abs=1e-6)
    assert float(e.yaw) == pytest.approx(yaw_s, abs=1e-6)
    assert float(e.roll) == pytest.approx(roll_s, abs=1e-6)
    assert float(e.yaw) == pytest.approx(yaw, abs=1e-6)


@settings(max_examples=50)
@given(seeds)
def test_euler_round_trip_over_all_of_so3(seed):
    R = _rand_R(seed)
    e = g.euler_from_rotation(R)
    assert bool(((e.yaw >= -90) & (e.yaw <= 90)).all())
    torch.testing.assert_close(g.rotation_from_euler(*e), R, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("yaw", [90.0, -90.0])
def test_euler_singular_case_reconstructs(yaw, dtype):
    pitch = torch.tensor([0.0, 25.0, -140.0, 170.0], dtype=dtype)
    roll = torch.tensor([0.0, -30.0, 60.0, 10.0], dtype=dtype)
    R = g.rotation_from_euler(pitch, torch.full_like(pitch, yaw), roll)
    e = g.euler_from_rotation(R)
    assert torch.isfinite(torch.stack(list(e))).all()
    # Documented gauge: roll is set to 0 and pitch absorbs it.
    assert (e.roll == 0).all()
    torch.testing.assert_close(e.yaw, torch.full_like(pitch, yaw), atol=1e-3, rtol=0)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(g.rotation_from_euler(*e), R, atol=atol, rtol=0)


def test_euler_gradients_are_finite_at_the_singularity():
    R = g.rotation_from_euler(10.0, 90.0, 20.0).double().requires_grad_(True)
    e = g.euler_from_rotation(R)
    (e.pitch + e.yaw + e.roll).backward()
    assert torch.isfinite(R.grad).all()


# ----------------------------------------------------------------------------- 6D


@settings(max_examples=50)
@given(seeds)
def test_6d_round_trip(seed):
    R = _rand_R(seed)
    torch.testing.assert_close(g.rotation_from_6d(g.sixd_from_rotation(R)), R, atol=1e-12, rtol=0)


@settings(max_examples=50)
@given(seeds)
def test_6d_gram_schmidt_matches_qr(seed):
    """Oracle: Gram-Schmidt of (a, b) equals the QR decomposition with positive diagonal."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    R = g.rotation_from_6d(x)
    A = torch.stack([x[:, :3], x[:, 3:]], dim=-1)  # (B, 3, 2)
    Q, Rr = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1))[:, None, :]
    torch.testing.assert_close(R[..., :2], Q, atol=1e-9, rtol=0)
    assert g.is_rotation(R, tol=1e-9).all()


def test_6d_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        g.rotation_from_6d(torch.zeros(4, 5))


# ----------------------------------------------------------------------------- geodesic


@settings(max_examples=50)
@given(seeds)
def test_geodesic_matches_scipy(seed):
    R1, R2 = _rand_R(seed), _rand_R(seed + 1)
    d = g.geodesic_distance(R1, R2)
    ref = (Rotation.from_matrix(R1.numpy()).inv() * Rotation.from_matrix(R2.numpy())).magnitude()
    np.testing.assert_allclose(d.numpy(), np.degrees(ref), atol=1e-8)
    torch.testing.assert_close(d, g.geodesic_distance(R2, R1))


@pytest.mark.parametrize("deg", [0.0, 1e-3, 0.5, 90.0, 179.9, 180.0])
def test_geodesic_is_accurate_and_differentiable_everywhere(deg):
    R1 = g.rotation_from_euler(torch.tensor(20.0), torch.tensor(-40.0), torch.tensor(70.0))
    R2 = R1 @ g.rot_x(torch.tensor(deg))
    d = g.geodesic_distance(R1, R2)
    assert float(d) == pytest.approx(deg, abs=2e-3)  # float32
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    target = g.rotation_from_6d(x.detach())[0]
    Rp = g.rotation_from_6d(x)
    loss = g.geodesic_distance(Rp, torch.stack([target, target @ g.rot_y(deg).double()])).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_geodesic_gradcheck():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    target = _rand_R(3, n=3)
    assert torch.autograd.gradcheck(
        lambda v: g.geodesic_distance(g.rotation_from_6d(v), target), (x,)
    )


# ----------------------------------------------------------------------------- image operations


@settings(max_examples=30)
@given(seeds)
def test_flip_and_inplane_group_laws(seed):
    R = _rand_R(seed)
    torch.testing.assert_close(g.hflip_rotation(g.hflip_rotation(R)), R)
    torch.testing.assert_close(g.vflip_rotation(g.vflip_rotation(R)), R)
    # vertical flip = rotation by 180 deg, then horizontal flip
    torch.testing.assert_close(
        g.vflip_rotation(R), g.hflip_rotation(g.rotate_inplane(R, 180.0)), atol=1e-12, rtol=0
    )
    # in-plane rotations add, and are inverted by the opposite angle
    a, b = 37.0, -112.0
    torch.testing.assert_close(
        g.rotate_inplane(g.rotate_inplane(R, a), b), g.rotate_inplane(R, a + b), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(g.rotate_inplane(g.rotate_inplane(R, a), -a), R, atol=1e-12, rtol=0)
    # all results are rotations
    for M in (g.hflip_rotation(R), g.vflip_rotation(R), g.rotate_inplane(R, a)):
        assert g.is_rotation(M, tol=1e-9).all()


@given(st.floats(-170, 170), yaw_open, st.floats(-170, 170))
def test_hflip_negates_yaw_and_roll(pitch, yaw, roll):
    R = g.rotation_from_euler(*(torch.tensor(v, dtype=torch.float64) for v in (pitch, yaw, roll)))
    e = g.euler_from_rotation(g.hflip_rotation(R))
    assert float(e.pitch) == pytest.approx(pitch, abs=1e-6)
    assert float(e.yaw) == pytest.approx(-yaw, abs=1e-6)
    assert float(e.roll) == pytest.approx(-roll, abs=1e-6)


def test_inplane_rotation_is_not_roll_plus_angle():
    """Rotating the image is R @ Rz(phi); Rz(phi) @ R (roll + phi) agrees only when frontal."""
    phi = torch.tensor(40.0, dtype=torch.float64)
    frontal = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(g.rotate_inplane(frontal, phi), g.rot_z(phi) @ frontal)
    R = g.rotation_from_euler(*(torch.tensor(v, dtype=torch.float64) for v in (20.0, 50.0, 0.0)))
    wrong = g.rot_z(phi) @ R
    assert float(g.geodesic_distance(g.rotate_inplane(R, phi), wrong)) > 5.0
    # The image rotation keeps the camera direction; the wrong rule changes it.
    torch.testing.assert_close(g.camera_direction(g.rotate_inplane(R, phi)), g.camera_direction(R))


@settings(max_examples=50)
@given(seeds)
def test_split_camera_inplane(seed):
    R = _rand_R(seed)
    L, ang = g.split_camera_inplane(R)
    torch.testing.assert_close(g.rotate_inplane(L, ang), R, atol=1e-12, rtol=0)
    torch.testing.assert_close(g.camera_direction(L), g.camera_direction(R), atol=1e-12, rtol=0)
    assert g.is_rotation(L, tol=1e-9).all()
    # No in-plane part: the camera's image-right axis (first column, head coordinates) is
    # horizontal (perpendicular to the head's up axis), as for a roll-free look-at camera ...
    assert L[:, 1, 0].abs().max() < 1e-12
    # ... and it points the same way as e_y x d (not flipped by 180 deg).
    d = g.camera_direction(R)
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=R.dtype).expand_as(d), d)
    assert ((right * L[:, :, 0]).sum(-1) > 0).all()
    L2, ang2 = g.split_camera_inplane(L)
    torch.testing.assert_close(L2, L, atol=1e-12, rtol=0)
    assert ang2.abs().max() < 1e-9
    assert ((ang > -180) & (ang <= 180)).all()


def test_split_camera_inplane_from_above():
    # Camera straight above the head: the direction is parallel to the head's up axis.
    R = g.rotate_inplane(_R(-90.0, 0.0, 0.0), 30.0)
    torch.testing.assert_close(g.camera_direction(R), torch.tensor([0.0, 1.0, 0.0]).double())
    L, ang = g.split_camera_inplane(R)
    torch.testing.assert_close(g.rotate_inplane(L, ang), R, atol=1e-12, rtol=0)
    # the documented azimuth 0 at the pole makes the look-at part Rx(-90) and the angle 30
    torch.testing.assert_close(L, _R(-90.0, 0.0, 0.0), atol=1e-12, rtol=0)
    assert float(ang) == pytest.approx(30.0)


def _project(R: torch.Tensor, p_head: torch.Tensor) -> torch.Tensor:
    """Orthographic projection to image coordinates (x right, y DOWN) of head-frame points."""
    p_cam = p_head @ R  # rows of R are head axes in camera coords: p_cam = R.T @ p_head
    return torch.stack([p_cam[..., 0], -p_cam[..., 1]], dim=-1)


NOSE = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
LEFT_EYE = torch.tensor([-0.35, 0.25, 0.8], dtype=torch.float64)  # on image-left when frontal
RIGHT_EYE = torch.tensor([0.35, 0.25, 0.8], dtype=torch.float64)


def _R(pitch=0.0, yaw=0.0, roll=0.0):
    angles = (torch.tensor(v, dtype=torch.float64) for v in (pitch, yaw, roll))
    return g.rotation_from_euler(*angles)


def test_image_meaning_of_euler_angles():
    """docs/conventions.md section 2 by projecting 3D points of a head model orthographically."""
    assert float(_project(_R(), LEFT_EYE)[0]) < 0 < float(_project(_R(), RIGHT_EYE)[0])
    # positive yaw: the nose tip moves to the image's left of the head centre
    assert float(_project(_R(yaw=30), NOSE)[0]) < -0.3
    # positive pitch: the nose tip moves up (image y is down)
    assert float(_project(_R(pitch=30), NOSE)[1]) < -0.3
    # positive roll: the eye line (left eye -> right eye) turns clockwise on screen, i.e. points
    # down-right in image coordinates, by exactly 30 degrees
    v = _project(_R(roll=30), RIGHT_EYE) - _project(_R(roll=30), LEFT_EYE)
    assert math.degrees(math.atan2(float(v[1]), float(v[0]))) == pytest.approx(30.0, abs=1e-9)


def test_inplane_rotation_turns_projected_points_clockwise():
    R = _R(10, 35, -20)
    phi = 25.0
    R2 = g.rotate_inplane(R, phi)
    for p in (NOSE, LEFT_EYE, RIGHT_EYE):
        a, b = _project(R, p), _project(R2, p)
        # clockwise on screen by phi: in y-down coordinates the angle grows by phi
        ang_a = math.atan2(float(a[1]), float(a[0]))
        ang_b = math.atan2(float(b[1]), float(b[0]))
        assert math.degrees(ang_b - ang_a) % 360 == pytest.approx(phi, abs=1e-9)
        assert float(a.norm()) == pytest.approx(float(b.norm()), abs=1e-12)


def test_hflip_mirrors_projected_points():
    R = _R(15, 40, 25)
    F = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    # the mirrored image of a head point p shows the mirrored head's point F p at (-x, y)
    for p in (NOSE, LEFT_EYE, RIGHT_EYE):
        a = _project(R, p)
        b = _project(g.hflip_rotation(R), F @ p)
        torch.testing.assert_close(b, torch.stack([-a[0], a[1]]))


def test_image_axes_are_the_projected_unit_axes():
    R = _rand_R(5, n=4)
    axes = g.image_axes(R)
    for i in range(3):
        e = torch.eye(3, dtype=torch.float64)[i]
        torch.testing.assert_close(axes[:, i], _project(R, e))


# ----------------------------------------------------------------------------- sampling, checks


def test_random_rotation_is_uniform_and_seeded():
    R = g.random_rotation(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert g.is_rotation(R, tol=1e-9).all()
    # Haar measure: E[R] = 0 and the mean angle from identity is pi/2 + 2/pi rad = 126.48 deg.
    assert R.mean(0).abs().max() < 0.02
    mean_angle = float(g.geodesic_distance(R, torch.eye(3, dtype=R.dtype)).mean())
    assert mean_angle == pytest.approx(math.degrees(math.pi / 2 + 2 / math.pi), abs=0.6)
    again = g.random_rotation(20000, torch.Generator().manual_seed(0), dtype=torch.float32)
    torch.testing.assert_close(again, R.float())


def test_sample_euler_box_respects_ranges():
    R = g.sample_euler_box(
        2000, pitch=(-60, 60), yaw=(-90, 90), roll=(-45, 45),
        generator=torch.Generator().manual_seed(1), dtype=torch.float64,
    )
    e = g.euler_from_rotation(R)
    assert e.pitch.abs().max() <= 60 + 1e-6 and e.roll.abs().max() <= 45 + 1e-6
    assert e.yaw.abs().max() <= 90 + 1e-6 and e.yaw.abs().max() > 85
    with pytest.raises(ValueError, match="yaw range"):
        g.sample_euler_box(3, yaw=(10, -10))


def test_check_rotation_errors_name_the_problem():
    R = _rand_R(0, n=4)
    assert g.check_rotation(R) is R
    bad = R.clone()
    bad[2] = bad[2] * torch.tensor([-1.0, 1.0, 1.0], dtype=R.dtype)  # reflection, det -1
    with pytest.raises(ValueError, match=r"element \(2,\).*det = -1"):
        g.check_rotation(bad)
    skew = R.clone()
    skew[1, 0, 0] += 0.01
    with pytest.raises(ValueError, match=r"element \(1,\) is not a rotation"):
        g.check_rotation(skew)
    with pytest.raises(ValueError, match="shape"):
        g.check_rotation(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        g.check_rotation(torch.full((3, 3), float("nan")))


# ----------------------------------------------------------------------------- bins


def test_hopenet_bins():
    edges = g.bin_edges()
    assert edges.shape == (67,) and float(edges[0]) == -99 and float(edges[-1]) == 99
    centers = g.bin_centers()
    assert centers.shape == (66,)
    torch.testing.assert_close(centers, -97.5 + 3 * torch.arange(66, dtype=torch.float32))
    idx = g.angle_to_bin(torch.tensor([-99.0, -96.0, 0.0, 98.999, -97.5]))
    assert idx.tolist() == [0, 1, 33, 65, 0]


@pytest.mark.parametrize("bad", [99.0, -99.001, 150.0, float("nan")])
def test_angle_to_bin_raises_outside_range(bad):
    with pytest.raises(ValueError, match=r"outside the binned range \[-99, 99\)"):
        g.angle_to_bin(torch.tensor([0.0, bad]), name="yaw")


def test_decode_bins_uses_centres():
    logits = torch.full((66,), -1e4)
    logits[10] = 1e4
    assert float(g.decode_bins(logits)) == pytest.approx(-97.5 + 30.0)
    assert float(g.decode_bins(torch.zeros(66))) == pytest.approx(0.0, abs=1e-4)
    full = g.FULL_RANGE_BINS
    assert (full.start, full.stop, full.num_bins) == (-180.0, 180.0, 120)
    assert g.BinSpec.from_range(-99, 99, 3) == g.HOPENET_BINS
    with pytest.raises(ValueError, match="whole number"):
        g.BinSpec.from_range(-99, 100, 3)


@given(st.floats(-99.0, 98.99, allow_nan=False))
def test_angle_lies_in_its_bin(a):
    i = int(g.angle_to_bin(torch.tensor(a, dtype=torch.float64)))
    edges = g.bin_edges(dtype=torch.float64)
    assert float(edges[i]) <= a < float(edges[i + 1])


# ----------------------------------------------------------------------------- metrics


def test_euler_error_wraps_by_360_only():
    pred = torch.tensor([179.0, 170.0, 10.0])
    true = torch.tensor([-179.0, -10.0, 20.0])
    # 170 vs -10 is 180 deg apart; a +-180 wrap would call it 0.
    torch.testing.assert_close(g.euler_abs_error(pred, true), torch.tensor([2.0, 180.0, 10.0]))


def test_euler_mae_hand_computed():
    from clerf.evaluation.metrics import euler_mae

    # (pitch, yaw, roll) per sample, every Euler array's order; pitch 170 vs -10 is 180 apart
    pred = torch.tensor([[10.0, 0.0, 0.0], [170.0, 4.0, 0.0]])
    true = torch.tensor([[0.0, 2.0, 0.0], [-10.0, 0.0, 0.0]])
    m = euler_mae(g.euler_abs_error(pred, true).numpy())
    assert m == pytest.approx({"yaw": 3.0, "pitch": 95.0, "roll": 0.0, "mean": 98.0 / 3})


def test_maev_and_geodesic_hand_computed():
    I = torch.eye(3, dtype=torch.float64)
    Rz10 = g.rot_z(10.0).double()
    # rotating about z by 10 deg moves the x and y head axes by 10 deg, z not at all
    torch.testing.assert_close(g.axis_errors(Rz10, I), torch.tensor([10.0, 10.0, 0.0]).double())
    assert float(g.maev(Rz10, I)) == pytest.approx(20.0 / 3)
    assert float(g.geodesic_error(Rz10, I)) == pytest.approx(10.0)


def test_metrics_do_not_depend_on_batch_size_or_order():
    Rp, Rt = _rand_R(1, n=100).float(), _rand_R(2, n=100).float()
    full = torch.cat([g.geodesic_error(Rp, Rt), g.maev(Rp, Rt)])
    chunks = [
        torch.cat([g.geodesic_error(a, b), g.maev(a, b)])
        for a, b in zip(Rp.split(7), Rt.split(7), strict=True)
    ]
    ge = torch.cat([c[: len(c) // 2] for c in chunks])
    torch.testing.assert_close(ge, full[:100])
    from clerf.evaluation.metrics import euler_mae

    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ep = torch.stack(tuple(g.euler_from_rotation(Rp)), -1)
    et = torch.stack(tuple(g.euler_from_rotation(Rt)), -1)
    m1 = euler_mae(g.euler_abs_error(ep, et).numpy())
    m2 = euler_mae(g.euler_abs_error(ep[perm], et[perm]).numpy())
    assert m1 == m2  # exactly rounded: the same bits in any order


# ----------------------------------------------------------------------------- projections, views


@settings(max_examples=30)
@given(seeds, st.floats(0.0, 0.2))
def test_nearest_rotation_matches_scipy_mean_and_fixes_rotations(seed, noise):
    R = _rand_R(seed, 8)
    assert torch.allclose(g.nearest_rotation(R), R, atol=1e-10)
    M = R + noise * torch.randn(8, 3, 3, generator=torch.Generator().manual_seed(seed),
                                dtype=torch.float64)  # fmt: skip
    Q = g.nearest_rotation(M)
    assert g.is_rotation(Q, 1e-9).all()
    # scipy's chordal mean of a single rotation-like matrix: brute force over nearby rotations
    # is costly; instead check optimality: no small rotation of Q gets closer to M
    for k in range(3):
        for eps in (1e-3, -1e-3):
            axis = torch.zeros(3, dtype=torch.float64)
            axis[k] = eps
            P = torch.from_numpy(Rotation.from_rotvec(axis.numpy()).as_matrix()) @ Q
            assert ((P - M) ** 2).sum((-1, -2)).ge(((Q - M) ** 2).sum((-1, -2)) - 1e-12).all()


def test_nearest_rotation_of_a_reflection_is_a_rotation():
    M = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert g.is_rotation(g.nearest_rotation(M)).all()


@settings(max_examples=30)
@given(seeds, angle)
def test_view_angles(seed, phi):
    R = _rand_R(seed, 8)
    tilt, facing = g.view_angles(R)
    # facing: the angle between the nose axis and the direction toward the camera (scipy)
    nose = R[:, 2, :].numpy()
    want = np.degrees(np.arccos(np.clip(nose @ np.array([0.0, 0.0, 1.0]), -1, 1)))
    np.testing.assert_allclose(facing.numpy(), want, atol=1e-6)
    # in-plane image rotation keeps facing; turning about the head's up axis keeps tilt
    _, facing2 = g.view_angles(g.rotate_inplane(R, phi))
    np.testing.assert_allclose(facing2.numpy(), facing.numpy(), atol=1e-6)
    tilt2, _ = g.view_angles(g.rot_y(torch.tensor(math.radians(phi), dtype=torch.float64)).T @ R)
    np.testing.assert_allclose(tilt2.numpy(), tilt.numpy(), atol=1e-6)


def test_view_angles_landmarks():
    up = g.rotation_from_euler(0.0, 0.0, 0.0)
    down = g.vflip_rotation(g.hflip_rotation(up))  # a 180 deg image turn
    back = g.rotation_from_euler(0.0, 180.0, 0.0)
    t, f = g.view_angles(torch.stack([up, down, back]).double())
    assert t.tolist() == pytest.approx([0.0, 180.0, 0.0], abs=1e-5)
    assert f.tolist() == pytest.approx([0.0, 0.0, 180.0], abs=1e-5)


def test_chance_geodesic_is_about_126_5_for_uniform_rotations():
    chance_geodesic = g.chance_geodesic
    R = g.random_rotation(1500, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert chance_geodesic(R) == pytest.approx(126.5, abs=2.0)  # E[angle] = pi/2 + 2/pi rad
    R2 = g.rotation_from_euler(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    assert chance_geodesic(R2) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(chance_geodesic(R[:1]))
    # the mean over distinct pairs, checked against scipy on a small set
    Rs = Rotation.from_matrix(R[:9].numpy())
    d = [(Rs[i].inv() * Rs[j]).magnitude() for i in range(9) for j in range(9) if i != j]
    assert chance_geodesic(R, max_n=9) == pytest.approx(math.degrees(sum(d) / len(d)), abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.floats(1.0, 180.0), st.floats(1.0, 90.0), st.integers(0, 2**31))
def test_cap_and_band_directions_are_uniform_on_their_regions(max_angle, max_elev, seed):
    from scipy.stats import kstest

    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(4, 2000, generator=gen, dtype=torch.float64)
    d = g.cap_directions(u[0], u[1], max_angle)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2000, dtype=torch.float64))
    assert bool(g.in_cap(d, max_angle).all())
    # Archimedes: on a uniform cap the z coordinate is uniform in [cos(max_angle), 1]
    lo = math.cos(math.radians(max_angle))
    assert kstest(d[:, 2].numpy(), "uniform", args=(lo, 1 - lo)).pvalue > 1e-4
    b = g.band_directions(u[2], u[3], max_elev)
    m = math.sin(math.radians(max_elev))
    assert bool(g.in_band(b, max_elev).all())
    assert kstest(b[:, 1].numpy(), "uniform", args=(-m, 2 * m)).pvalue > 1e-4
    # the azimuth of the band is uniform too (from +z toward +x)
    az = torch.atan2(b[:, 0], b[:, 2]).numpy()
    assert kstest(az, "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-4
    # directions just outside are refused
    out = g.cap_directions(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                           min(max_angle + 1.0, 180.0))
    assert max_angle + 1.0 > 180.0 or not bool(g.in_cap(out, max_angle).any())


@settings(max_examples=30, deadline=None)
@given(st.floats(-360.0, 360.0))
def test_inplane_image_matrix_is_clockwise_and_matches_kornia(angle):
    from kornia.geometry.transform import get_rotation_matrix2d

    M = g.inplane_image_matrix(torch.tensor([angle], dtype=torch.float64))[0]
    # kornia's positive angles turn counter-clockwise on screen: the same map for -angle
    K = get_rotation_matrix2d(torch.zeros(1, 2, dtype=torch.float64),
                              torch.tensor([-angle], dtype=torch.float64),
                              torch.ones(1, 2, dtype=torch.float64))[0, :, :2]
    assert torch.allclose(M, K, atol=1e-12)
    # a quarter turn clockwise takes "up" (y down: (0, -1)) to "right" (1, 0)
    q = g.inplane_image_matrix(torch.tensor(90.0, dtype=torch.float64))
    assert torch.allclose(q @ torch.tensor([0.0, -1.0], dtype=torch.float64),
                          torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.floats(-85, 85), st.floats(-179, 179), st.floats(-179, 179))
def test_hflip_euler_is_hflip_rotation_in_euler_angles(pitch, yaw, roll):
    t = torch.tensor
    R = g.rotation_from_euler(t(pitch, dtype=torch.float64), t(yaw, dtype=torch.float64),
                              t(roll, dtype=torch.float64))
    p2, y2, r2 = g.hflip_euler(pitch, yaw, roll)
    R2 = g.rotation_from_euler(t(p2, dtype=torch.float64), t(y2, dtype=torch.float64),
                               t(r2, dtype=torch.float64))
    assert torch.allclose(R2, g.hflip_rotation(R), atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(-2000.0, 2000.0))
def test_wrap180_is_wrap_degrees_with_the_closed_end_at_plus_180(a):
    w = g.wrap180(a)
    assert -180.0 < w <= 180.0
    assert math.isclose(math.cos(math.radians(w)), math.cos(math.radians(a)), abs_tol=1e-9)
    assert math.isclose(math.sin(math.radians(w)), math.sin(math.radians(a)), abs_tol=1e-9)
    t = float(g.wrap_degrees(torch.tensor(a, dtype=torch.float64)))
    assert w == pytest.approx(t, abs=1e-9) or (w == 180.0 and t == -180.0)
