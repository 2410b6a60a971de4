"""Triplet rules (triplets/rules.py): identities, delta, negative distributions, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.config import load_config
from clerf.errors import ConfigError
from clerf.geometry import geodesic_distance, is_rotation, random_rotation_at_least
from triplets.generate import build_triplet_sampler
from triplets.poses import EulerBox, LookAtInplane, UniformSO3, seeded_generator
from triplets.rules import TripletRule, TripletSampler


@settings(max_examples=30, deadline=None)
@given(
    delta=st.floats(0, 180),
    negatives=st.sampled_from(["poses", "uniform"]),
    hard=st.booleans(),
    k=st.integers(2, 50),
    seed=st.integers(0, 10_000),
)
def test_rule_invariants(delta, negatives, hard, k, seed):
    if negatives == "poses":
        delta = min(delta, 120.0)  # rejection from the full sphere stays cheap
    rule = TripletRule(delta, negatives, hard, k)
    s = TripletSampler(seed, UniformSO3(), rule, block_size=16)
    p = s.plan(3, 40)
    assert len(p) == 37 and p.start == 3
    assert (p.positive_ids != p.anchor_ids).all()
    assert ((p.negative_ids == p.anchor_ids) == hard).all()
    for ids in (p.anchor_ids, p.positive_ids, p.negative_ids):
        assert ids.min() >= 0 and ids.max() < k
    assert is_rotation(p.negative_rotations).all()
    assert (geodesic_distance(p.anchor_rotations, p.negative_rotations) >= delta - 1e-7).all()
    ids, rots = p.interleaved()
    assert torch.equal(ids[0::3], p.anchor_ids) and torch.equal(ids[2::3], p.negative_ids)
    assert torch.equal(rots[0::3], rots[1::3])  # positive = anchor's rotation


def test_plan_depends_only_on_seed_and_index():
    s = TripletSampler(11, EulerBox(), TripletRule(30.0), block_size=8)
    full = s.plan(0, 50)
    fresh = TripletSampler(11, EulerBox(), TripletRule(30.0), block_size=8)
    for a, b in ((0, 1), (5, 19), (7, 8), (16, 50), (3, 44)):
        part = fresh.plan(a, b)
        assert torch.equal(part.anchor_rotations, full.anchor_rotations[a:b])
        assert torch.equal(part.negative_rotations, full.negative_rotations[a:b])
        assert torch.equal(part.positive_ids, full.positive_ids[a:b])
    other = TripletSampler(12, EulerBox(), TripletRule(30.0), block_size=8).plan(0, 50)
    assert not torch.equal(other.anchor_rotations, full.anchor_rotations)


def test_uniform_negatives_at_delta_zero_are_haar():
    R = torch.eye(3, dtype=torch.float64).expand(40000, 3, 3)
    Q = random_rotation_at_least(R, 0.0, seeded_generator(0))
    tr = Q.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(float(tr.mean())) < 0.02 and abs(float((tr * tr).mean()) - 1.0) < 0.03


def test_uniform_negatives_follow_truncated_haar_angle():
    """Oracle: P(theta <= x | theta >= delta) from the Haar CDF (theta - sin theta) / pi."""
    delta = 60.0
    A = UniformSO3().sample(30000, seeded_generator(3))
    Q = random_rotation_at_least(A, delta, seeded_generator(4))
    theta = geodesic_distance(A, Q)
    assert float(theta.min()) >= delta - 1e-7

    def F(deg):
        t = math.radians(deg)
        return (t - math.sin(t)) / math.pi

    for x in (90.0, 120.0, 150.0):
        expected = (F(x) - F(delta)) / (1.0 - F(delta))
        assert abs(float((theta <= x).double().mean()) - expected) < 0.01


def test_delta_180_is_exact_and_impossible_delta_rejected():
    A = UniformSO3().sample(100, seeded_generator(5))
    Q = random_rotation_at_least(A, 180.0, seeded_generator(6))
    assert torch.allclose(geodesic_distance(A, Q), torch.full((100,), 180.0, dtype=A.dtype),
                          atol=1e-5)
    with pytest.raises(ValueError, match="impossible"):
        TripletRule(delta=181.0)
    with pytest.raises(ValueError, match="at least 2"):
        TripletRule(num_identities=1)
    with pytest.raises(ValueError, match="'poses' or 'uniform'"):
        TripletRule(negatives="far")


def test_config_errors_are_config_errors():
    cfg = load_config(None, ["triplets.delta=200"])
    with pytest.raises(ConfigError, match="delta = 200.0 deg is impossible"):
        build_triplet_sampler(cfg.triplets, cfg.seed)
    cfg = load_config(None, ["triplets.yaw_range=[-120,0]"])
    with pytest.raises(ConfigError, match="yaw_range"):
        build_triplet_sampler(cfg.triplets, cfg.seed)


def test_rejection_that_cannot_succeed_says_what_to_change():
    tiny = EulerBox((0, 1), (0, 1), (0, 1))  # every pose within ~2 deg of the others
    s = TripletSampler(0, tiny, TripletRule(delta=30.0), block_size=4)
    with pytest.raises(ValueError, match="lower triplets.delta"):
        s.plan(0, 4)
    # the constructive mode always works
    s = TripletSampler(0, tiny, TripletRule(delta=30.0, negatives="uniform"), block_size=4)
    assert (geodesic_distance(*(lambda p: (p.anchor_rotations, p.negative_rotations))(
        s.plan(0, 4))) >= 30.0).all()


def test_accept_filters_anchors_and_negatives():
    def frontal_half(R):  # camera direction in the front hemisphere
        return R[..., 2, 2] > 0

    s = TripletSampler(1, UniformSO3(), TripletRule(delta=20.0), block_size=32,
                       accept=frontal_half)
    p = s.plan(0, 64)
    assert (p.anchor_rotations[:, 2, 2] > 0).all() and (p.negative_rotations[:, 2, 2] > 0).all()


def test_real_anchor_entry_point_keeps_given_anchors():
    R = LookAtInplane(45.0).sample(10, seeded_generator(0))
    ids = torch.arange(10)
    p = TripletRule(delta=25.0, num_identities=10).complete(
        R, UniformSO3(), seeded_generator(1), anchor_ids=ids)
    assert torch.equal(p.anchor_rotations, R) and torch.equal(p.anchor_ids, ids)
    assert np.all((geodesic_distance(R, p.negative_rotations) >= 25.0).numpy())
