"""``clerf pipeline CONFIG --out DIR [key=value ...]``: every stage in one output directory."""

from __future__ import annotations

import argparse
from typing import Any

from clerf.commands._args import intermixed


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "pipeline",
        parents=parents,
        help="generate -> pretrain -> finetune -> evaluate, skipping completed stages",
        description=(
            "Run the stages listed in pipeline.stages in order into one output directory "
            "(stores, checkpoints, resolved configs, logs, reports, figures). A stage whose output "
            "is complete is skipped and a partial one resumed, so rerunning the same command "
            "continues where it stopped. Prints the results table at the end."
        ),
    )
    p.add_argument("config", help="experiment YAML (e.g. configs/quickstart.yaml)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. finetune.train.epochs=2")  # fmt: skip
    intermixed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from clerf.config import load_config
    from clerf.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    main = PartialState().is_main_process

    def log(msg: str) -> None:
        if main:
            print(msg, flush=True)

    result = run_pipeline(cfg, args.out, progress=not args.no_progress, log=log)
    if main:
        t = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
        print(f"pipeline: done in {args.out} ({t or 'nothing to do'})")
    return 0
