"""How much pose a frozen representation carries: k-nearest-neighbour pose retrieval and a
linear probe, both on held-out labelled images.

* :func:`knn_pose_error`: for each image, the ``k`` most similar others (cosine similarity of the
  features); their rotations are averaged (chordal mean, :func:`clerf.geometry.nearest_rotation`)
  and compared with the image's own (geodesic error). ``k = 1`` is nearest-neighbour retrieval.
* :func:`linear_probe_error`: ridge regression from standardised features to the 9 entries of
  ``R``, projected to SO(3), fitted on one half of the images and scored on the other (and the
  reverse; both folds pooled). A representation that carries pose linearly scores low.

Both are pure functions of (features, rotations); chance is about 126.5 deg for uniform SO(3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clerf.geometry import geodesic_distance, nearest_rotation

__all__ = ["knn_pose_error", "linear_probe_error", "probe_features"]


def knn_pose_error(features: Tensor, rotations: Tensor, k: int = 1,
                   groups: Tensor | None = None) -> float:  # fmt: skip
    """Mean geodesic error (deg) of the chordal mean of the ``k`` nearest neighbours' rotations
    (leave-one-out, cosine similarity). With ``groups`` (e.g. the person of each image), the
    neighbours come from other groups only: a data set with near-duplicate images of one
    person at one pose (Pointing'04's two series) otherwise measures the duplicates."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn_pose_error: need 1 <= k < N = {n}, got k={k}")
    z = torch.nn.functional.normalize(features.double(), dim=-1)
    sim = (z @ z.T).fill_diagonal_(-float("inf"))
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        if int((~same).sum(1).min()) < k:
            raise ValueError(f"knn_pose_error: some image has fewer than k={k} images of "
                             "other groups")  # fmt: skip
        sim = sim.masked_fill(same.to(sim.device), -float("inf"))
    idx = sim.topk(k, dim=1).indices
    R = rotations.double()
    mean = nearest_rotation(R[idx].mean(dim=1)) if k > 1 else R[idx[:, 0]]
    return float(geodesic_distance(mean, R).mean())


def linear_probe_error(features: Tensor, rotations: Tensor, ridge: float = 1e-2,
                       groups: Tensor | None = None) -> float:  # fmt: skip
    """Mean geodesic error (deg) of a 2-fold ridge-regression probe features -> R (9 entries,
    projected to SO(3)); folds are the even and the odd images, or with ``groups`` the even
    and the odd groups (in sorted order: no group on both sides)."""
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"linear_probe_error: needs at least 4 images, got {n}")
    X = features.double()
    Y = rotations.double().reshape(n, 9)
    if groups is None:
        even = torch.arange(n) % 2 == 0
    else:
        _, rank = torch.unique(groups, sorted=True, return_inverse=True)
        even = rank % 2 == 0
        if bool(even.all()) or not bool(even.any()):
            raise ValueError("linear_probe_error: needs at least 2 groups")
    folds = (even, ~even)
    errors = []
    for train, test in (folds, folds[::-1]):
        mu, sd = X[train].mean(0), X[train].std(0).clamp_min(1e-6)
        A = torch.cat([(X[train] - mu) / sd, torch.ones(int(train.sum()), 1, dtype=X.dtype)], 1)
        B = torch.cat([(X[test] - mu) / sd, torch.ones(int(test.sum()), 1, dtype=X.dtype)], 1)
        reg = ridge * A.shape[0] * torch.eye(A.shape[1], dtype=X.dtype)
        reg[-1, -1] = 0.0  # the bias is not shrunk
        W = torch.linalg.solve(A.T @ A + reg, A.T @ Y[train])
        R_hat = nearest_rotation((B @ W).reshape(-1, 3, 3))
        errors.append(geodesic_distance(R_hat, rotations.double()[test]))
    return float(torch.cat(errors).mean())


def probe_features(features: Tensor, rotations: Tensor,
                   groups: Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """``knn1_deg``, ``knn5_deg`` and ``linear_probe_deg`` of held-out features (across
    ``groups`` when given: neighbours and probe folds from other groups)."""
    n = features.shape[0]
    out = {"knn1_deg": knn_pose_error(features, rotations, 1, groups)}
    if n > 5:
        out["knn5_deg"] = knn_pose_error(features, rotations, 5, groups)
    out["linear_probe_deg"] = linear_probe_error(features, rotations, groups=groups)
    return out
