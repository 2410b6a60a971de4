"""Contrastive losses on pose embeddings: pairs labelled by geodesic distance, PML losses.

Pair labelling (exact rule). A training batch holds ``B`` triplets ``(anchor, positive,
negative)`` flattened to ``N = 3B`` images; image ``k`` has its **composed** rotation ``R_k``
(the store's label after augmentation, ``clerf.augment``). For two different images ``i != j``
let ``d_ij = geodesic_distance(R_i, R_j)`` in degrees. Then

* ``d_ij <= eps_deg``  -> **positive** pair,
* ``d_ij >  delta_deg`` -> **negative** pair,
* otherwise (and ``i == j``) -> ignored: neither pulled together nor pushed apart, so nearby
  poses are never treated as false negatives.

Which pairs are labelled: with ``batch_pairs: true`` every pair of the batch (batch-wide
positives and negatives: other identities at the same pose become positives, every far pose a
negative); with ``batch_pairs: false`` only pairs inside one triplet (the triplet table's
anchor-positive, anchor-negative and positive-negative pairs). Either way the label of a pair is
the rule above; the table does not override it. So a table negative whose independent
augmentation brought it within ``delta_deg`` of its anchor is *not* used as a negative (counted
in the logs as ``table_neg_dropped``), and a table positive further than ``eps_deg`` (impossible
for a generated store, where anchor and positive share one rotation and one geometric
transform) is counted as ``table_pos_violations``.

Losses (pytorch-metric-learning): ``CircleLoss`` (default; cosine similarity, margin ``m``,
scale ``gamma``) receives the pairs as ``indices_tuple = (a1, p, a2, n)``; ``TripletMarginLoss``
receives every ``(a, p, n)`` with ``(a, p)`` positive and ``(a, n)`` negative (a random subset
of at most ``max_triplets``). Reducers are chosen explicitly: CircleLoss returns one value per
anchor and exactly 0 for anchors without both a positive and a negative, so
``AvgNonZeroReducer`` averages over the anchors that have pairs; TripletMarginLoss uses
``MeanReducer`` (PML's default would average over the violating triplets only, which hides
progress). Embeddings come L2-normalised from the encoder; ``normalize_embeddings=True`` is set
explicitly anyway.

Distributed training: with ``gather_distributed: true`` the embeddings and rotations of all
ranks are gathered (with gradients, ``torch.distributed.nn.functional.all_gather``) and each
rank's images are compared with the whole global batch (local anchors, global references), as
lightly's ``gather_distributed`` does. Off by default: each rank then uses its local batch only.
PML's ``DistributedLossWrapper`` is deliberately not used (it would scale the loss by the world
size and adds no negatives to locally formed tuples).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import torch
from torch import Tensor, nn

from clerf.config import LossName
from clerf.geometry import geodesic_distance

__all__ = [
    "LOSS_NAMES",
    "pair_labels",
    "triplet_block_mask",
    "pairs_from_masks",
    "triplets_from_masks",
    "PoseMetricLoss",
    "build_loss",
]

#: the ``loss.name`` choices (:data:`clerf.config.LossName`)
LOSS_NAMES: tuple[str, ...] = get_args(LossName)


def pair_labels(
    rotations: Tensor,
    eps_deg: float,
    delta_deg: float,
    ref_rotations: Tensor | None = None,
    self_index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Label all pairs by geodesic distance (the rule in the module docstring).

    Args:
        rotations: ``(N, 3, 3)`` composed rotations of the query images.
        eps_deg, delta_deg: thresholds in degrees, ``0 <= eps_deg <= delta_deg``.
        ref_rotations: ``(M, 3, 3)`` references (default: ``rotations`` itself).
        self_index: ``(N,)`` index of each query among the references (excluded from pairs);
            default ``arange(N)`` when ``ref_rotations`` is None, else no exclusion.

    Returns:
        ``(pos, neg, dist)``: boolean ``(N, M)`` masks and the ``(N, M)`` distances in degrees.
    """
    if not 0.0 <= eps_deg <= delta_deg:
        raise ValueError(f"loss: need 0 <= eps_deg <= delta_deg, got {eps_deg}, {delta_deg}")
    ref = rotations if ref_rotations is None else ref_rotations
    d = geodesic_distance(rotations[:, None].double(), ref[None, :].double())
    pos = d <= eps_deg
    neg = d > delta_deg
    if self_index is None and ref_rotations is None:
        self_index = torch.arange(rotations.shape[0], device=rotations.device)
    if self_index is not None:
        rows = torch.arange(rotations.shape[0], device=rotations.device)
        pos[rows, self_index] = False
        neg[rows, self_index] = False
    return pos, neg, d.float()


def triplet_block_mask(n_triplets: int, device: Any = None, ref_offset: int = 0,
                       ref_size: int | None = None) -> Tensor:  # fmt: skip
    """``(3B, M)`` boolean: True where query and reference belong to the same triplet.

    Images are in triplet order (anchor, positive, negative of triplet 0, then triplet 1...);
    the local batch sits at ``ref_offset`` inside the ``M`` references.
    """
    n = 3 * n_triplets
    m = n if ref_size is None else ref_size
    tid = torch.arange(n, device=device) // 3
    ref_tid = torch.full((m,), -1, dtype=torch.long, device=device)
    ref_tid[ref_offset:ref_offset + n] = tid
    return tid[:, None] == ref_tid[None, :]


def pairs_from_masks(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PML pair tuple ``(a1, p, a2, n)`` from boolean ``(N, M)`` masks."""
    a1, p = pos.nonzero(as_tuple=True)
    a2, n = neg.nonzero(as_tuple=True)
    return a1, p, a2, n


def triplets_from_masks(
    pos: Tensor, neg: Tensor, max_triplets: int = 0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(a, p, n)`` with ``pos[a, p]`` and ``neg[a, n]``; a random subset if capped."""
    a, p = pos.nonzero(as_tuple=True)
    pair_idx, n = neg[a].nonzero(as_tuple=True)
    a, p = a[pair_idx], p[pair_idx]
    if max_triplets and a.numel() > max_triplets:
        keep = torch.randperm(a.numel(), generator=generator,
                              device=generator.device if generator else "cpu")[:max_triplets]
        keep = keep.to(a.device)
        a, p, n = a[keep], p[keep], n[keep]
    return a, p, n


def _gather_with_grad(x: Tensor) -> Tensor:
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def _gather_no_grad(x: Tensor) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class PoseMetricLoss(nn.Module):
    """Metric-learning loss on triplet batches with pose-based pair labels.

    Args:
        name: ``circle`` or ``triplet``.
        eps_deg, delta_deg: positive / negative thresholds (degrees).
        m, gamma: CircleLoss margin and scale. margin: TripletMarginLoss margin.
        reducer: ``auto``, ``mean`` or ``avg_nonzero`` (see the module docstring).
        batch_pairs: label every pair of the batch (True) or the triplet table's pairs only.
        gather_distributed: compare with the embeddings of all ranks under DDP.
        max_triplets: cap for the triplet loss (0 = no cap).
    """

    def __init__(
        self,
        name: str = "circle",
        eps_deg: float = 5.0,
        delta_deg: float = 30.0,
        m: float = 0.25,
        gamma: float = 64.0,
        margin: float = 0.2,
        reducer: str = "auto",
        batch_pairs: bool = True,
        gather_distributed: bool = False,
        max_triplets: int = 20000,
    ) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, reducers
        from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

        if name not in LOSS_NAMES:
            raise ValueError(f"loss.name: expected one of {LOSS_NAMES}, got '{name}'")
        if not 0.0 <= eps_deg <= delta_deg <= 180.0:
            raise ValueError(
                f"loss: need 0 <= eps_deg <= delta_deg <= 180, got eps_deg={eps_deg}, "
                f"delta_deg={delta_deg}"
            )
        if reducer == "auto":
            reducer = "avg_nonzero" if name == "circle" else "mean"
        if reducer not in ("mean", "avg_nonzero"):
            raise ValueError(f"loss.reducer: expected auto, mean or avg_nonzero, got '{reducer}'")
        red = reducers.MeanReducer() if reducer == "mean" else reducers.AvgNonZeroReducer()
        self.name, self.reducer_name = name, reducer
        self.eps_deg, self.delta_deg = float(eps_deg), float(delta_deg)
        self.batch_pairs = bool(batch_pairs)
        self.gather_distributed = bool(gather_distributed)
        self.max_triplets = int(max_triplets)
        if name == "circle":
            self.loss = losses.CircleLoss(
                m=m, gamma=gamma, distance=CosineSimilarity(),  # always normalises (PML)
                reducer=red,
            )  # fmt: skip
        else:
            self.loss = losses.TripletMarginLoss(
                margin=margin, distance=LpDistance(normalize_embeddings=True, p=2),
                swap=False, smooth_loss=False, triplets_per_anchor="all", reducer=red,
            )  # fmt: skip

    def forward(
        self,
        embeddings: Tensor,
        rotations: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of a triplet batch.

        Args:
            embeddings: ``(B, 3, D)`` (anchor, positive, negative) or flattened ``(3B, D)``.
            rotations: ``(B, 3, 3, 3)`` or ``(3B, 3, 3)`` composed rotations.
            generator: for the random subset of triplets (triplet loss only).

        Returns:
            ``(loss, stats)``; stats: pair counts and table-pair checks for the logs.
        """
        emb = embeddings.reshape(-1, embeddings.shape[-1])
        rot = rotations.reshape(-1, 3, 3)
        n = emb.shape[0]
        if n % 3 or rot.shape[0] != n:
            raise ValueError(
                f"loss: expected triplet batches (3B embeddings and rotations), got "
                f"{tuple(embeddings.shape)} and {tuple(rotations.shape)}"
            )
        ref_emb, ref_rot, offset = emb, rot, 0
        import torch.distributed as dist

        if self.gather_distributed and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:  # fmt: skip
            ref_emb = _gather_with_grad(emb)
            ref_rot = _gather_no_grad(rot.detach())
            offset = dist.get_rank() * n
        self_index = torch.arange(n, device=emb.device) + offset
        pos, neg, dist_deg = pair_labels(rot.detach(), self.eps_deg, self.delta_deg,
                                         ref_rotations=ref_rot.detach(),
                                         self_index=self_index)  # fmt: skip
        block = triplet_block_mask(n // 3, emb.device, offset, ref_emb.shape[0])
        if not self.batch_pairs:
            pos, neg = pos & block, neg & block
        stats = self._table_stats(dist_deg, block, offset)
        # tensors: summed on the device by the logging window, read once per window
        stats["pos_pairs"] = pos.sum().float()
        stats["neg_pairs"] = neg.sum().float()
        if self.name == "circle":
            tup = pairs_from_masks(pos, neg)
        else:
            tup = triplets_from_masks(pos, neg, self.max_triplets, generator)
        if tup[0].numel() == 0 or (self.name == "circle" and tup[2].numel() == 0):
            # No usable pair: a zero that still depends on the parameters (DDP needs a graph)
            # and, when gathered, on the gathered embeddings: the all-gather's backward is a
            # collective every rank must enter, or the ranks that did find pairs wait forever.
            zero = emb.sum() * 0.0
            if ref_emb is not emb:
                zero = zero + ref_emb.sum() * 0.0
            return zero, stats
        loss = self.loss(emb, indices_tuple=tup, ref_emb=ref_emb)
        return loss, stats

    def _table_stats(self, dist_deg: Tensor, block: Tensor, offset: int) -> dict[str, Tensor]:
        n = dist_deg.shape[0]
        b = torch.arange(0, n, 3, device=dist_deg.device)
        d_ap = dist_deg[b, offset + b + 1]
        d_an = dist_deg[b, offset + b + 2]
        return {
            "table_pos_violations": (d_ap > self.eps_deg).sum().float(),
            "table_neg_dropped": (d_an <= self.delta_deg).sum().float(),
        }


def build_loss(cfg: Mapping[str, Any]) -> PoseMetricLoss:
    """From a ``pretrain.loss`` config section."""
    return PoseMetricLoss(
        name=cfg["name"], eps_deg=cfg["eps_deg"], delta_deg=cfg["delta_deg"], m=cfg["m"],
        gamma=cfg["gamma"], margin=cfg["margin"], reducer=cfg["reducer"],
        batch_pairs=cfg["batch_pairs"], gather_distributed=cfg["gather_distributed"],
        max_triplets=cfg["max_triplets"],
    )  # fmt: skip
