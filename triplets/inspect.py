"""``clerf inspect``: validate a store, report counts and pose coverage, draw sample triplets.

:func:`inspect_store` computes a :class:`StoreReport` (Euler histograms of all images, and for
triplet stores the anchor-negative and anchor-positive geodesic distances and identity checks),
:func:`format_report` renders it as text, :func:`write_figures` writes ``triplets.png`` (a grid of
sample triplets with the head axes drawn) and ``coverage.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clerf.geometry import geodesic_distance, image_axes
from triplets.store import Store, open_store, verify_store

__all__ = ["StoreReport", "inspect_store", "format_report", "write_figures", "text_histogram"]

#: Euler histogram ranges (deg): yaw lies in [-90, 90] by the decomposition (docs/conventions.md 1)
_RANGES = {"yaw": (-90.0, 90.0, 15.0), "pitch": (-180.0, 180.0, 30.0),
           "roll": (-180.0, 180.0, 30.0)}
_EULER_COL = {"pitch": 0, "yaw": 1, "roll": 2}


@dataclass
class StoreReport:
    """What :func:`inspect_store` found. Angles in degrees."""

    path: str
    kind: str
    num_images: int
    num_triplets: int
    resolution: int
    attrs: dict[str, Any]
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: triplet stores: statistics of geodesic(anchor, negative) and (anchor, positive)
    negative_distance: dict[str, float] = field(default_factory=dict)
    positive_distance: dict[str, float] = field(default_factory=dict)
    delta: float | None = None
    below_delta: int = 0
    identity_checks: dict[str, float] = field(default_factory=dict)
    chunks_verified: int | None = None
    sampled: int = 0


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return {"min": float(q[0]), "p5": float(q[1]), "median": float(q[2]), "mean": float(x.mean()),
            "p95": float(q[3]), "max": float(q[4])}


def inspect_store(
    path: str | Path, verify: bool = False, max_images: int = 300_000
) -> StoreReport:
    """Validate ``path`` (:func:`triplets.store.open_store`) and summarise it.

    Statistics cover the first ``max_images`` images (whole triplets), read as one slice.
    """
    store = open_store(path)
    a = store.attrs
    report = StoreReport(str(store.path), store.kind, store.num_images, store.num_triplets,
                         store.resolution, a)
    if verify:
        report.chunks_verified = verify_store(store)
    n = min(store.num_images, max_images - max_images % 3)
    f = store.file
    euler = f["euler"][:n]
    report.sampled = n
    for name, (lo, hi, step) in _RANGES.items():
        edges = np.arange(lo, hi + step / 2, step)
        counts, _ = np.histogram(euler[:, _EULER_COL[name]], bins=edges)
        report.histograms[name] = (counts, edges)
    if store.kind == "triplets":
        t = n // 3
        table = f["triplets"][:t]
        rows = np.unique(table.reshape(-1))
        rot = store.read_rows("rotations", rows)
        ids = store.read_rows("identities", rows)
        pos = np.searchsorted(rows, table)
        R = torch.from_numpy(rot.astype(np.float64))
        ra, rp, rn = (R[pos[:, k]] for k in range(3))
        dn = geodesic_distance(ra, rn).numpy()
        dp = geodesic_distance(ra, rp).numpy()
        report.negative_distance = _stats(dn)
        report.positive_distance = _stats(dp)
        rule = a.get("triplet_rule")
        if rule:
            report.delta = float(json.loads(rule)["delta"])
            # float32 storage: allow a tiny tolerance below delta
            report.below_delta = int((dn < report.delta - 1e-3).sum())
        ia, ip, ineg = (ids[pos[:, k]] for k in range(3))
        report.identity_checks = {
            "positive_same_identity": float((ip == ia).mean()) if t else 0.0,
            "negative_same_identity": float((ineg == ia).mean()) if t else 0.0,
            "distinct_identities": float(len(np.unique(ids))),
        }
    else:
        ids = f["identities"][:n]
        report.identity_checks = {"distinct_identities": float(len(np.unique(ids)))}
    store.close()
    return report


def text_histogram(counts: np.ndarray, edges: np.ndarray, width: int = 40) -> list[str]:
    """One line per bin: ``[lo, hi)  count  ####``, bars scaled to the largest bin."""
    top = max(int(counts.max()), 1) if len(counts) else 1
    lines = []
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "#" * int(round(width * int(c) / top))
        lines.append(f"  [{lo:6.0f}, {hi:6.0f})  {int(c):9d}  {bar}".rstrip())
    return lines


def format_report(r: StoreReport) -> str:
    """Human-readable text of a :class:`StoreReport`."""
    a = r.attrs
    lines = [
        f"{r.path}: clerf store (schema {a.get('schema_version')}), kind {r.kind}, complete",
        f"  images {r.num_images}, triplets {r.num_triplets}, resolution {r.resolution} px, "
        f"chunk {a.get('chunk_images')} images, compression {a.get('compression')}, "
        f"shards {a.get('num_shards', 1)}",
        f"  clerf {a.get('clerf_version')}, conventions {a.get('conventions_version')}, "
        f"seed {a.get('seed')}, created {a.get('created', '?')}",
    ]
    for key in ("generator", "pose_sampler", "triplet_rule"):
        if key in a:
            lines.append(f"  {key}: {a[key]}")
    if r.chunks_verified is not None:
        lines.append(f"  verified: {r.chunks_verified} chunks match their recorded digests")
    part = "" if r.sampled == r.num_images else f" (first {r.sampled} images)"
    for name in ("yaw", "pitch", "roll"):
        counts, edges = r.histograms[name]
        lines.append(f"{name} histogram, deg{part}:")
        lines.extend(text_histogram(counts, edges))
    if r.kind == "triplets":
        def fmt(s: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.2f}" for k, v in s.items())

        lines.append(f"anchor-negative geodesic distance, deg: {fmt(r.negative_distance)}")
        if r.delta is not None:
            lines.append(f"  delta {r.delta:g} deg: {r.below_delta} triplet(s) below delta")
        lines.append(f"anchor-positive geodesic distance, deg: {fmt(r.positive_distance)}")
    lines.append("identities: " + ", ".join(
        f"{k} {v:g}" for k, v in r.identity_checks.items()))
    return "\n".join(lines)


def _draw_axes(ax: Any, R: np.ndarray, size: int) -> None:
    """Head axes as lines from the image centre (x red = right, y green = up, z blue = nose)."""
    axes2d = image_axes(torch.from_numpy(R.astype(np.float64))).numpy()  # (3, 2), y down
    c = (size - 1) / 2.0
    length = 0.45 * size
    for (dx, dy), color in zip(axes2d, ("red", "lime", "blue"), strict=True):
        ax.plot([c, c + length * dx], [c, c + length * dy], color=color, linewidth=1.5)


def write_figures(
    path: str | Path | Store, out_dir: str | Path, samples: int = 8, seed: int = 0
) -> list[Path]:
    """Write ``triplets.png`` (or ``samples.png`` for labelled stores) and ``coverage.png``.

    Returns the written paths. Uses matplotlib's object API (no global backend change).
    """
    from matplotlib.figure import Figure

    store = path if isinstance(path, Store) else open_store(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    r = store.resolution
    if store.kind == "triplets":
        k = min(samples, store.num_triplets)
        picks = np.sort(rng.choice(store.num_triplets, size=k, replace=False))
        table = store.triplet_table()[picks]
        fig = Figure(figsize=(3 * 2.2, k * 2.3))
        for i, row in enumerate(table):
            imgs = store.read_rows("images", row)
            rots = store.read_rows("rotations", row)
            eul = store.read_rows("euler", row)
            ids = store.read_rows("identities", row)
            for j, name in enumerate(("anchor", "positive", "negative")):
                ax = fig.add_subplot(k, 3, 3 * i + j + 1)
                ax.imshow(imgs[j].transpose(1, 2, 0), interpolation="nearest")
                _draw_axes(ax, rots[j], r)
                ax.set_title(f"{name} t={picks[i]} id={ids[j]}\np{eul[j, 0]:.0f} "
                             f"y{eul[j, 1]:.0f} r{eul[j, 2]:.0f}", fontsize=6)
                ax.set_axis_off()
        name = "triplets.png"
    else:
        k = min(samples * 3, store.num_images)
        picks = np.sort(rng.choice(store.num_images, size=k, replace=False))
        imgs = store.read_rows("images", picks)
        rots = store.read_rows("rotations", picks)
        eul = store.read_rows("euler", picks)
        cols = 6
        rows = -(-k // cols)
        fig = Figure(figsize=(cols * 2.0, rows * 2.2))
        for i in range(k):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(imgs[i].transpose(1, 2, 0), interpolation="nearest")
            _draw_axes(ax, rots[i], r)
            ax.set_title(f"#{picks[i]} p{eul[i, 0]:.0f} y{eul[i, 1]:.0f} r{eul[i, 2]:.0f}",
                         fontsize=6)
            ax.set_axis_off()
        name = "samples.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    written.append(out / name)

    report = inspect_store(store.path)
    fig = Figure(figsize=(10, 7))
    for i, axis in enumerate(("yaw", "pitch", "roll")):
        ax = fig.add_subplot(2, 2, i + 1)
        counts, edges = report.histograms[axis]
        ax.stairs(counts, edges, fill=True)
        ax.set_xlabel(f"{axis} (deg)")
        ax.set_ylabel("images")
    ax = fig.add_subplot(2, 2, 4)
    n = report.sampled
    if store.kind == "triplets":
        table = store.file["triplets"][: n // 3]
        rot = torch.from_numpy(store.file["rotations"][:n].astype(np.float64))
        dn = geodesic_distance(rot[table[:, 0]], rot[table[:, 2]]).numpy()
        ax.hist(dn, bins=36, range=(0, 180))
        if report.delta is not None:
            ax.axvline(report.delta, color="red", linestyle="--", label=f"delta {report.delta:g}")
            ax.legend()
        ax.set_xlabel("anchor-negative geodesic distance (deg)")
        ax.set_ylabel("triplets")
    else:
        euler = store.file["euler"][:n]
        ax.scatter(euler[:, 1], euler[:, 0], s=2, alpha=0.4)
        ax.set_xlabel("yaw (deg)")
        ax.set_ylabel("pitch (deg)")
    fig.suptitle(f"{store.path.name}: pose coverage ({n} images)")
    fig.tight_layout()
    fig.savefig(out / "coverage.png", dpi=110)
    written.append(out / "coverage.png")
    store.close()
    return written
