"""``clerf prepare DATASET ROOT --out PATH``: a real dataset -> a labelled HDF5 store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from clerf.commands._args import add_output_args, check_resume_overwrite


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prepare",
        parents=parents,
        help="convert 300W-LP / AFLW2000 / BIWI / Pointing'04 into a labelled store "
             "(protocol crop + filter)",
        description=(
            "Scan a real dataset (no file lists), keep the samples whose three angles are within "
            "+-99 deg (counts logged and stored), crop with the protocol crop, resize, and write "
            "a labelled HDF5 store (triplets/SCHEMA.md). Resumable with --resume."
        ),
    )
    p.add_argument("dataset", metavar="DATASET", help="300wlp, aflw2000, biwi or pointing04")
    p.add_argument("root", metavar="ROOT", help="dataset directory (BIWI: the .npz file)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .h5 store to write")
    p.add_argument("--config", metavar="YAML", default=None, help="experiment config (optional)")
    p.add_argument("--resolution", type=int, default=None, help="stored image size (default 64)")
    p.add_argument(
        "--split", choices=("train", "test"), default=None,
        help="role of the data; picks the crop preset (default: 300wlp train, others test; "
             "Pointing'04 uses its box either way)",
    )
    p.add_argument(
        "--crop", default=None, metavar="PRESET",
        help="crop preset: hopenet_train, hopenet_test, hopenet_test_corrected, train_rule_k02, "
             "pointing04_box, none (default: the dataset's own for the split)",
    )
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default 0)")
    p.add_argument(
        "--skip-bad", action="store_true",
        help="skip bad files (missing .mat, unreadable image...) with a counted warning",
    )
    add_output_args(p, "prepare.max_abs_angle=null store.compression=lzf")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.config import load_config
    from clerf.data.prepare import describe, run_prepare

    check_resume_overwrite(args)
    # Flags are thin aliases of prepare.* keys, merged as values (paths may hold any character).
    flags: dict[str, Any] = {"prepare.dataset": args.dataset, "prepare.root": args.root}
    for name in ("resolution", "split", "crop", "workers"):
        if getattr(args, name) is not None:
            flags[f"prepare.{name}"] = getattr(args, name)
    if args.skip_bad:
        flags["prepare.skip_bad"] = True
    cfg = load_config(args.config, args.overrides, values=flags)

    bar = None

    def on_scanned(report, todo: int) -> None:
        nonlocal bar
        print(report.summary(), file=sys.stderr)
        if report.skipped_bad:  # said here too, whatever the logging configuration
            first = "; ".join(f"{f}: {r}" for f, r in report.bad[:3])
            more = f" (and {report.skipped_bad - 3} more)" if report.skipped_bad > 3 else ""
            print(f"warning: skipped {report.skipped_bad} bad file(s): {first}{more}",
                  file=sys.stderr)
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=todo, unit="img", desc="prepare", file=sys.stderr)

    try:
        result = run_prepare(
            cfg, args.out, resume=args.resume, overwrite=args.overwrite,
            progress=(lambda n: bar.update(n) if bar is not None else None),
            on_scanned=on_scanned,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    print(describe(result))
    return 0
