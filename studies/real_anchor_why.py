"""Why CLERF's pairing (f) does not help yet: one change at a time from (f) at 100 labels.

Every experiment pretrains from the same 100 labelled Pointing'04 images (the study's
``ra_n100`` real-anchor store, or one rebuilt with one setting changed), then fine-tunes (b) from
that encoder exactly as the study's (f)/100 cell (seed 0), and is judged on the **validation
people (11-12)**; AFLW2000 (standard view) is reported beside it, never used to choose. Before
fine-tuning, each encoder is probed on the validation people:

* across people (``clerf probe --across-identities``): does the encoder carry real-face pose?
* against a gallery of renders at the validation images' poses (``clerf probe --gallery``), in
  the backbone features and in the embedding the loss shapes: is a photograph next to the render
  at its pose, which is what the real-anchor pairing trains for?

    python studies/real_anchor_why.py                  # after make real-study (its stores, f_n100)
    python studies/real_anchor_why.py --report         # table only

Resumable: a finished experiment is kept in ``studies/results/real/why_f/<name>.json``;
``why_f.md`` there is the table. Commands and wall times go to ``OUT/commands.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_study import (  # noqa: E402  (a sibling script, not a package)
    ANCHOR_REPEATS,
    CONFIGS,
    RESULTS,
    Ctx,
    complete_store,
    done,
    run,
    summarise,
)

WHY = RESULTS / "why_f"
F_CFG = CONFIGS / "f_real_anchor.yaml"

#: name -> (what changes, real-anchor overrides or None for the study's ra_n100, pretrain overrides)
EXPERIMENTS: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "base": ("(f) as in the study: 300 steps, Circle Loss m 0.25 / gamma 64, default look",
             None, []),
    "long": ("4x longer pretraining: 1,200 steps (4 passes over the 6,000 triplets)", None,
             ["pretrain.train.epochs=4", "pretrain.train.max_steps=1200"]),
    "studio": ("positives and negatives rendered in the generator's 'studio' look",
               ["generator.params.style=studio"], []),
    "circle_pml": ("Circle Loss m 0.4 / gamma 80 (pytorch-metric-learning's defaults)", None,
                   ["pretrain.loss.m=0.4", "pretrain.loss.gamma=80.0"]),
    "triplet_pairs": ("the negative rule: only each triplet's own pairs (photo-render positive, "
                      "render negatives), no batch-wide pairs (photo-photo negatives)", None,
                      ["pretrain.loss.batch_pairs=false"]),
    "circle_g256": ("Circle Loss gamma 256 (the Circle Loss paper's face setting), m 0.25", None,
                    ["pretrain.loss.gamma=256.0"]),
}


def gallery(ctx: Ctx) -> Path:
    """Renders at every validation image's pose (and a negative each): the probe's gallery."""
    g = ctx.out / "why_f" / "gallery_val.h5"
    g.parent.mkdir(parents=True, exist_ok=True)
    if not complete_store(g):
        run(ctx, ["real-anchor", ctx.store("p04_val"), "--out", g, "--config", F_CFG,
                  "triplets.anchor_repeats=1", "seed=11", "--no-progress", "--overwrite"])
    return g.parent / f"{g.name}.rendered.h5"


def probes(ctx: Ctx, encoder: str, rendered: Path) -> dict:
    """The three probes of one encoder on the validation people."""
    out = {}
    for key, flags in (("across_people", ["--across-identities"]),
                       ("gallery_features", ["--gallery", str(rendered)]),
                       ("gallery_embedding", ["--gallery", str(rendered), "--embedding"])):
        text = run(ctx, ["probe", encoder, "--data", ctx.store("p04_val"), *flags])
        if ctx.dry:
            continue
        row = next(x for x in text.splitlines() if x.startswith(f"| {encoder} |"))
        k1, k5, lin = (float(v) for v in row.strip("|").split("|")[1:])
        out[key] = {"knn1_deg": k1, "knn5_deg": k5, "linear_probe_deg": lin}
    return out


def experiment(ctx: Ctx, name: str, rendered: Path) -> None:
    kept = WHY / f"{name}.json"
    if kept.exists() and not ctx.dry:  # a dry run prints the whole plan, kept results or not
        return
    what, ra_over, pre_over = EXPERIMENTS[name]
    base = ctx.out / "pretrain" / "f_n100"
    d = ctx.out / "why_f" / name
    if name == "base":
        enc = base
        if not ctx.dry and not done(enc / "summary.json"):
            raise SystemExit(f"real_anchor_why: {enc} is missing: run make real-study first")
    else:
        ra = ctx.out / "real_anchor" / "ra_n100.h5"
        if ra_over is not None:
            ra = d / "ra_n100.h5"
            d.mkdir(parents=True, exist_ok=True)
            if not complete_store(ra):
                run(ctx, ["real-anchor", ctx.train_store("100"), "--out", ra, "--config", F_CFG,
                          f"triplets.anchor_repeats={ANCHOR_REPEATS['100']}", *ra_over,
                          "--no-progress", "--overwrite"])
        enc = d / "pretrain"
        if not done(enc / "summary.json"):
            run(ctx, ["pretrain", F_CFG, "--out", enc, f"pretrain.train_store={ra}",
                      f"pretrain.val_store={ctx.store('p04_val')}",
                      "pretrain.train.progress=false", *pre_over])
    res: dict = {"name": name, "change": what, "real_anchor_overrides": ra_over or [],
                 "pretrain_overrides": pre_over, "encoder": str(enc)}
    res["probes_val"] = probes(ctx, str(enc), rendered)
    ft = d / "finetune"
    if not done(ft / "summary.json"):
        run(ctx, ["finetune", F_CFG, "--out", ft, "seed=0",
                  f"finetune.train_store={ctx.train_store('100')}",
                  f"finetune.val_store={ctx.store('p04_val')}", f"finetune.encoder={enc}",
                  "finetune.train.progress=false"])
    ev = ft / "eval_aflw2000"
    if not done(ev / "report.json"):
        run(ctx, ["evaluate", ft / "model", "--data", ctx.store("aflw2000"), "--protocol",
                  "standard", "--out", ev, "--no-figures"])
    if ctx.dry:
        return
    summary = json.loads((ft / "summary.json").read_text())
    res["val"] = {k.removeprefix("val/"): v for k, v in summary["evaluation"].items()}
    res["aflw2000"] = summarise(json.loads((ev / "report.json").read_text()))
    pre = enc / "summary.json"
    if pre.exists():
        res["pretrain_summary"] = json.loads(pre.read_text())
    res["pretrain_loss"] = loss_curve(enc / "metrics.jsonl")
    WHY.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(res, indent=1))


def loss_curve(path: Path) -> list[list[float]]:
    """(step, Circle Loss) of every logging window of a pretraining (its metrics.jsonl)."""
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [[r["step"], r["loss"]] for r in rows if "loss" in r and "step" in r]


def random_probes(ctx: Ctx, rendered: Path) -> None:
    kept = WHY / "random.json"
    if kept.exists() or ctx.dry:
        if ctx.dry:
            probes(ctx, "random:resnet18@64", rendered)
        return
    WHY.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"name": "random", "change": "a randomly initialised ResNet-18",
                                "probes_val": probes(ctx, "random:resnet18@64", rendered)},
                               indent=1))


def report() -> str:
    rows = ["| experiment | change | pretraining loss (first -> last window) | val people "
            "(fine-tuned) | AFLW2000 std | probe across "
            "people kNN-1 / linear | gallery kNN-1 (features / embedding) | gallery linear "
            "(features / embedding) |", "|---|---|---|---|---|---|---|---|"]
    for name in ["random", *EXPERIMENTS]:
        p = WHY / f"{name}.json"
        if not p.exists():
            continue
        r = json.loads(p.read_text())
        pr = r["probes_val"]
        val = f"{r['val']['geodesic_deg']:.1f}" if "val" in r else "-"
        afl = f"{r['aflw2000']['standard']['geodesic']:.1f}" if "aflw2000" in r else "-"
        curve = r.get("pretrain_loss") or []
        loss = f"{curve[0][1]:.1f} -> {curve[-1][1]:.1f}" if curve else "-"
        rows.append(
            f"| {name} | {r['change']} | {loss} | {val} | {afl} | "
            f"{pr['across_people']['knn1_deg']:.1f} / {pr['across_people']['linear_probe_deg']:.1f}"
            f" | {pr['gallery_features']['knn1_deg']:.1f} / "
            f"{pr['gallery_embedding']['knn1_deg']:.1f} | "
            f"{pr['gallery_features']['linear_probe_deg']:.1f} / "
            f"{pr['gallery_embedding']['linear_probe_deg']:.1f} |")
    md = ("Mean geodesic error (deg) on Pointing'04's validation people 11-12 (372 images): "
          "fine-tuned from each encoder on the 100-label budget (seed 0), and the probes of the "
          "encoder before fine-tuning. Gallery: renders at the validation images' poses (and one "
          "negative each), neighbours and the ridge probe from the renders.\n\n"
          + "\n".join(rows) + "\n")
    WHY.mkdir(parents=True, exist_ok=True)
    (WHY / "why_f.md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/real", help="the study's output (its stores, f_n100)")
    ap.add_argument("--only", default=",".join(EXPERIMENTS),
                    help=f"experiments to run, in order (default {','.join(EXPERIMENTS)})")
    ap.add_argument("--report", action="store_true", help="only write the table")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args()
    if a.report:
        print(report())
        return
    names = a.only.split(",")
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise SystemExit(f"real_anchor_why: unknown experiment {bad} (known {list(EXPERIMENTS)})")
    out = Path(a.out)
    (out / "why_f").mkdir(parents=True, exist_ok=True)
    clerf = str(Path(sys.executable).with_name("clerf"))
    ctx = Ctx(out, out / "stores", clerf if os.path.exists(clerf) else "clerf", a.dry_run, False)
    for s in ("p04_train_n100", "p04_val", "aflw2000"):
        if not a.dry_run and not complete_store(ctx.store(s)):
            raise SystemExit(f"real_anchor_why: {ctx.store(s)} is missing: run make real-study")
    t0 = time.time()
    rendered = gallery(ctx)
    random_probes(ctx, rendered)
    for n in names:
        experiment(ctx, n, rendered)
    print(f"real_anchor_why: done in {time.time() - t0:.0f} s this call")
    if not a.dry_run:
        print(report())


if __name__ == "__main__":
    main()
