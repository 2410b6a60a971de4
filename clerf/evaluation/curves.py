"""Learning curves of training runs: the held-out figures each evaluation logged, as a table and
a figure (``clerf curves RUN... --out curves.png``).

A run directory is what ``clerf pretrain`` / ``clerf finetune`` write: ``metrics.jsonl`` (one JSON
object per log line; evaluation lines carry ``val/...`` keys) and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clerf.errors import DataError

__all__ = ["read_curve", "curves_table", "plot_curves"]


def read_curve(run: str | Path, metric: str = "val/geodesic_deg") -> dict[str, Any]:
    """``{"run", "points": [(images_seen, {val metrics})...], "summary"}`` of one run directory.

    The images seen at an evaluation are its step times the images per step of the training log.

    Raises:
        DataError: no ``metrics.jsonl``, a line that is not JSON, or no evaluation with ``metric``.
    """
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run}: no metrics.jsonl (not a clerf pretrain/finetune output)")
    points, per_step = [], 0.0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}: line {i} is not JSON ({exc})") from None
        if "images" in rec and rec.get("step"):
            per_step = float(rec["images"]) / float(rec["step"])
        if metric in rec:
            vals = {k: v for k, v in rec.items() if k.startswith("val/")}
            points.append((int(round(per_step * int(rec.get("step", 0)))), vals))
    if not points:
        raise DataError(f"{path}: no evaluation logged '{metric}'")
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"run": str(run), "points": points, "summary": summary}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.1f}"


def curves_table(curves: list[dict[str, Any]], metric: str = "val/geodesic_deg") -> str:
    """A Markdown table: per run the curve of ``metric`` (one value per evaluation) and the final
    evaluation's mean, median and fraction under 15 deg, images seen and training seconds."""
    rows = ["| run | curve (" + metric + " per evaluation) | final mean | median | < 15 deg "
            "| images | seconds |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in curves:
        pts = c["points"]
        last = pts[-1][1]
        s = c["summary"]
        curve = " / ".join(_fmt(p[1].get(metric)) for p in pts)
        rows.append(
            f"| {Path(c['run']).name} | {curve} | {_fmt(last.get(metric))} | "
            f"{_fmt(last.get('val/geodesic_median_deg'))} | "
            f"{_fmt(last.get('val/under_15deg'), pct=True)} | {pts[-1][0]} | "
            f"{s.get('seconds_this_run', '-')} |"
        )
    return "\n".join(rows)


def plot_curves(curves: list[dict[str, Any]], out: str | Path,
                metric: str = "val/geodesic_deg", chance: float | None = None) -> Path:  # fmt: skip
    """A PNG of ``metric`` against images seen, one line per run (written atomically, on a
    local Agg canvas: never ``matplotlib.use``)."""
    from clerf.evaluation.report import _canvas, _save

    fig, axes = _canvas(1, 1, (7, 4.2))
    ax = axes[0, 0]
    for c in curves:
        xs = [p[0] for p in c["points"]]
        ys = [p[1].get(metric) for p in c["points"]]
        ax.plot(xs, ys, marker="o", ms=3, label=Path(c["run"]).name)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.1f})")
    ax.set_xlabel("training images seen")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out)
    return out
