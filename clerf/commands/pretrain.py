"""``clerf pretrain CONFIG --out DIR [key=value ...]``: contrastive pretraining of the encoder.

Also under several processes: ``accelerate launch -m clerf pretrain CONFIG --out DIR``.
Re-running with the same ``--out`` resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse

from clerf.commands._args import intermixed


def register(subparsers, parents) -> None:
    p = subparsers.add_parser(
        "pretrain",
        parents=parents,
        help="contrastive pretraining of the pose encoder on a triplet store",
        description=(
            "Train the encoder with Circle Loss on a triplet store (pretrain.train_store) or on "
            "triplets streamed from the generator by the same rules (pretrain.stream.enabled="
            "true), with on-device augmentation whose labels are composed exactly. Writes "
            "OUT/encoder (load "
            "with clerf.load_encoder), checkpoints, metrics.jsonl, config.yaml and summary.json; "
            "re-running with the same --out resumes. Works under accelerate launch."
        ),
    )
    p.add_argument("config", help="experiment YAML (e.g. configs/pretrain_small.yaml)")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds a run)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. pretrain.train.lr=3e-4")  # fmt: skip
    intermixed(p)  # overrides may come before or after --out
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.config import load_config
    from clerf.pretrain import run_pretrain

    cfg = load_config(args.config, args.overrides)
    summary = run_pretrain(cfg, args.out)
    from accelerate import PartialState

    if PartialState().is_main_process:
        ev = summary.get("evaluation") or {}
        nn_err = ev.get("val/nn_geodesic_deg")
        extra = f", held-out NN pose error {nn_err:.1f} deg" if nn_err is not None else ""
        print(
            f"pretrain: {summary['steps']} steps on {summary['world_size']} process(es), "
            f"{summary['img_per_s_this_run']:.0f} img/s{extra}; encoder in {args.out}/encoder"
        )
    return 0
