"""Pose samplers (triplets/poses.py): ranges, look-at reachability, Haar checks, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.geometry import (
    camera_direction,
    euler_from_rotation,
    geodesic_distance,
    is_rotation,
    split_camera_inplane,
    wrap_degrees,
)
from triplets.poses import (
    EulerBox,
    LookAtInplane,
    UniformSO3,
    build_pose_sampler,
    seeded_generator,
)


def _haar_moments(R: torch.Tensor) -> tuple[float, float, float]:
    """Mean |E[R]| entry, E[trace], E[trace^2]: 0, 0, 1 under the Haar measure."""
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    return float(R.mean(0).abs().max()), float(tr.mean()), float((tr * tr).mean())


def test_seeded_generator_depends_only_on_keys():
    a = torch.rand(5, generator=seeded_generator(7, 1, 3))
    b = torch.rand(5, generator=seeded_generator(7, 1, 3))
    c = torch.rand(5, generator=seeded_generator(7, 1, 4))
    d = torch.rand(5, generator=seeded_generator(8, 1, 3))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    with pytest.raises(ValueError, match="non-negative"):
        seeded_generator(-1)


def test_uniform_so3_is_haar():
    R = UniformSO3().sample(40000, seeded_generator(0))
    assert R.dtype == torch.float64 and is_rotation(R).all()
    mean_abs, tr, tr2 = _haar_moments(R)
    assert mean_abs < 0.015 and abs(tr) < 0.02 and abs(tr2 - 1.0) < 0.03


@settings(max_examples=25, deadline=None)
@given(
    # boxes stay inside (-180, 180): at +-180 the decomposition may report the other end
    p=st.tuples(st.floats(-170, 150), st.floats(0, 20)),
    y=st.tuples(st.floats(-85, 85), st.floats(0, 5)),
    r=st.tuples(st.floats(-170, 150), st.floats(0, 20)),
    seed=st.integers(0, 1000),
)
def test_euler_box_stays_in_box(p, y, r, seed):
    box = EulerBox((p[0], p[0] + p[1]), (y[0], y[0] + y[1]), (r[0], r[0] + r[1]))
    e = euler_from_rotation(box.sample(64, seeded_generator(seed)))
    for vals, (lo, hi) in ((e.pitch, box.pitch), (e.yaw, box.yaw), (e.roll, box.roll)):
        assert (vals >= lo - 1e-6).all() and (vals <= hi + 1e-6).all()


def test_euler_box_rejects_bad_ranges():
    with pytest.raises(ValueError, match="yaw_range"):
        EulerBox(yaw=(-100, 10))
    with pytest.raises(ValueError, match="low <= high"):
        EulerBox(pitch=(10, -10))
    with pytest.raises(ValueError, match="pair"):
        EulerBox(roll=(1, 2, 3))


@settings(max_examples=25, deadline=None)
@given(max_angle=st.floats(0, 180), lo=st.floats(-180, 170), width=st.floats(0, 190),
       seed=st.integers(0, 1000))
def test_lookat_cap_and_inplane(max_angle, lo, width, seed):
    hi = min(lo + width, 360.0)
    s = LookAtInplane(max_angle, (lo, hi))
    R = s.sample(64, seeded_generator(seed))
    assert is_rotation(R).all()
    d = camera_direction(R)
    angle = torch.rad2deg(torch.acos(d[:, 2].clamp(-1, 1)))
    assert (angle <= max_angle + 1e-6).all()
    _, phi = split_camera_inplane(R)
    # phi is reported in (-180, 180]; compare modulo 360 with the sampled range
    off = wrap_degrees(phi - lo)
    off = torch.where(off < -1e-6, off + 360.0, off)
    assert (off <= (hi - lo) + 1e-6).all() or (hi - lo) >= 360.0 - 1e-6


def test_lookat_full_range_is_haar_and_cap_is_uniform():
    R = LookAtInplane(180.0, (-180.0, 180.0)).sample(40000, seeded_generator(1))
    mean_abs, tr, tr2 = _haar_moments(R)
    assert mean_abs < 0.015 and abs(tr) < 0.02 and abs(tr2 - 1.0) < 0.03
    # on a 60 deg cap, cos(theta) is uniform in [cos 60, 1]: mean 0.75
    d = camera_direction(LookAtInplane(60.0).sample(40000, seeded_generator(2)))
    assert abs(float(d[:, 2].mean()) - 0.75) < 0.005


def test_samplers_are_deterministic_and_frontal_cap_is_frontal():
    for s in (UniformSO3(), EulerBox(), LookAtInplane(30.0, (0.0, 0.0))):
        assert torch.equal(s.sample(10, seeded_generator(5)), s.sample(10, seeded_generator(5)))
    R = LookAtInplane(0.0, (0.0, 0.0)).sample(4, seeded_generator(0))
    assert float(geodesic_distance(R, torch.eye(3, dtype=R.dtype)).max()) < 1e-6


def test_build_pose_sampler_from_config():
    from clerf.config import load_config

    cfg = load_config(None, ["triplets.poses=lookat", "triplets.max_camera_angle=45"])
    s = build_pose_sampler(cfg.triplets)
    assert isinstance(s, LookAtInplane) and s.describe()["max_camera_angle"] == 45.0
    cfg = load_config(None, ["triplets.poses=sphere"])
    with pytest.raises(ValueError, match="triplets.poses must be one of"):
        build_pose_sampler(cfg.triplets)
    assert math.isclose(EulerBox().params()["yaw_range"][1], 90.0)
