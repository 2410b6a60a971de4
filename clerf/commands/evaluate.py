"""``clerf evaluate MODEL... --data STORE --out DIR``: protocols, metrics, report and figures.

Also under several processes (identical report):
``accelerate launch -m clerf evaluate MODEL --data STORE --out DIR``.
"""

from __future__ import annotations

import argparse
from typing import Any


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'"
                                             ) from None
    return parse


def split_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """``MODEL`` arguments and bare ``key.sub=value`` overrides mixed among them."""
    import re
    from pathlib import Path

    is_override = re.compile(r"^[A-Za-z_][\w.]*=").match
    bare = [t for t in tokens if is_override(t) and not Path(t).exists()]
    return [t for t in tokens if t not in bare], bare


def register(subparsers, parents) -> None:
    p = subparsers.add_parser(
        "evaluate",
        parents=parents,
        help="evaluate pose models on protocols (standard, rotated, flipped, lowres, "
             "full_range)",
        description=(
            "Evaluate one or more saved HeadPoseModel directories (or landmark baselines of "
            "'clerf landmark-fit') on a labelled or triplet "
            "store. Protocols: standard (as stored), rotated (in-plane sweep, labels composed "
            "exactly), flipped (horizontal, vertical), lowres (each image down-sampled by "
            "1, 2, 3, 4 and 6 and up-sampled back: HopeNet's low-resolution experiment), "
            "full_range (uniform SO(3) rendered by the generator with a fixed seed). Writes "
            "OUT/report.json, OUT/report.md, per-sample CSVs and PNG figures. Results do not "
            "depend on --batch-size, the sample order or the number of accelerate processes."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="saved model directories (and KEY=VALUE config overrides, as --set)")
    p.add_argument("--data", help="labelled/triplet store (.h5) for standard/rotated/flipped")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--protocol", type=_csv(str), metavar="P1,P2",
                   help="comma-separated protocols (default: evaluate.protocols = standard)")
    p.add_argument("--batch-size", type=int, help="samples read per step (evaluate.batch_size)")
    p.add_argument("--angles", type=_csv(float), metavar="A1,A2",
                   help="in-plane angles of the rotated protocol, deg clockwise")
    p.add_argument("--full-range-n", type=int, help="samples of the full-range protocol")
    p.add_argument("--max-samples", type=int, help="only the first N stored samples")
    p.add_argument("--name", action="append", help="display name of each model (repeat)")
    p.add_argument("--config", help="experiment YAML whose 'evaluate' section is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set evaluate.full_range_seed=3 (repeatable)")
    p.add_argument("--consistency", nargs="+", metavar="IMAGE",
                   help="label-free consistency protocol on these photos or folders instead of "
                   "a store: predictions on turned (--angles, default every 15 deg) and mirrored "
                   "copies composed back and compared with the original's (geodesic "
                   "disagreement); writes OUT/consistency.{json,md,png}")
    p.add_argument("--crops", action="store_true",
                   help="--consistency: the images are face crops (no detector)")
    p.add_argument("--angle-step", type=float, default=15.0, metavar="DEG",
                   help="--consistency on photos: the face search step of clerf predict "
                   "(default 15; 0 = upright only)")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="--consistency on photos: clerf predict's --refine (default 0)")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from clerf.config import EvaluateConfig, load_config, section_config
    from clerf.evaluation.evaluate import run_evaluate

    if args.consistency:
        return run_consistency_command(args)
    if args.crops:
        from clerf.errors import UsageError

        raise UsageError("--crops only applies with --consistency")
    models, bare = split_overrides(args.models)
    # Flags are thin aliases of evaluate.* keys; --set KEY=VALUE and bare KEY=VALUE are the same.
    values: dict[str, Any] = {}
    for flag, key in (("protocol", "protocols"), ("batch_size", "batch_size"),
                      ("angles", "rotated_angles"), ("full_range_n", "full_range_n"),
                      ("max_samples", "max_samples")):  # fmt: skip
        if getattr(args, flag) is not None:
            values[f"evaluate.{key}"] = getattr(args, flag)
    if args.cpu:
        values["evaluate.cpu"] = True
    if args.no_figures:
        values["evaluate.figures"] = False
    cfg = load_config(args.config, [*args.overrides, *bare], values=values)
    opts = section_config(EvaluateConfig, cfg.evaluate, "evaluate")
    report = run_evaluate(models, args.out, data=args.data, opts=opts, names=args.name, cfg=cfg)
    if PartialState().is_main_process:
        for m in report["models"]:
            parts = []
            for proto, res in m["results"].items():
                s = res["pooled"]
                parts.append(f"{proto} {s['geodesic']['mean']:.2f} deg (MAEV {s['maev']:.2f})")
            print(f"evaluate: {m['name']}: mean geodesic error " + "; ".join(parts))
        print(f"evaluate: report in {args.out}/report.md")
    return 0


def run_consistency_command(args: argparse.Namespace) -> int:
    import torch

    from clerf.errors import UsageError
    from clerf.evaluation.consistency import DEFAULT_TURNS, run_consistency
    from clerf.inference.detect import HaarDetector
    from clerf.inference.search import build_search_detector, search_angles

    if args.data or args.protocol:
        raise UsageError("--consistency replaces --data/--protocol: give one or the other")
    if args.refine < 0:
        raise UsageError(f"--refine must be >= 0, got {args.refine}")
    if not args.crops:
        search_angles(args.angle_step)  # a bad step fails before any model is loaded
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    turns = args.angles if args.angles is not None else DEFAULT_TURNS
    run_consistency(args.models, args.consistency, args.out, names=args.name, turns=turns,
                    crops=args.crops, device=device, figures=not args.no_figures,
                    refine=args.refine,
                    detector_factory=lambda: build_search_detector(HaarDetector(),
                                                                   args.angle_step))
    print(f"evaluate: consistency report in {args.out}/consistency.md")
    return 0
