"""HopeNet's low-resolution figure from ``clerf evaluate --protocol lowres`` reports.

Plots, per model of each report, the published-comparable Euler MAE (mean of yaw, pitch, roll)
against the down-sampling factor, and for predictors that can find no face (the landmark
baseline) the share they missed on a second axis (docs/real_faces.md section 4)::

    python studies/lowres_figure.py runs/landmarks/aflw2000_lowres/report.json \
        runs/landmarks/aflw2000_lowres_clerf/report.json \
        --out studies/results/real/lowres_aflw2000.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(report: dict) -> list[tuple[str, list[int], list[float], list[float]]]:
    """(model name, factors, Euler MAE, missed share) of each model of a lowres report."""
    out = []
    for m in report["models"]:
        views = m["results"]["lowres"]["views"]
        params = m["results"]["lowres"]["view_params"]
        names = sorted(views, key=lambda v: params[v]["factor"])
        f = [int(params[v]["factor"]) for v in names]
        mae = [views[v]["euler_comparable"]["mean"] for v in names]
        miss = [views[v].get("missed", {}).get("share", 0.0) for v in names]
        out.append((m["name"], f, mae, miss))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="report.json files of clerf evaluate --protocol "
                                               "lowres")  # fmt: skip
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--label", action="append", default=[],
                    help="NAME=LABEL: the legend's label for a model name (repeatable)")
    a = ap.parse_args()
    labels = dict(x.split("=", 1) for x in a.label)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax2 = None
    for path in a.reports:
        for name, f, mae, miss in series(json.loads(Path(path).read_text())):
            line, = ax.plot(f, mae, marker="o", label=labels.get(name, name))
            if any(miss):
                ax2 = ax2 or ax.twinx()
                ax2.plot(f, [100 * m for m in miss], ls="--", color=line.get_color(),
                         label=f"{labels.get(name, name)}: no face found (%)")  # fmt: skip
    ax.set_xlabel("down-sampling factor")
    ax.set_ylabel("Euler MAE, published-comparable (deg)")
    ax.set_title("AFLW2000 at low resolution")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    if ax2 is not None:
        ax2.set_ylabel("no face found (%)")
        ax2.legend(loc="center left", fontsize=7)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120, bbox_inches="tight")
    print(f"lowres_figure: wrote {a.out}")


if __name__ == "__main__":
    main()
