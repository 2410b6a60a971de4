"""How much pose a frozen representation carries: k-nearest-neighbour pose retrieval and a
linear probe, both on held-out labelled images.

* :func:`knn_pose_error`: for each image, the ``k`` most similar others (cosine similarity of the
  features); their rotations are averaged (chordal mean, :func:`clerf.geometry.nearest_rotation`)
  and compared with the image's own (geodesic error). ``k = 1`` is nearest-neighbour retrieval.
* :func:`linear_probe_error`: ridge regression from standardised features to the 9 entries of
  ``R``, projected to SO(3), fitted on one half of the images and scored on the other (and the
  reverse; both folds pooled). A representation that carries pose linearly scores low.

* :func:`gallery_probe`: the same two measures across two sets, queries against a labelled
  *gallery* (e.g. photographs against renders at known poses): each query's neighbours come from
  the gallery, and the ridge probe is fitted on the gallery and scored on the queries. A
  representation in which a photograph and a render at the same pose are the same point (what
  CLERF's real-anchor pairing trains for) scores low; one that separates the two domains does not.

All are pure functions of (features, rotations); chance is about 126.5 deg for uniform SO(3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clerf.geometry import geodesic_distance, nearest_rotation

__all__ = ["gallery_probe", "knn_pose_error", "linear_probe_error", "probe_features"]


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
    return _knn_error(sim, rotations, rotations, k)


def _knn_error(sim: Tensor, neighbour_rotations: Tensor, rotations: Tensor, k: int) -> float:
    """Mean geodesic error of the chordal mean of each row's ``k`` most similar neighbours'
    rotations (``sim``: queries x neighbours) against the queries' ``rotations``."""
    idx = sim.topk(k, dim=1).indices
    Rn = neighbour_rotations.double()
    mean = nearest_rotation(Rn[idx].mean(dim=1)) if k > 1 else Rn[idx[:, 0]]
    return float(geodesic_distance(mean, rotations.double()).mean())


def _ridge_error(X_fit: Tensor, R_fit: Tensor, X_score: Tensor, R_score: Tensor,
                 ridge: float) -> Tensor:  # fmt: skip
    """Per-image geodesic errors (deg) on ``X_score`` of a ridge regression standardised
    features -> the 9 entries of R fitted on ``X_fit`` (projected to SO(3))."""
    mu, sd = X_fit.mean(0), X_fit.std(0).clamp_min(1e-6)
    A = torch.cat([(X_fit - mu) / sd, torch.ones(X_fit.shape[0], 1, dtype=X_fit.dtype)], 1)
    B = torch.cat([(X_score - mu) / sd, torch.ones(X_score.shape[0], 1, dtype=X_fit.dtype)], 1)
    reg = ridge * A.shape[0] * torch.eye(A.shape[1], dtype=X_fit.dtype)
    reg[-1, -1] = 0.0  # the bias is not shrunk
    W = torch.linalg.solve(A.T @ A + reg, A.T @ R_fit.reshape(-1, 9))
    R_hat = nearest_rotation((B @ W).reshape(-1, 3, 3))
    return geodesic_distance(R_hat, R_score)


def linear_probe_error(features: Tensor, rotations: Tensor, ridge: float = 1e-2,
                       groups: Tensor | None = None) -> float:  # fmt: skip
    """Mean geodesic error (deg) of a 2-fold ridge-regression probe features -> R (9 entries,
    projected to SO(3)); folds are the even and the odd images, or with ``groups`` the even
    and the odd groups (in sorted order: no group on both sides)."""
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"linear_probe_error: needs at least 4 images, got {n}")
    X = features.double()
    R = rotations.double()
    if groups is None:
        even = torch.arange(n) % 2 == 0
    else:
        _, rank = torch.unique(groups, sorted=True, return_inverse=True)
        even = rank % 2 == 0
        if bool(even.all()) or not bool(even.any()):
            raise ValueError("linear_probe_error: needs at least 2 groups")
    folds = (even, ~even)
    errors = [_ridge_error(X[fit], R[fit], X[score], R[score], ridge)
              for fit, score in (folds, folds[::-1])]
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


def gallery_probe(queries: Tensor, query_rotations: Tensor, gallery: Tensor,
                  gallery_rotations: Tensor, ridge: float = 1e-2) -> dict[str, float]:  # fmt: skip
    """``knn1_deg``, ``knn5_deg`` and ``linear_probe_deg`` of ``queries`` (N, F) against a
    labelled ``gallery`` (M, F): the neighbours (cosine similarity) are gallery images, the
    ridge probe is fitted on the gallery and scored on the queries. Mean geodesic deg."""
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError("gallery_probe: queries and gallery must be (N, F) and (M, F), got "
                         f"{tuple(queries.shape)} and {tuple(gallery.shape)}")
    m = gallery.shape[0]
    if m < 6:
        raise ValueError(f"gallery_probe: the gallery needs at least 6 images, got {m}")
    zq = torch.nn.functional.normalize(queries.double(), dim=-1)
    zg = torch.nn.functional.normalize(gallery.double(), dim=-1)
    sim = zq @ zg.T
    Rq, Rg = query_rotations.double(), gallery_rotations.double()
    lin = _ridge_error(gallery.double(), Rg, queries.double(), Rq, ridge)
    return {"knn1_deg": _knn_error(sim, Rg, Rq, 1), "knn5_deg": _knn_error(sim, Rg, Rq, 5),
            "linear_probe_deg": float(lin.mean())}
