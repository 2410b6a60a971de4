"""Metric aggregation (clerf.evaluation.metrics) against hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.evaluation.metrics import (
    binned_error,
    compute_errors,
    cumulative_curve,
    merge,
    summarize,
)
from clerf.geometry import random_rotation, rot_x, rot_z, rotation_from_euler

D = torch.float64


def _eye(n: int) -> torch.Tensor:
    return torch.eye(3, dtype=D).expand(n, 3, 3).clone()


def test_single_inplane_error_by_hand():
    # R_pred = Rz(10) vs identity: geodesic 10; rows 0 and 1 turn by 10, row 2 (nose) by 0.
    R_pred = rot_z(torch.tensor([10.0], dtype=D))
    s = summarize(compute_errors([0], R_pred, _eye(1)))
    assert s["n"] == 1
    assert s["geodesic"]["mean"] == pytest.approx(10.0, abs=1e-9)
    assert s["maev"] == pytest.approx(20.0 / 3.0, abs=1e-9)
    e = s["euler"]
    assert (e["yaw"], e["pitch"], e["roll"]) == pytest.approx((0.0, 0.0, 10.0), abs=1e-9)
    assert e["mean"] == pytest.approx(10.0 / 3.0, abs=1e-9)
    assert e["n"] == 1 and e["note"] == "all samples"


def test_statistics_by_hand():
    errs = [1.0, 2.0, 3.0, 4.0, 12.0]
    R_pred = rot_z(torch.tensor(errs, dtype=D))
    s = summarize(compute_errors(np.arange(5), R_pred, _eye(5)))
    g = s["geodesic"]
    assert g["mean"] == pytest.approx(4.4, abs=1e-9)
    assert g["median"] == pytest.approx(3.0, abs=1e-9)
    # linear interpolation between the 4th (4) and 5th (12) values at rank 0.9 * 4 = 3.6
    assert g["p90"] == pytest.approx(4.0 + 0.6 * 8.0, abs=1e-9)
    assert s["under"] == {"5": 0.8, "10": 0.8, "15": 1.0, "30": 1.0}


def test_no_180_wrap():
    # pred pitch 170 vs true pitch 0 (yaw = roll = 0): the error is 170 deg. A +-180 wrap
    # (6DRepNet's evaluation) would call it 10 deg.
    R_pred = rot_x(torch.tensor([170.0], dtype=D))
    s = summarize(compute_errors([0], R_pred, _eye(1)))
    assert s["euler"]["pitch"] == pytest.approx(170.0, abs=1e-9)
    assert s["geodesic"]["mean"] == pytest.approx(170.0, abs=1e-9)
    # ... while the 360 wrap is applied: roll 170 vs -170 is 20 deg apart, not 340.
    R_t = rotation_from_euler(torch.tensor([0.0], dtype=D), 0.0, 170.0)
    R_p = rotation_from_euler(torch.tensor([0.0], dtype=D), 0.0, -170.0)
    s = summarize(compute_errors([0], R_p, R_t), euler_range=180.0)  # |roll| 170 is beyond 99
    assert s["euler"]["roll"] == pytest.approx(20.0, abs=1e-9)


def test_euler_only_where_meaningful():
    # Sample 1 has true pitch 120 (outside +-99): Euler MAE over the other sample only.
    R_t = rotation_from_euler(torch.tensor([0.0, 120.0], dtype=D), 0.0, 0.0)
    R_p = R_t @ rot_z(torch.tensor([4.0, 30.0], dtype=D))
    s = summarize(compute_errors([0, 1], R_p, R_t))
    assert s["euler"]["n"] == 1 and "1 of 2" in s["euler"]["note"]
    assert s["euler"]["roll"] == pytest.approx(4.0, abs=1e-9)
    assert s["geodesic"]["mean"] == pytest.approx(17.0, abs=1e-9)  # geodesic over both
    none = summarize(compute_errors([1], R_p[1:], R_t[1:]))
    assert none["euler"]["n"] == 0 and "yaw" not in none["euler"]
    full = summarize(compute_errors([0], R_p[:1], R_t[:1]), euler=False)
    assert full["euler"]["n"] == 0 and "ill-defined" in full["euler"]["note"]


def test_duplicates_and_shapes_are_refused():
    R = _eye(2)
    with pytest.raises(ValueError, match="duplicate"):
        compute_errors([3, 3], R, R)
    with pytest.raises(ValueError, match="indices"):
        compute_errors([0], R, R)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_summary_is_a_function_of_the_set(n, seed):
    g = torch.Generator().manual_seed(seed)
    R_t = random_rotation(n, generator=g, dtype=D)
    R_p = random_rotation(n, generator=g, dtype=D)
    idx = torch.arange(n) * 3 + 5
    perm = torch.randperm(n, generator=g)
    a = summarize(compute_errors(idx, R_p, R_t))
    b = summarize(compute_errors(idx[perm], R_p[perm], R_t[perm]))
    assert a == b  # bitwise: errors computed after sorting by index, exactly rounded means
    # The same set under other indices (a shuffled dataset): equal up to the last bits of the
    # vectorised atan2, whose rounding depends on an element's position in the array.
    c = summarize(compute_errors(torch.arange(n), R_p[perm], R_t[perm]))
    assert _flat(c) == pytest.approx(_flat(a), rel=1e-12, abs=1e-12)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, str):
            out[prefix + k] = v
    return out


def test_merge_offsets_and_helpers():
    R = _eye(3)
    a = compute_errors([0, 1, 2], R @ rot_z(torch.tensor([1.0, 2.0, 3.0], dtype=D)), R)
    b = compute_errors([0, 1, 2], R @ rot_z(torch.tensor([4.0, 5.0, 6.0], dtype=D)), R)
    m = merge([a, b], offsets=[0, 3])
    assert m.index.tolist() == [0, 1, 2, 3, 4, 5]
    assert np.allclose(m.geodesic, [1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="unique"):
        merge([a, b])
    c, v, k = binned_error(np.array([-5.0, 5.0, 6.0]), np.array([1.0, 2.0, 4.0]),
                           np.array([-10.0, 0.0, 10.0]), "median")
    assert c.tolist() == [-5.0, 5.0] and v.tolist() == [1.0, 3.0] and k.tolist() == [1, 2]
    t, share = cumulative_curve(np.array([1.0, 2.0, 3.0, 10.0]), max_deg=10.0, steps=11)
    assert share[0] == 0.0 and share[2] == 0.5 and share[-1] == 1.0
    assert math.isclose(t[-1], 10.0)
