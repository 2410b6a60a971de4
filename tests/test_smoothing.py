"""The One-Euro filter on SO(3) for video rotations: oracle and behaviour tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation as SciRot

from clerf.geometry import geodesic_distance, random_rotation
from clerf.inference.smoothing import OneEuroSO3, so3_exp, so3_log


def _geo(a: np.ndarray, b: np.ndarray) -> float:
    return float(geodesic_distance(torch.as_tensor(a)[None], torch.as_tensor(b)[None])[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_log_and_exp_match_scipy(seed):
    R = random_rotation(1, torch.Generator().manual_seed(seed))[0].double().numpy()
    v = so3_log(R)
    ref = SciRot.from_matrix(R).as_rotvec()
    if np.linalg.norm(ref) < math.pi - 1e-6:  # the vector is unique below pi
        np.testing.assert_allclose(v, ref, atol=1e-6)
    np.testing.assert_allclose(so3_exp(v), R, atol=1e-6)


def _noisy_track(n: int, speed_deg: float, noise_deg: float, seed: int = 0):
    """A head turning about a fixed tilted axis at ``speed_deg`` per frame, and its estimates
    with random rotation noise of about ``noise_deg``."""
    g = np.random.default_rng(seed)
    axis = np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2])
    truth = [so3_exp(axis * math.radians(speed_deg * k)) for k in range(n)]
    noisy = [R @ so3_exp(g.normal(size=3) * math.radians(noise_deg) / math.sqrt(3))
             for R in truth]
    return truth, noisy


def _run(flt, noisy):
    return [flt(R) for R in noisy]


def _jitter(track):  # mean frame-to-frame change, deg
    return float(np.mean([_geo(a, b) for a, b in zip(track[:-1], track[1:], strict=True)]))


def test_a_still_head_is_steadied_and_stays_on_its_pose():
    truth, noisy = _noisy_track(120, 0.0, 3.0)
    out = _run(OneEuroSO3(rate=30.0, min_cutoff=1.0, beta=0.01), noisy)
    assert _jitter(out) < _jitter(noisy) / 4
    err_out = np.mean([_geo(a, b) for a, b in zip(out[30:], truth[30:], strict=True)])
    err_in = np.mean([_geo(a, b) for a, b in zip(noisy[30:], truth[30:], strict=True)])
    assert err_out < err_in / 2
    for R in out:  # every output is a rotation
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(R) == pytest.approx(1.0)


def test_speed_raises_the_cutoff_so_a_turning_head_lags_less():
    truth, noisy = _noisy_track(120, 4.0, 1.0)  # 120 deg/s at 30 fps
    lag = {}
    for beta in (0.0, 0.05):
        out = _run(OneEuroSO3(rate=30.0, min_cutoff=0.5, beta=beta), noisy)
        lag[beta] = np.mean([_geo(a, b) for a, b in zip(out[30:], truth[30:], strict=True)])
    assert lag[0.05] < lag[0.0] / 2


def test_a_constant_input_is_returned_unchanged_and_bad_settings_are_errors():
    R = random_rotation(1, torch.Generator().manual_seed(3))[0].double().numpy()
    flt = OneEuroSO3(rate=25.0)
    for _ in range(5):
        np.testing.assert_allclose(flt(R), R, atol=1e-9)
    with pytest.raises(ValueError):
        OneEuroSO3(rate=0.0)


@pytest.mark.slow
def test_video_benchmark_reports_error_jitter_and_fps_with_and_without_smoothing(tmp_path):
    """The synthetic clip through clerf predict (given boxes) with and without --smooth."""
    import sys
    from pathlib import Path

    from fixtures_evaluation import save_tiny_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_video

    model = save_tiny_model(tmp_path / "model", head="sphere", input_size=32)
    res = bench_video.main([str(model), "--frames", "24"])
    raw, smooth = res["raw"], res["smoothed"]
    assert raw["frames"] == smooth["frames"] == 24 and raw["fps"] > 0 and smooth["fps"] > 0
    assert smooth["jitter_deg"] < raw["jitter_deg"]  # a random model jitters: the filter steadies
