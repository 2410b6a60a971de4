"""``clerf real-anchor REAL_STORE --out PATH``: real-anchor triplets over a prepared store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from clerf.commands._args import add_output_args, check_resume_overwrite


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "real-anchor",
        parents=parents,
        help="triplets with real anchors (a prepared store) and rendered positives/negatives",
        description=(
            "For every image of a labelled store made by `clerf prepare`, render a positive at "
            "its exact rotation and a negative at least triplets.delta deg away with the "
            "configured generator. The real images are referenced through HDF5 virtual "
            "datasets, not copied (docs/data.md)."
        ),
    )
    p.add_argument("real_store", metavar="REAL_STORE", help="labelled store (clerf prepare)")
    p.add_argument("--out", required=True, metavar="PATH", help="the triplet store to write")
    p.add_argument("--config", metavar="YAML", default=None, help="experiment config (optional)")
    add_output_args(p, "generator.name=procedural triplets.delta=30",
                    resume_help="continue partial renders",
                    overwrite_help="replace existing outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.config import load_config
    from triplets.real_anchor import run_real_anchor

    check_resume_overwrite(args)
    cfg = load_config(args.config, args.overrides)
    bar = None

    def progress(n: int) -> None:
        # The bar appears with the first rendered chunk, after every input has been checked.
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(unit="triplet", desc="real-anchor", file=sys.stderr)
        bar.update(n)

    try:
        res = run_real_anchor(
            cfg, args.real_store, args.out, resume=args.resume, overwrite=args.overwrite,
            progress=None if args.no_progress else progress,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {res.num_triplets} real-anchor triplets to {res.path} (renders in "
          f"{res.rendered}; {res.unreachable} real images unreachable by the generator)")
    return 0
