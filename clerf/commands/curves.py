"""``clerf curves RUN... [--out PNG]``: learning curves of training runs as a table and a figure."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "curves",
        parents=parents,
        help="learning curves of pretrain/finetune runs: a Markdown table and a PNG",
        description=(
            "Read RUN/metrics.jsonl of each training run and print, per run, the held-out "
            "metric at every evaluation, the final mean / median / fraction under 15 deg, the "
            "images seen and the training time; with --out also plot the metric against the "
            "images seen."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="pretrain or finetune output directories")
    p.add_argument("--metric", default="val/geodesic_deg",
                   help="logged evaluation key (default val/geodesic_deg; pretraining: "
                        "val/nn_geodesic_deg)")  # fmt: skip
    p.add_argument("--chance", type=float, default=None, help="draw a chance level (deg)")
    p.add_argument("--out", metavar="PNG", default=None, help="write the figure here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.evaluation.curves import curves_table, plot_curves, read_curve

    curves = [read_curve(r, args.metric) for r in args.runs]
    print(curves_table(curves, args.metric))
    if args.out:
        print(f"curves: figure in {plot_curves(curves, args.out, args.metric, args.chance)}")
    return 0
