"""Tests of clerf.losses: exact pair labelling, PML loss values against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.geometry import random_rotation, rotation_from_euler
from clerf.losses import (
    PoseMetricLoss,
    build_loss,
    pair_labels,
    pairs_from_masks,
    triplet_block_mask,
    triplets_from_masks,
)


def _yaw(*angles):
    a = torch.tensor(angles, dtype=torch.float64)
    return rotation_from_euler(torch.zeros_like(a), a, torch.zeros_like(a))


def test_pair_labels_hand_made_example():
    # yaw 0, 3, 20, 90 deg; eps 5, delta 30. Distances: 0-1: 3 (pos), 0-2: 20 (ignored),
    # 0-3: 90 (neg), 1-2: 17 (ignored), 1-3: 87 (neg), 2-3: 70 (neg). Diagonal: ignored.
    pos, neg, d = pair_labels(_yaw(0, 3, 20, 90), eps_deg=5.0, delta_deg=30.0)
    P = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    N = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(pos, P) and torch.equal(neg, N)
    assert d[0, 3] == pytest.approx(90.0, abs=1e-4) and d[1, 2] == pytest.approx(17.0, abs=1e-4)


def test_pair_labels_boundaries_are_inclusive_exclusive_as_documented():
    # d == eps -> positive; d == delta -> ignored (negatives need d > delta).
    pos, neg, _ = pair_labels(_yaw(0, 5, 35), eps_deg=5.0, delta_deg=35.0)
    assert pos[0, 1] and not neg[0, 2] and not pos[0, 2]


def test_pair_labels_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="eps_deg <= delta_deg"):
        pair_labels(_yaw(0, 1), eps_deg=10.0, delta_deg=5.0)


def test_block_mask_and_table_only_labelling():
    block = triplet_block_mask(2)
    assert block.shape == (6, 6)
    assert block[0, :3].all() and not block[0, 3:].any() and block[4, 3:].all()
    # Two triplets: (0 deg, 0 deg, 90 deg) and (1 deg, 1 deg, 180 deg). Batch-wide, anchor 0 also
    # has positives in triplet 1 (1 deg away); table-only, it does not.
    R = _yaw(0, 0, 90, 1, 1, -89).reshape(2, 3, 3, 3)
    emb = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    wide = PoseMetricLoss(batch_pairs=True)
    table = PoseMetricLoss(batch_pairs=False)
    _, s_wide = wide(emb, R)
    _, s_table = table(emb, R)
    # table: per triplet a-p, p-a positive; a-n, n-a, p-n, n-p negative
    assert s_table["pos_pairs"] == 4 and s_table["neg_pairs"] == 8
    # batch-wide: 0,1,3,4 are within 1 deg of each other (12 ordered pairs); 2 and 5 are 179 deg
    # apart; each of them is 89-91 deg from the four others.
    assert s_wide["pos_pairs"] == 12 and s_wide["neg_pairs"] == 2 + 2 * 8


def test_table_negative_moved_close_by_augmentation_is_dropped_and_counted():
    R = _yaw(0, 0, 10, 0, 0, 90).reshape(2, 3, 3, 3)  # first negative only 10 deg away
    emb = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    _, stats = PoseMetricLoss(eps_deg=5.0, delta_deg=30.0)(emb, R)
    assert stats["table_neg_dropped"] == 1 and stats["table_pos_violations"] == 0


def test_triplets_from_masks_enumerates_all():
    pos = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    neg = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    a, p, n = triplets_from_masks(pos, neg)
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == [(0, 1, 2), (1, 0, 2)]
    a1, p1, a2, n2 = pairs_from_masks(pos, neg)
    assert a1.tolist() == [0, 1] and a2.tolist() == [0, 1, 2, 2]


def _circle_reference(emb, pos, neg, m, gamma):
    """CircleLoss (Sun et al. 2020) written out directly; mean over anchors with pairs."""
    z = F.normalize(emb, dim=-1)
    s = z @ z.T
    losses = []
    for i in range(s.shape[0]):
        sp, sn = s[i][pos[i]], s[i][neg[i]]
        if sp.numel() == 0 or sn.numel() == 0:
            continue
        ap = torch.relu(1 + m - sp.detach())
        an = torch.relu(sn.detach() + m)
        lp = -gamma * ap * (sp - (1 - m))
        ln = gamma * an * (sn - m)
        losses.append(F.softplus(torch.logsumexp(lp, 0) + torch.logsumexp(ln, 0)))
    return torch.stack(losses).mean()


def test_circle_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    R = random_rotation(12, g).reshape(4, 3, 3, 3)
    R[:, 1] = R[:, 0]
    R[1, 0] = R[1, 1] = R[0, 0]  # an extra batch-wide positive across triplets
    emb = torch.randn(12, 16, generator=g, dtype=torch.float64)
    loss_fn = PoseMetricLoss("circle", eps_deg=5.0, delta_deg=30.0, m=0.25, gamma=64.0)
    got, _ = loss_fn(emb, R)
    pos, neg, _ = pair_labels(R.reshape(-1, 3, 3), 5.0, 30.0)
    ref = _circle_reference(emb, pos, neg, 0.25, 64.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_triplet_loss_matches_direct_formula_with_mean_reducer():
    g = torch.Generator().manual_seed(1)
    R = random_rotation(9, g).reshape(3, 3, 3, 3)
    R[:, 1] = R[:, 0]
    emb = torch.randn(9, 8, generator=g, dtype=torch.float64)
    got, _ = PoseMetricLoss("triplet", margin=0.2, max_triplets=0)(emb, R)
    pos, neg, _ = pair_labels(R.reshape(-1, 3, 3), 5.0, 30.0)
    a, p, n = triplets_from_masks(pos, neg)
    z = F.normalize(emb, dim=-1)
    dap = (z[a] - z[p]).norm(dim=-1)
    dan = (z[a] - z[n]).norm(dim=-1)
    ref = torch.relu(dap - dan + 0.2).mean()  # mean over ALL triplets (MeanReducer)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_no_pairs_gives_a_zero_with_a_graph():
    R = _yaw(0, 10, 20).reshape(1, 3, 3, 3)  # everything in the ignored band
    emb = torch.randn(3, 4, requires_grad=True)
    loss, stats = PoseMetricLoss(eps_deg=1.0, delta_deg=30.0)(emb, R)
    assert loss.item() == 0.0 and stats["pos_pairs"] == 0
    loss.backward()
    assert emb.grad is not None


def test_loss_decreases_when_optimising_embeddings():
    g = torch.Generator().manual_seed(2)
    R = random_rotation(16, g)
    rot = torch.stack([R[:8], R[:8], R[8:]], dim=1)
    emb = torch.randn(24, 16, generator=g, requires_grad=True)
    loss_fn = PoseMetricLoss("circle")
    opt = torch.optim.SGD([emb], lr=0.05)
    first = None
    for _ in range(20):
        loss, _ = loss_fn(emb, rot)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss.name"):
        PoseMetricLoss("arcface")
    with pytest.raises(ValueError, match="delta_deg"):
        PoseMetricLoss(eps_deg=40.0, delta_deg=30.0)
    with pytest.raises(ValueError, match="reducer"):
        PoseMetricLoss(reducer="sum")
    with pytest.raises(ValueError, match="triplet batches"):
        PoseMetricLoss()(torch.randn(4, 8), torch.eye(3).expand(4, 3, 3))


def test_build_loss_from_config():
    from clerf.config import load_config

    cfg = load_config(overrides=["pretrain.loss.name=triplet", "pretrain.loss.reducer=auto"])
    loss = build_loss(cfg.pretrain.loss)
    assert loss.name == "triplet" and loss.reducer_name == "mean"
    assert build_loss(load_config().pretrain.loss).reducer_name == "avg_nonzero"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.0, 90.0), gap=st.floats(0.0, 90.0))
def test_pair_labels_properties(seed, eps, gap):
    delta = eps + gap
    g = torch.Generator().manual_seed(seed)
    R = random_rotation(6, g, dtype=torch.float64)
    R = torch.cat([R, R[:2] @ rotation_from_euler(0.0, 3.0, 0.0).double()])  # some near pairs
    pos, neg, d = pair_labels(R, eps, delta)
    assert torch.equal(pos, pos.T) and torch.equal(neg, neg.T)
    assert not (pos & neg).any() and not pos.diagonal().any() and not neg.diagonal().any()
    off = ~torch.eye(len(R), dtype=torch.bool)
    assert torch.equal(pos, (d <= eps) & off) and torch.equal(neg, (d > delta) & off)
