"""``clerf finetune CONFIG --out DIR [key=value ...]``: train a pose head on an encoder.

Also under several processes: ``accelerate launch -m clerf finetune CONFIG --out DIR``.
Re-running with the same ``--out`` resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse

from clerf.commands._args import intermixed


def register(subparsers, parents) -> None:
    p = subparsers.add_parser(
        "finetune",
        parents=parents,
        help="train pose heads (HopeNet bins, 6D, sphere grid) on a store or a generator stream "
             "-> HeadPoseModel",
        description=(
            "Fine-tune an encoder (finetune.encoder: a pretrain output, a fine-tune output, or "
            "fresh) with a pose head (head.type: binned, rotation6d, both or sphere) on a "
            "labelled store (finetune.train_store) or on images streamed from the generator "
            "(finetune.stream.enabled=true: every batch new identities and poses), with "
            "on-device augmentation whose labels are composed exactly. Writes OUT/model "
            "(HeadPoseModel.from_pretrained), checkpoints, metrics.jsonl, config.yaml and "
            "summary.json; re-running with the same --out resumes. Works under accelerate launch."
        ),
    )
    p.add_argument("config", help="experiment YAML (e.g. configs/finetune_small.yaml)")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds a run)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. finetune.train.lr=3e-4 head.type=both")  # fmt: skip
    intermixed(p)  # overrides may come before or after --out
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.config import load_config
    from clerf.finetune import run_finetune

    cfg = load_config(args.config, args.overrides)
    summary = run_finetune(cfg, args.out)
    from accelerate import PartialState

    if PartialState().is_main_process:
        ev = summary.get("evaluation") or {}
        err = ev.get("val/geodesic_deg")
        chance = ev.get("val/chance_geodesic_deg")
        extra = ""
        if err is not None:
            extra = f", held-out geodesic error {err:.1f} deg (chance {chance:.1f})"
        print(
            f"finetune: {summary['steps']} steps on {summary['world_size']} process(es), "
            f"{summary['img_per_s_this_run']:.0f} img/s{extra}; model in {args.out}/model"
        )
    return 0
