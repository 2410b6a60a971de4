"""``clerf generate CONFIG --out PATH [key=value ...]``: render a triplet store."""

from __future__ import annotations

import argparse
from typing import Any

from clerf.commands._args import add_output_args, check_resume_overwrite


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=parents,
        help="render anchor/positive/negative triplets into an HDF5 store",
        description=(
            "Sample poses and triplets (triplets section of the config), render them with the "
            "configured generator and write a self-describing, resumable HDF5 store "
            "(triplets/SCHEMA.md). Under `accelerate launch` each process writes a shard and the "
            "main process writes one entry file."
        ),
    )
    p.add_argument(
        "config", metavar="CONFIG", help="experiment YAML (e.g. configs/generate_small.yaml)"
    )
    p.add_argument("--out", required=True, metavar="PATH", help="the .h5 store to write")
    add_output_args(p, "triplets.count=100 triplets.delta=45 store.compression=lzf")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.config import load_config
    from triplets.generate import run_generate
    from triplets.store import open_store

    check_resume_overwrite(args)
    cfg = load_config(args.config, args.overrides)
    out = run_generate(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress)
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:  # main process under accelerate/torchrun
        store = open_store(out)
        print(f"wrote {out}: {store.num_triplets} triplets, {store.num_images} images of "
              f"{store.resolution} px, {store.attrs.get('num_shards', 1)} shard(s)")
    return 0
