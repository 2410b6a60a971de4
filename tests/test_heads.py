"""Pose heads: each loss against a direct reference computation, decoding, range rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation as SciRot

from clerf.errors import ConfigError
from clerf.geometry import (
    FULL_RANGE_BINS,
    HOPENET_BINS,
    BinSpec,
    euler_from_rotation,
    geodesic_distance,
    random_rotation,
    rotation_from_euler,
)
from clerf.models.heads import (
    BinnedEulerHead,
    CombinedHead,
    Rotation6DHead,
    binned_loss,
    build_head,
    decode_bins_circular,
    euler_targets,
    geodesic_loss,
)


def _reference_binned_loss(logits: np.ndarray, target: np.ndarray, spec: BinSpec, alpha: float):
    """HopeNet's multi-loss written out by hand with numpy loops (float64)."""
    B, A, K = logits.shape
    centres = [spec.start + spec.width * (i + 0.5) for i in range(K)]
    total = 0.0
    for a in range(A):
        ce = 0.0
        se = 0.0
        for b in range(B):
            z = logits[b, a]
            m = z.max()
            logsumexp = m + math.log(sum(math.exp(v - m) for v in z))
            label = target[b, a]
            idx = int(math.floor((label - spec.start) / spec.width))
            ce += logsumexp - z[idx]
            p = [math.exp(v - logsumexp) for v in z]
            expectation = sum(pi * c for pi, c in zip(p, centres, strict=True))
            se += (expectation - label) ** 2
        total += ce / B + alpha * se / B
    return total


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_binned_loss_matches_hand_computation(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 66, generator=g, dtype=torch.float64) * 3
    target = torch.rand(5, 3, generator=g, dtype=torch.float64) * 197.0 - 98.5
    loss, parts = binned_loss(logits, target, HOPENET_BINS, alpha=alpha)
    ref = _reference_binned_loss(logits.numpy(), target.numpy(), HOPENET_BINS, alpha)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    assert set(parts) == {f"{k}_{a}" for k in ("ce", "mse", "mae") for a in
                          ("pitch", "yaw", "roll")}


def test_binned_loss_uses_torch_cross_entropy_semantics():
    # an independent route: torch's CE on explicit indices + decode with explicit centres
    g = torch.Generator().manual_seed(1)
    spec = BinSpec(start=-30.0, width=10.0, num_bins=6)
    logits = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    target = torch.tensor([[-30.0, 0.0, 29.9], [5.0, -5.0, 15.0], [-25.0, 25.0, 0.1],
                           [10.0, 20.0, -10.0]], dtype=torch.float64)
    idx = torch.tensor([[0, 3, 5], [3, 2, 4], [0, 5, 3], [4, 5, 2]])
    centres = torch.tensor([-25.0, -15.0, -5.0, 5.0, 15.0, 25.0], dtype=torch.float64)
    expected = 0.0
    for a in range(3):
        ce = torch.nn.functional.cross_entropy(logits[:, a], idx[:, a])
        dec = (logits[:, a].softmax(-1) * centres).sum(-1)
        expected = expected + ce + 0.5 * ((dec - target[:, a]) ** 2).mean()
    loss, _ = binned_loss(logits, target, spec, alpha=0.5)
    torch.testing.assert_close(loss, expected)


def test_geodesic_loss_matches_scipy():
    R1 = random_rotation(32, torch.Generator().manual_seed(2), dtype=torch.float64)
    R2 = random_rotation(32, torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = np.mean([SciRot.from_matrix(a.T @ b).magnitude() for a, b in
                   zip(R1.numpy(), R2.numpy(), strict=True)])
    assert geodesic_loss(R1, R2).item() == pytest.approx(ref, rel=1e-9)  # radians


def test_rotation6d_head_loss_is_geodesic_radians_and_logs_degrees():
    head = Rotation6DHead(8, hidden=0).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    out = head(x)
    R = random_rotation(10, torch.Generator().manual_seed(4), dtype=torch.float64)
    loss, parts = head.loss(out, R)
    Rp = head.rotation(out).detach().numpy()
    ref = np.mean([SciRot.from_matrix(a.T @ b).magnitude() for a, b in
                   zip(Rp, R.numpy(), strict=True)])
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert parts["geodesic_deg"].detach().item() == pytest.approx(math.degrees(ref), rel=1e-9)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_rotation6d_head_starts_near_identity_and_is_a_rotation():
    head = Rotation6DHead(8, hidden=16)
    R = head.rotation(head(torch.zeros(3, 8)))
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("spec", [HOPENET_BINS, FULL_RANGE_BINS, BinSpec(-45.0, 5.0, 18)])
def test_one_hot_bin_decodes_to_its_centre(spec):
    for i in range(spec.num_bins):
        logits = torch.full((spec.num_bins,), -1e4, dtype=torch.float64)
        logits[i] = 0.0
        centre = spec.start + spec.width * (i + 0.5)
        head = BinnedEulerHead(4, spec, decode="expectation").double()
        assert head.decode(logits[None, None].expand(1, 3, -1))[0, 0].item() == \
            pytest.approx(centre, abs=1e-9)
        assert decode_bins_circular(logits, spec).item() == pytest.approx(
            (centre - spec.start) % 360.0 + spec.start, abs=1e-9)


def test_circular_decoding_has_no_seam_but_expectation_does():
    # half the mass in the first bin of [-180, 180), half in the last: the true mean is 180 deg
    spec = FULL_RANGE_BINS
    logits = torch.full((spec.num_bins,), -1e4, dtype=torch.float64)
    logits[0] = 0.0
    logits[-1] = 0.0
    circ = decode_bins_circular(logits, spec).item()
    assert abs(abs(circ) - 180.0) < 1e-6
    from clerf.geometry import decode_bins

    assert abs(decode_bins(logits, spec).item()) < 1e-6  # the biased plain expectation
    head = BinnedEulerHead(4, spec)
    assert head.circular  # auto picks circular for a full circle
    assert not BinnedEulerHead(4, HOPENET_BINS).circular


def test_full_range_targets_wrap_plus_180_into_first_bin():
    # pitch = 180 exactly comes out of euler_from_rotation as +180, outside [-180, 180)
    R = rotation_from_euler(torch.tensor([180.0]), torch.tensor([0.0]), torch.tensor([180.0]))
    e = euler_targets(R.double(), FULL_RANGE_BINS)
    assert ((e >= -180.0) & (e < 180.0)).all()
    head = BinnedEulerHead(4, FULL_RANGE_BINS).double()
    assert head.in_range(R.double()).all()
    loss, _ = head.loss(head(torch.zeros(1, 4, dtype=torch.float64)), R.double())
    assert torch.isfinite(loss)


def test_circular_loss_wraps_the_error():
    spec = FULL_RANGE_BINS
    logits = torch.full((1, 3, spec.num_bins), -1e4, dtype=torch.float64)
    logits[:, :, -1] = 0.0  # decodes to 178.5
    target = torch.tensor([[-179.0, -179.0, -179.0]], dtype=torch.float64)
    _, parts = binned_loss(logits, target, spec, alpha=1.0, circular=True)
    assert parts["mae_pitch"].item() == pytest.approx(2.5, abs=1e-6)  # not 357.5
    _, parts = binned_loss(logits, target, spec, alpha=1.0, circular=False)
    assert parts["mae_pitch"].item() == pytest.approx(357.5, abs=1e-6)


def test_out_of_range_labels_raise_with_the_value():
    head = BinnedEulerHead(4)
    R = rotation_from_euler(torch.tensor([0.0, 120.0]), torch.tensor([10.0, 0.0]),
                            torch.tensor([0.0, 0.0]))
    assert head.in_range(R).tolist() == [True, False]
    with pytest.raises(ValueError, match=r"pitch label = 120 deg lies outside .*\[-99, 99\)"):
        head.loss(head(torch.zeros(2, 4)), R)
    with pytest.raises(ValueError, match="outside"):
        binned_loss(torch.zeros(1, 3, 66), torch.tensor([[0.0, 99.0, 0.0]]))


@settings(max_examples=50, deadline=None)
@given(st.floats(-89.0, 89.0), st.floats(-89.0, 89.0), st.floats(-89.0, 89.0))
def test_binned_rotation_of_one_hot_targets_is_within_half_a_bin(pitch, yaw, roll):
    # a head whose logits are the one-hot of the label's bins predicts that bin centre's rotation
    head = BinnedEulerHead(4).double()
    R = rotation_from_euler(torch.tensor([pitch]), torch.tensor([yaw]), torch.tensor([roll]))
    R = R.double()
    e = head.targets(R)
    from clerf.geometry import angle_to_bin

    idx = angle_to_bin(e, HOPENET_BINS)
    logits = torch.full((1, 3, 66), -1e4, dtype=torch.float64)
    logits.scatter_(-1, idx[..., None], 0.0)
    decoded = head.decode(logits)
    assert (decoded - e).abs().max().item() <= 1.5 + 1e-9
    pred = torch.stack(euler_from_rotation(head.rotation({"logits": logits})), -1)
    torch.testing.assert_close(pred, decoded)


def test_combined_head_sums_weighted_losses():
    torch.manual_seed(0)
    b = BinnedEulerHead(8, alpha=1.0)
    r = Rotation6DHead(8, hidden=4)
    head = CombinedHead(b, r, binned_weight=0.3, rotation6d_weight=2.0)
    x = torch.randn(6, 8)
    R = rotation_from_euler(torch.rand(6) * 60 - 30, torch.rand(6) * 60 - 30,
                            torch.rand(6) * 60 - 30)
    out = head(x)
    assert set(out) == {"logits", "sixd"}
    loss, parts = head.loss(out, R)
    lb, _ = b.loss(b(x), R)
    lr, _ = r.loss(r(x), R)
    torch.testing.assert_close(loss, 0.3 * lb + 2.0 * lr)
    torch.testing.assert_close(head.rotation(out), r.rotation(out))
    assert "loss_binned" in parts and "geodesic_deg" in parts


def test_build_head_from_config_mapping():
    assert isinstance(build_head({"type": "binned"}, 8), BinnedEulerHead)
    assert isinstance(build_head({"type": "rotation6d", "hidden": 0}, 8), Rotation6DHead)
    h = build_head({"type": "both", "bins": {"start": -180, "width": 3, "num_bins": 120},
                    "predict_from": "binned"}, 8)
    assert isinstance(h, CombinedHead) and h.binned.circular and h.predict_from == "binned"
    with pytest.raises(ConfigError, match="head.type"):
        build_head({"type": "quaternion"}, 8)
    with pytest.raises(ConfigError, match="decode"):
        build_head({"type": "binned", "decode": "median"}, 8)
    with pytest.raises(ConfigError, match=r"head.hidden: not a key of the head 'binned'"):
        build_head({"type": "binned", "hidden": 8}, 8)


def test_heads_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 3, 66\)"):
        binned_loss(torch.zeros(2, 66), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets"):
        binned_loss(torch.zeros(2, 3, 66), torch.zeros(3, 3))


# --------------------------------------------------------------------------- chordal loss, sphere


def test_chordal_loss_is_4_one_minus_cos_of_the_geodesic_angle():
    from clerf.models.heads import chordal_loss

    R1 = random_rotation(12, torch.Generator().manual_seed(7), dtype=torch.float64)
    R2 = random_rotation(12, torch.Generator().manual_seed(8), dtype=torch.float64)
    theta = torch.tensor([SciRot.from_matrix(a.T @ b).magnitude() for a, b in
                          zip(R1.numpy(), R2.numpy(), strict=True)])  # fmt: skip
    assert chordal_loss(R1, R2).item() == pytest.approx(float((4 * (1 - theta.cos())).mean()),
                                                        rel=1e-9)  # fmt: skip


def test_rotation6d_head_with_chordal_loss_logs_the_geodesic_error():
    head = Rotation6DHead(8, hidden=0, loss="chordal").double()
    out = head(torch.randn(6, 8, dtype=torch.float64))
    R = random_rotation(6, torch.Generator().manual_seed(9), dtype=torch.float64)
    loss, parts = head.loss(out, R)
    with torch.no_grad():
        Rp = head.rotation(out)
        assert loss.item() == pytest.approx(float(((Rp - R) ** 2).sum((-1, -2)).mean()), rel=1e-9)
        assert parts["geodesic_deg"].item() == pytest.approx(
            float(geodesic_distance(Rp, R).mean()), rel=1e-9)
    with pytest.raises(ValueError, match="head.loss"):
        Rotation6DHead(8, loss="l1")


def test_sphere_head_decodes_its_own_targets_and_learns_a_fixed_batch():
    from clerf.geometry import fibonacci_sphere
    from clerf.models.heads import SphereGridHead, build_head

    head = build_head({"type": "sphere", "hidden": 0, "sphere_points": 512,
                       "sphere_sigma_deg": 10.0}, 8)  # fmt: skip
    assert isinstance(head, SphereGridHead)
    R = random_rotation(200, torch.Generator().manual_seed(10))
    grid = fibonacci_sphere(512)
    s2 = math.radians(10.0) ** 2
    logits = torch.stack([(R[:, 1] @ grid.T - 1) / s2, (R[:, 2] @ grid.T - 1) / s2], 1)
    Rp = head.rotation({"sphere_logits": logits})
    # grid points ~9 deg apart; the local soft-argmax interpolates between them
    assert float(geodesic_distance(Rp.double(), R.double()).max()) < 1.0
    assert torch.allclose(torch.det(Rp), torch.ones(200), atol=1e-5)
    # training on a fixed batch drives the decoded error down
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        loss, _ = head.loss(head(x), R[:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, parts = head.loss(head(x), R[:16])
    assert parts["geodesic_deg"].item() < 5.0


def test_heads_return_float32_under_bf16_autocast():
    from clerf.models.heads import build_head

    x = torch.randn(4, 8)
    for cfg in ({"type": "rotation6d"}, {"type": "binned"}, {"type": "sphere"}):
        head = build_head(cfg, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
        assert all(v.dtype == torch.float32 for v in out.values()), cfg


def _small(head_type: str, hidden: int) -> list[str]:
    """Overrides of a small head of each type (each type takes only its own keys)."""
    out = [f"head.type={head_type}"]
    if head_type != "binned":
        out.append(f"head.hidden={hidden}")
    if head_type == "sphere":
        out.append("head.sphere_points=64")
    return out


@pytest.mark.parametrize("head_type", ["binned", "rotation6d", "both", "sphere"])
def test_loss_keys_are_exactly_the_parts_of_every_step(head_type):
    """The training logs reduce head.loss_keys over processes: it must be what loss returns."""
    from clerf.config import load_config
    from clerf.geometry import random_rotation, rotation_from_euler
    from clerf.models.heads import build_head

    cfg = load_config(None, _small(head_type, 16))
    head = build_head(cfg.head, 8)
    R = rotation_from_euler(torch.tensor([10.0, 0.0]), torch.tensor([-20.0, 30.0]),
                            torch.tensor([5.0, -15.0]))
    if head_type == "sphere":
        R = random_rotation(2, torch.Generator().manual_seed(0))
    _, parts = head.loss(head(torch.randn(2, 8)), R)
    assert tuple(parts) == head.loss_keys


@pytest.mark.parametrize("head_type", ["binned", "rotation6d", "sphere"])
def test_heads_run_their_layers_in_float32_under_bf16_autocast(head_type):
    """Casting a bf16 Linear's output to float32 is too late: the layer itself must run in
    float32. Under CPU bf16 autocast the outputs equal the float32 head's exactly."""
    from clerf.config import load_config
    from clerf.models.heads import build_head

    cfg = load_config(None, _small(head_type, 32))
    torch.manual_seed(0)
    head = build_head(cfg.head, 64)
    feats = torch.randn(8, 64)
    ref = head(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(feats.to(torch.bfloat16))  # as a bf16 backbone hands them over
    for k in ref:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], head(feats.to(torch.bfloat16).float())[k])
