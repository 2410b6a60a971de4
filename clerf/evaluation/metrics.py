"""Aggregation of per-sample pose errors into report figures (``docs/conventions.md`` 7).

The per-sample metrics themselves live in :mod:`clerf.geometry` (geodesic error, MAEV, axis
errors, Euler errors wrapped by 360 only); this module turns them into summaries:

* geodesic error: mean, median, 90th percentile (linear interpolation, as ``numpy.percentile``);
* MAEV: mean over samples of the mean angle between predicted and true head axes;
* per-axis Euler MAE (yaw, pitch, roll) and their mean, **only where Euler angles are meaningful**;
* the share of samples whose geodesic error is below 5, 10 and 15 deg.

Euler angles are always derived from the rotation matrices with
:func:`clerf.geometry.euler_from_rotation` (one route for predictions and labels), so yaw lies in
[-90, 90] and the same rotation never appears with two different angle triples. They are
*meaningful* for a sample when its true pitch and roll lie within ``+-euler_range`` (99 deg, the
benchmark filter of docs/conventions.md section 6) and its true ``|yaw|`` is at most ``max_yaw``
(default 90: everything). Beyond that the decomposition flips pitch and roll by 180 deg or becomes
singular (gimbal lock at ``|yaw| = 90``), and a per-axis MAE measures the parametrisation rather
than the model. When every sample is in range the Euler MAE is over all samples; when some are
not it is computed over the in-range subset and the summary says how many (``euler.n``); when
none are (full range, large in-plane rotations) it is ``None`` and the summary says why.

**Published-comparable Euler MAE** (``docs/conventions.md`` section 7): HopeNet and 6DRepNet take
the ground-truth Euler triple straight from the dataset (AFLW2000's ``Pose_Para``, where yaw may
exceed 90 deg) and average over **every** kept image, wrapping differences by 360. Where the
evaluated samples carry the dataset's own triple (``SampleErrors.euler_dataset``, from a store's
``dataset_euler``; the images as stored, no view transform) :func:`summarize` reports that figure
too (``euler_comparable``), with its N: ground truth = the dataset's triple, every sample, 360-only
wrap, and the prediction's Euler angles chosen as the peers decode them (``decoding``):
``6drepnet`` (matrix heads) decomposes the matrix as 6DRepNet does (``pitch = atan2(R21, R22)``,
``yaw = atan2(-R20, hypot(R00, R10))``, ``roll = atan2(R10, R00)``:
:func:`clerf.geometry.euler_from_rotation`; at exact gimbal lock 6DRepNet's fallback branch and
clerf's differ in how pitch and roll share the angle); ``bins`` (HopeNet-style binned heads,
whose angles come straight from the bins in [-99, 99)) takes the other Euler triple of the same
matrix (:func:`clerf.geometry.euler_other_branch`) where only that one lies in the bins' range,
so a predicted yaw of 95 is scored as 95, as HopeNet scores it. On a set with |yaw| > 90 labels
the two figures differ: the matrix route folds such a label into yaw <= 90 with pitch and roll
near +-180, and clerf's figure leaves it out. Every Euler figure carries its ``definition``.

Per-sample errors are computed in float64 after sorting the records by sample index, and means are
exactly rounded sums (:func:`math.fsum`): the same records in any order give the same bits. (The
same rotations under *other* indices agree to about 1e-13 deg: vectorised ``atan2`` rounds the
last bit differently depending on an element's position in the array.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clerf.geometry import (
    HOPENET_BINS,
    PROTOCOL_MAX_ABS_ANGLE,
    EulerAngles,
    axis_errors,
    euler_abs_error,
    euler_from_rotation,
    euler_other_branch,
    geodesic_error,
    maev,
)

__all__ = [
    "euler_mae",
    "THRESHOLDS_DEG",
    "EULER_RANGE_DEG",
    "EULER_DEFINITION",
    "COMPARABLE_DEFINITION",
    "comparable_euler_mae",
    "peers_euler",
    "PEERS_DECODINGS",
    "SampleErrors",
    "compute_errors",
    "summarize",
    "merge",
    "EULER_AXES",
    "euler_in_range",
    "binned_error",
    "cumulative_curve",
]

#: geodesic-error thresholds (deg) for the "share of samples under" figures
THRESHOLDS_DEG: tuple[float, ...] = (5.0, 10.0, 15.0, 30.0)
#: the benchmark's Euler filter (docs/conventions.md section 6): |angles| <= 99 deg
EULER_RANGE_DEG = PROTOCOL_MAX_ABS_ANGLE

#: the order of Euler angles in every ``(N, 3)`` array: the geometry core's ``EulerAngles``
#: (pitch, yaw, roll), as the stores record it (``euler_order``); reports name each by its axis
EULER_AXES: tuple[str, ...] = EulerAngles._fields

#: how clerf's own Euler MAE (``euler``) is computed
EULER_DEFINITION = (
    "clerf: label and prediction both decomposed from their rotation matrices (yaw in "
    "[-90, 90]), over the samples whose true angles are meaningful (see note), differences "
    "wrapped by 360 only"
)
#: how the published-comparable Euler MAE (``euler_comparable``) is computed
COMPARABLE_DEFINITION = (
    "published-comparable: ground truth = the dataset's own Euler triple (e.g. AFLW2000 "
    "Pose_Para; yaw may exceed 90), every sample, prediction's Euler angles as the peers decode "
    "them (see decoding), differences wrapped by 360 only"
)
#: how the prediction's Euler angles are chosen for the comparable figure
PEERS_DECODINGS = {
    "6drepnet": "decomposed from the predicted matrix as 6DRepNet does (yaw in [-90, 90])",
    "bins": "the Euler triple of the predicted matrix inside HopeNet's bin range [-99, 99), as "
            "a binned head outputs it",
}
#: the bin range a binned head's angles lie in (docs/conventions.md section 5)
_BIN_RANGE = (HOPENET_BINS.start, HOPENET_BINS.stop)


@dataclass(frozen=True)
class SampleErrors:
    """Per-sample errors of one model on one protocol view, sorted by ``index``.

    All arrays are float64 numpy with ``N`` rows, degrees.

    Attributes:
        index: ``(N,)`` int64 sample ids (unique).
        geodesic: ``(N,)`` geodesic error.
        axis: ``(N, 3)`` angle error of the head's right, up and nose axes (rows of ``R``).
        maev: ``(N,)`` mean of ``axis`` over the three axes.
        euler_true: ``(N, 3)`` true Euler angles ``(pitch, yaw, roll)``.
        euler_pred: ``(N, 3)`` predicted Euler angles ``(pitch, yaw, roll)``.
        euler_err: ``(N, 3)`` absolute Euler errors ``(pitch, yaw, roll)``, wrapped by 360 only.
        euler_dataset: ``(N, 3)`` the dataset's own ``(pitch, yaw, roll)`` triple where the
            source has one and the image is as stored; NaN otherwise.
        missed: ``(N,)`` bool, the predictor returned no rotation (a non-finite one, e.g. the
            landmark baseline found no face): scored as the constant upright, frontal answer.
    """

    index: np.ndarray
    geodesic: np.ndarray
    axis: np.ndarray
    maev: np.ndarray
    euler_true: np.ndarray
    euler_pred: np.ndarray
    euler_err: np.ndarray
    euler_dataset: np.ndarray
    missed: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def select(self, mask: np.ndarray) -> SampleErrors:
        """The samples where ``mask`` (``(N,)`` bool) is true."""
        return SampleErrors(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))


def _euler_array(R: Tensor) -> Tensor:
    """``(..., 3)`` Euler angles of ``R`` in the order of :data:`EULER_AXES` (pitch, yaw, roll)."""
    return torch.stack(tuple(euler_from_rotation(R)), dim=-1)


def compute_errors(
    index: Tensor | np.ndarray,
    R_pred: Tensor,
    R_true: Tensor,
    euler_dataset: np.ndarray | None = None,
) -> SampleErrors:
    """Per-sample errors of predictions against labels, sorted by ``index``.

    Args:
        index: ``(N,)`` unique integer sample ids.
        R_pred, R_true: ``(N, 3, 3)`` rotation matrices (any float dtype; computed in float64).
        euler_dataset: optional ``(N, 3)`` dataset's own ``(pitch, yaw, roll)`` triple (degrees)
            of the same samples, in the order of ``index``: the ground truth of the
            published-comparable Euler MAE. None: unknown (NaN).

    Raises:
        ValueError: mismatched shapes or duplicate indices (a padded batch that was not
            de-duplicated would otherwise be counted twice).
    """
    idx = torch.as_tensor(np.asarray(index), dtype=torch.int64).reshape(-1)
    if R_pred.shape != R_true.shape or R_pred.shape[-2:] != (3, 3) or R_pred.ndim != 3:
        raise ValueError(
            f"compute_errors: expected two (N, 3, 3) tensors, got {tuple(R_pred.shape)} and "
            f"{tuple(R_true.shape)}"
        )
    if idx.shape[0] != R_pred.shape[0]:
        raise ValueError(f"compute_errors: {idx.shape[0]} indices for {R_pred.shape[0]} samples")
    order = torch.argsort(idx)
    idx = idx[order]
    if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
        raise ValueError("compute_errors: duplicate sample indices")
    Rp = R_pred.detach().to("cpu", torch.float64)[order]
    Rt = R_true.detach().to("cpu", torch.float64)[order]
    # No prediction (non-finite): scored as the constant upright, frontal answer and counted.
    missed = ~torch.isfinite(Rp).all(dim=-1).all(dim=-1)
    if missed.any():
        Rp = torch.where(missed[:, None, None], torch.eye(3, dtype=Rp.dtype), Rp)
    ax = axis_errors(Rp, Rt)
    et, ep = _euler_array(Rt), _euler_array(Rp)
    if euler_dataset is None:
        ed = np.full((idx.shape[0], 3), np.nan)
    else:
        ed = np.asarray(euler_dataset, dtype=np.float64)
        if ed.shape != (idx.shape[0], 3):
            raise ValueError(f"compute_errors: euler_dataset must be ({idx.shape[0]}, 3), got "
                             f"{ed.shape}")
        ed = ed[order.numpy()]
    return SampleErrors(
        index=idx.numpy(),
        geodesic=geodesic_error(Rp, Rt).numpy(),
        axis=ax.numpy(),
        maev=maev(Rp, Rt).numpy(),
        euler_true=et.numpy(),
        euler_pred=ep.numpy(),
        euler_err=euler_abs_error(ep, et).numpy(),
        euler_dataset=ed,
        missed=missed.numpy(),
    )


def merge(parts: Sequence[SampleErrors], offsets: Sequence[int] | None = None) -> SampleErrors:
    """Concatenate several views' errors into one set (pooled protocol summaries).

    ``offsets`` (one per part) are added to the indices so that the pooled indices stay unique
    (e.g. ``view_number * N``); the result is sorted by the new index.
    """
    if not parts:
        raise ValueError("merge: nothing to merge")
    offs = list(offsets) if offsets is not None else [0] * len(parts)
    fields = list(SampleErrors.__dataclass_fields__)
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
    cat["index"] = np.concatenate([p.index + o for p, o in zip(parts, offs, strict=True)])
    order = np.argsort(cat["index"], kind="stable")
    if len(order) > 1 and (np.diff(cat["index"][order]) == 0).any():
        raise ValueError("merge: pooled indices are not unique; give distinct offsets")
    return SampleErrors(**{f: v[order] for f, v in cat.items()})


def _mean(x: np.ndarray) -> float:
    """Exactly rounded mean: the same bits in any order (``numpy.mean`` is order-dependent)."""
    return math.fsum(x.tolist()) / x.size


def peers_euler(euler_pred: np.ndarray, decoding: str = "6drepnet") -> np.ndarray:
    """The predicted ``(pitch, yaw, roll)`` as the peers decode them (module docstring).

    Args:
        euler_pred: ``(N, 3)`` ``(pitch, yaw, roll)`` from
            :func:`clerf.geometry.euler_from_rotation`.
        decoding: a key of :data:`PEERS_DECODINGS`.
    """
    if decoding not in PEERS_DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r} (known: {', '.join(PEERS_DECODINGS)})")
    pred = np.asarray(euler_pred, dtype=np.float64)
    if decoding == "6drepnet":
        return pred
    t = torch.from_numpy(pred)
    other = euler_other_branch(EulerAngles(*t.unbind(-1)))
    alt = torch.stack(tuple(other), dim=-1).numpy()
    lo, hi = _BIN_RANGE

    def inside(x: np.ndarray) -> np.ndarray:
        return ((x >= lo) & (x < hi)).all(axis=1)

    use = inside(alt) & ~inside(pred)
    return np.where(use[:, None], alt, pred)


def euler_mae(err: np.ndarray) -> dict[str, float]:
    """Per-axis Euler MAE and their mean (degrees) from absolute errors ``(N, 3)`` ordered
    (pitch, yaw, roll) like every Euler array (:func:`clerf.geometry.euler_abs_error`: wrapped
    by 360 only).

    Exactly rounded sums: the same bits in any sample order or batching.
    """
    mae = {axis: _mean(err[:, EULER_AXES.index(axis)]) for axis in ("yaw", "pitch", "roll")}
    mae["mean"] = (mae["yaw"] + mae["pitch"] + mae["roll"]) / 3.0
    return mae


def comparable_euler_mae(
    euler_pred: np.ndarray, euler_dataset: np.ndarray, decoding: str = "6drepnet"
) -> dict[str, Any]:
    """The published-comparable Euler MAE (module docstring): per-axis mean of
    ``|wrap360(pred - dataset triple)|`` over every sample, their mean, ``n``, ``definition``
    and ``decoding``.

    Args:
        euler_pred: ``(N, 3)`` predicted ``(pitch, yaw, roll)`` decomposed from the matrices.
        euler_dataset: ``(N, 3)`` the dataset's own ``(pitch, yaw, roll)`` (finite).
        decoding: how the peers get the prediction's angles (:data:`PEERS_DECODINGS`).
    """
    pred = np.asarray(euler_pred, dtype=np.float64)
    true = np.asarray(euler_dataset, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != 3 or pred.shape[0] == 0:
        raise ValueError(f"comparable_euler_mae: expected two (N, 3) arrays, got {pred.shape} "
                         f"and {true.shape}")
    if not np.isfinite(true).all():
        raise ValueError("comparable_euler_mae: the dataset triple is unknown for some samples")
    pred = peers_euler(pred, decoding)
    mae: dict[str, Any] = euler_mae(
        euler_abs_error(torch.from_numpy(pred), torch.from_numpy(true)).numpy())
    mae["n"] = int(pred.shape[0])
    mae["definition"] = COMPARABLE_DEFINITION
    mae["decoding"] = f"{decoding}: {PEERS_DECODINGS[decoding]}"
    return mae


def euler_in_range(
    errors: SampleErrors, euler_range: float = EULER_RANGE_DEG, max_yaw: float = 90.0
) -> np.ndarray:
    """Boolean ``(N,)``: samples whose true Euler angles are meaningful (module docstring)."""
    pitch, yaw, roll = errors.euler_true.T
    return (np.abs(pitch) <= euler_range) & (np.abs(roll) <= euler_range) & (np.abs(yaw) <= max_yaw)


def summarize(
    errors: SampleErrors,
    euler: bool = True,
    euler_range: float = EULER_RANGE_DEG,
    max_yaw: float = 90.0,
    thresholds: Sequence[float] = THRESHOLDS_DEG,
    decoding: str = "6drepnet",
) -> dict[str, Any]:
    """Report figures of one set of per-sample errors (degrees; shares in [0, 1]).

    Args:
        errors: from :func:`compute_errors` (or :func:`merge`).
        euler: report Euler MAE at all (``False`` for full-range protocols).
        euler_range, max_yaw: the Euler-meaningful box (module docstring).
        thresholds: geodesic thresholds for the ``under`` shares.
        decoding: how the comparable figure reads the prediction's angles (:func:`peers_euler`).

    Returns:
        ``{"n", "geodesic": {"mean", "median", "p90"}, "maev", "under": {"5": share, ...},
        "missed" (only when the predictor returned nothing for some samples: their count,
        share and the mean geodesic error of the others),
        "euler": {"yaw", "pitch", "roll", "mean", "n", "note", "definition"} or {"n": 0, "note",
        "definition"}}``, plus ``"euler_comparable": {"yaw", "pitch", "roll", "mean", "n",
        "definition"}`` when every sample carries the dataset's own triple.
    """
    n = len(errors)
    if n == 0:
        raise ValueError("summarize: no samples")
    g = errors.geodesic
    out: dict[str, Any] = {
        "n": n,
        "geodesic": {
            "mean": _mean(g),
            "median": float(np.median(g)),
            "p90": float(np.percentile(g, 90.0)),
        },
        "maev": _mean(errors.maev),
        "under": {f"{t:g}": int(np.count_nonzero(g < t)) / n for t in thresholds},
    }
    m = int(np.count_nonzero(errors.missed))
    if m:  # a predictor that can return nothing (the landmark baseline): say how often
        found = g[~errors.missed]
        out["missed"] = {"n": m, "share": m / n,
                         "scored_as": "the constant upright, frontal answer (identity)",
                         "geodesic_mean_found": _mean(found) if found.size else None}
    if not euler:
        out["euler"] = {"n": 0, "note": "not reported: Euler angles are ill-defined over this "
                        "range (full rotation group); see geodesic error and MAEV"}
        return out
    keep = euler_in_range(errors, euler_range, max_yaw)
    k = int(keep.sum())
    box = f"|pitch|, |roll| <= {euler_range:g} deg" + (
        f", |yaw| <= {max_yaw:g} deg" if max_yaw < 90.0 else ""
    )
    if k == 0:
        out["euler"] = {"n": 0, "note": f"not reported: no sample has true {box}",
                        "definition": EULER_DEFINITION}
    else:
        mae = euler_mae(errors.euler_err[keep])
        note = "all samples" if k == n else f"over the {k} of {n} samples with true {box}"
        out["euler"] = {**mae, "n": k, "note": note, "definition": EULER_DEFINITION}
    if np.isfinite(errors.euler_dataset).all():
        out["euler_comparable"] = comparable_euler_mae(errors.euler_pred, errors.euler_dataset,
                                                       decoding)
    return out


def binned_error(
    x: np.ndarray, err: np.ndarray, edges: np.ndarray, stat: str = "median"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error statistic per bin of ``x`` (for "error vs yaw" figures).

    Returns ``(centres, values, counts)``; empty bins give NaN. ``stat``: ``median`` or ``mean``.
    """
    if stat not in ("median", "mean"):
        raise ValueError(f"binned_error: stat must be 'median' or 'mean', got {stat!r}")
    which = np.digitize(x, edges) - 1
    centres = 0.5 * (edges[:-1] + edges[1:])
    values = np.full(len(centres), np.nan)
    counts = np.zeros(len(centres), dtype=np.int64)
    fn = np.median if stat == "median" else np.mean
    for b in range(len(centres)):
        sel = err[which == b]
        counts[b] = sel.size
        if sel.size:
            values[b] = fn(sel)
    return centres, values, counts


def cumulative_curve(err: np.ndarray, max_deg: float = 180.0, steps: int = 361) -> tuple[
    np.ndarray, np.ndarray
]:
    """Share of samples with error <= t for ``t`` in ``linspace(0, max_deg, steps)``."""
    t = np.linspace(0.0, max_deg, steps)
    s = np.sort(err)
    return t, np.searchsorted(s, t, side="right") / max(len(s), 1)
