"""``clerf inspect PATH [--out DIR]``: validate a store, print counts and pose coverage."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect",
        parents=parents,
        help="validate a store; print counts and pose coverage; draw sample triplets",
        description=(
            "Validate an HDF5 store (schema, datasets, completion marker, shards), print counts, "
            "yaw/pitch/roll histograms and anchor-negative geodesic distances; with --out write "
            "a PNG grid of sample triplets (head axes drawn) and a PNG of pose coverage."
        ),
    )
    p.add_argument("path", metavar="PATH", help="the .h5 store")
    p.add_argument("--out", metavar="DIR", default=None, help="write triplets.png and coverage.png")
    p.add_argument("--samples", type=int, default=8, help="triplets in the grid (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which triplets are drawn (default 0)")
    p.add_argument(
        "--verify", action="store_true",
        help="re-hash every chunk against the digests recorded at write time (reads all data)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.errors import UsageError
    from triplets.inspect import format_report, inspect_store, write_figures

    if args.samples <= 0:
        raise UsageError(f"--samples must be positive, got {args.samples}")
    report = inspect_store(args.path, verify=args.verify)
    print(format_report(report))
    if args.out:
        for p in write_figures(args.path, args.out, samples=args.samples, seed=args.seed):
            print(f"wrote {p}")
    return 0
