"""CLERF's claims on real faces: variants x label budgets x seeds, resumable (docs/real_faces.md).

Every step is a ``clerf`` command run in a subprocess and logged (with its wall time) to
``OUT/commands.log``; a step whose result exists is skipped, so the study continues where it
stopped (a cut fine-tune or pretraining resumes from its checkpoint). Finished cells are kept
in ``studies/results/real/`` (committed): a fresh machine skips them, redoing only the stores
and the pretrainings that pending cells start from. Order: the stores, then
the pretrainings of (c), (d) and (f) per budget with their probes, then the cells seed-major
(every variant and budget at seed 0 before seed 1), so a partial study is a complete table at
fewer seeds. ``--report`` (also run at the end) writes ``table.md``, ``results.json`` and
``budget_curve.png`` to ``studies/results/real/`` from whatever cells are complete.

    python studies/real_study.py --pointing04 PRIMA_ROOT --aflw2000 AFLW_ROOT     # make real-study
    python studies/real_study.py --report                                        # table only

PRIMA_ROOT holds the ``PersonNN`` folders of Pointing'04; AFLW_ROOT the AFLW2000-3D images
with their ``.mat`` files. The datasets are never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path("configs/real")
#: every finished cell's figures, the probes, (e)'s choice, the table and the figure, kept in
#: the repository: a later session (a fresh machine) continues the study from them
RESULTS = REPO / "studies" / "results" / "real"
VARIANTS = {
    "a": ("HopeNet (binned heads, flips only), no pretraining", "a_hopenet.yaml"),
    "b": ("sphere head + geometric augmentation, no pretraining", "b_sphere_geometric.yaml"),
    "c": ("(b) after contrastive pretraining on generated triplets", "c_clerf_generated.yaml"),
    "d": ("(b) after supervised pretraining on generated images", "d_supervised.yaml"),
    "e": ("(b) on real + generated images in every batch, no pretraining", "e_mix.yaml"),
    "f": ("(b) after contrastive pretraining on real-anchor triplets (CLERF's pairing)",
          "f_real_anchor.yaml"),
}
BUDGETS = ("100", "300", "all")
#: real-anchor triplets per real image: at least the 6,000 triplets the pretraining reads
ANCHOR_REPEATS = {"100": 60, "300": 20, "all": 4}
#: probe data and flags: Pointing'04 across people (each person has near-duplicate images of
#: a pose, one per series); AFLW2000 names no identities
PROBE_DATA = {"p04_test": ["--across-identities"], "aflw2000": []}


@dataclass
class Ctx:
    out: Path
    stores: Path
    clerf: str
    dry: bool
    smoke: bool
    results: Path = RESULTS

    def store(self, name: str) -> Path:
        return self.stores / f"{name}_64.h5"

    def train_store(self, budget: str) -> Path:
        return self.store("p04_train" if budget == "all" else f"p04_train_n{budget}")


def run(ctx: Ctx, args: list[str], log_to: Path | None = None) -> str:
    """Run ``clerf ARGS`` in the repository root; log the command and its wall time."""
    cmd = [ctx.clerf, *map(str, args)]
    line = shlex.join(["clerf", *map(str, args)])
    print(f"+ {line}", flush=True)
    if ctx.dry:
        return ""
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.time() - t0
    with open(ctx.out / "commands.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {dt:7.1f} s  rc={p.returncode}  {line}\n")
    if log_to is not None:
        log_to.parent.mkdir(parents=True, exist_ok=True)
        log_to.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
        raise SystemExit(f"real_study: step failed (exit {p.returncode}): {line}")
    return p.stdout


def smoke_overrides(ctx: Ctx, kind: str) -> list[str]:
    """Tiny steps for a check of the whole chain (--smoke): not a result."""
    if not ctx.smoke:
        return []
    if kind == "pretrain":
        return ["pretrain.train.max_steps=3", "pretrain.train.checkpoint_every=0"]
    return ["finetune.train.max_steps=3", "finetune.train.checkpoint_every=0",
            "finetune.stream.val_size=16"]


def done(path: Path) -> bool:
    return path.exists()


def complete_store(path: Path) -> bool:
    if not path.exists():
        return False
    from triplets.store import store_state

    return store_state(path) == "complete"


def prepare_stores(ctx: Ctx, p04_root: str | None, aflw_root: str | None) -> None:
    ctx.stores.mkdir(parents=True, exist_ok=True)
    jobs = [("p04_train", "train", ["prepare.subsets=[train]"]),
            ("p04_train_n100", "train", ["prepare.subsets=[train]", "prepare.max_images=100"]),
            ("p04_train_n300", "train", ["prepare.subsets=[train]", "prepare.max_images=300"]),
            ("p04_val", "test", ["prepare.subsets=[val]"]),
            ("p04_test", "test", ["prepare.subsets=[test]"])]
    for name, split, extra in jobs:
        if not complete_store(ctx.store(name)):
            if not p04_root:
                raise SystemExit(f"real_study: {ctx.store(name)} is missing: give --pointing04")
            run(ctx, ["prepare", "pointing04", p04_root, "--out", ctx.store(name), "--split",
                      split, *extra, "--no-progress", "--overwrite"])
    if not complete_store(ctx.store("aflw2000")):
        if not aflw_root:
            raise SystemExit(f"real_study: {ctx.store('aflw2000')} is missing: give --aflw2000")
        run(ctx, ["prepare", "aflw2000", aflw_root, "--out", ctx.store("aflw2000"),
                  "--no-progress", "--overwrite"])


def pretrain_dir(ctx: Ctx, variant: str, budget: str) -> Path | None:
    if variant == "c":
        return ctx.out / "pretrain" / "c"
    if variant == "d":
        return ctx.out / "pretrain" / "d"
    if variant == "f":
        return ctx.out / "pretrain" / f"f_n{budget}"
    return None


def pretrain(ctx: Ctx, variant: str, budget: str) -> None:
    d = pretrain_dir(ctx, variant, budget)
    if d is None or done(d / "summary.json"):
        return
    if variant == "c":
        run(ctx, ["pretrain", CONFIGS / "c_pretrain.yaml", "--out", d,
                  f"pretrain.val_store={ctx.store('p04_val')}", "pretrain.train.progress=false",
                  *smoke_overrides(ctx, "pretrain")])
    elif variant == "d":
        run(ctx, ["finetune", CONFIGS / "d_pretrain.yaml", "--out", d,
                  "finetune.train.progress=false", *smoke_overrides(ctx, "finetune")])
    else:
        ra = ctx.out / "real_anchor" / f"ra_n{budget}.h5"
        ra.parent.mkdir(parents=True, exist_ok=True)
        if not complete_store(ra):
            run(ctx, ["real-anchor", ctx.train_store(budget), "--out", ra, "--config",
                      CONFIGS / "f_real_anchor.yaml",
                      f"triplets.anchor_repeats={2 if ctx.smoke else ANCHOR_REPEATS[budget]}",
                      "--no-progress", "--overwrite"])
        run(ctx, ["pretrain", CONFIGS / "f_real_anchor.yaml", "--out", d,
                  f"pretrain.train_store={ra}", f"pretrain.val_store={ctx.store('p04_val')}",
                  "pretrain.train.progress=false", *smoke_overrides(ctx, "pretrain")])


_PROBE_LINE = re.compile(r"^\s*(\S+)\s+.*?([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$")


def probe(ctx: Ctx) -> None:
    """kNN retrieval and the linear probe of every pretrained encoder (and a random one) on the
    held-out real people and on AFLW2000, before fine-tuning."""
    encs = [("random", "random:resnet18@64")]
    for v, b in (("c", "all"), ("d", "all"), ("f", "100"), ("f", "300"), ("f", "all")):
        d = pretrain_dir(ctx, v, b)
        if done(d / "summary.json"):
            encs.append((f"{v}" if v != "f" else f"f_n{b}", str(d)))
    for data, flags in PROBE_DATA.items():
        out = ctx.results / "probes" / f"{data}.txt"
        key = " ".join([*(e for _, e in encs), *flags])
        if out.exists():
            kept = out.read_text().split("\n", 1)[0].removeprefix("# ").split()
            # a kept probe of these encoders (or of more: a fresh machine, or --variants
            # without the pretrained ones, must not replace it with fewer rows)
            if set(key.split()) <= set(kept):
                continue
        text = run(ctx, ["probe", *[e for _, e in encs], "--data", ctx.store(data),
                         "--max-samples", "64" if ctx.smoke else "1024", *flags])
        if not ctx.dry:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"# {key}\n" + text)


#: generated images per batch of 32 real ones tried for (e), chosen on the validation people
MIX_CHOICES = (8, 16, 32)


def choose_mix(ctx: Ctx) -> int:
    """(e)'s ratio: the mix_generated of the lowest validation error (people 11-12) at budget
    300, seed 0; written to OUT/e_choice.json."""
    choice = ctx.results / "e_choice.json"
    if choice.exists():
        return int(json.loads(choice.read_text())["mix_generated"])
    errors = {}
    for k in MIX_CHOICES:
        d = ctx.out / "e_ratio" / f"k{k}"
        if not done(d / "summary.json"):
            run(ctx, ["finetune", CONFIGS / "e_mix.yaml", "--out", d, "seed=0",
                      f"finetune.train_store={ctx.train_store('300')}",
                      f"finetune.val_store={ctx.store('p04_val')}", f"finetune.mix_generated={k}",
                      "finetune.train.progress=false", *smoke_overrides(ctx, "finetune")])
        if ctx.dry:
            return MIX_CHOICES[1]
        errors[k] = json.loads((d / "summary.json").read_text())["evaluation"]["val/geodesic_deg"]
    best = min(errors, key=errors.get)
    choice.parent.mkdir(parents=True, exist_ok=True)
    choice.write_text(json.dumps({"mix_generated": best, "val_geodesic_deg": errors,
                                  "budget": "300", "seed": 0}, indent=1))
    return best


def cell_dir(ctx: Ctx, variant: str, budget: str, seed: int) -> Path:
    return ctx.out / variant / f"n{budget}" / f"seed{seed}"


def kept(ctx: Ctx, variant: str, budget: str, seed: int) -> Path:
    return ctx.results / variant / f"n{budget}" / f"seed{seed}.json"


def cell(ctx: Ctx, variant: str, budget: str, seed: int) -> None:
    d = cell_dir(ctx, variant, budget, seed)
    if done(kept(ctx, variant, budget, seed)):
        return
    if done(d / "result.json"):
        _keep(d / "result.json", kept(ctx, variant, budget, seed))
        return
    cfg = CONFIGS / VARIANTS[variant][1]
    over = [f"seed={seed}", f"finetune.train_store={ctx.train_store(budget)}",
            f"finetune.val_store={ctx.store('p04_val')}", "finetune.train.progress=false",
            *smoke_overrides(ctx, "finetune")]
    pd = pretrain_dir(ctx, variant, budget)
    if pd is not None:
        over.append(f"finetune.encoder={pd}")
    if variant == "e":
        over.append(f"finetune.mix_generated={choose_mix(ctx)}")
    if not done(d / "summary.json"):
        run(ctx, ["finetune", cfg, "--out", d, *over])
    model = d / "model"
    ev = {
        "aflw2000": ["--data", ctx.store("aflw2000"), "--protocol", "standard,rotated,flipped"],
        "p04_test": ["--data", ctx.store("p04_test"), "--protocol", "standard,rotated,flipped"],
        "renders": ["--protocol", "full_range", "--full-range-n", "64" if ctx.smoke else "512",
                    "--set", "evaluate.full_range_seed=7"],
    }
    for name, a in ev.items():
        if not done(d / f"eval_{name}" / "report.json"):
            few = ["--max-samples", "32"] if ctx.smoke and name != "renders" else []
            run(ctx, ["evaluate", model, *a, *few, "--out", d / f"eval_{name}", "--no-figures"])
    if ctx.dry:
        return
    res = {"variant": variant, "budget": budget, "seed": seed}
    for name in ev:
        rep = json.loads((d / f"eval_{name}" / "report.json").read_text())
        res[name] = summarise(rep)
    res["finetune"] = json.loads((d / "summary.json").read_text())
    (d / "result.json").write_text(json.dumps(res, indent=1))
    _keep(d / "result.json", kept(ctx, variant, budget, seed))


def _keep(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(src.read_text())


def summarise(rep: dict) -> dict:
    """Per protocol: pooled mean geodesic error, and the comparable Euler MAE of the standard
    view (yaw, pitch, roll, mean)."""
    out = {}
    for proto, r in rep["models"][0]["results"].items():
        pooled = r["pooled"]
        entry = {"geodesic": pooled["geodesic"]["mean"], "median": pooled["geodesic"]["median"],
                 "n": pooled["n"]}
        eu = pooled.get("euler_comparable") or pooled.get("euler")
        if eu and proto == "standard":
            entry["euler"] = {k: eu[k] for k in ("yaw", "pitch", "roll", "mean")}
        out[proto] = entry
    return out


# ----------------------------------------------------------------------------- report


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, sd = mean_sd(xs)
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ± {sd:.1f}"


def report(ctx: Ctx) -> None:
    for p in sorted(ctx.out.glob("*/n*/seed*/result.json")):  # cells of this machine
        r = json.loads(p.read_text())
        if not kept(ctx, r["variant"], r["budget"], r["seed"]).exists():
            _keep(p, kept(ctx, r["variant"], r["budget"], r["seed"]))
    cells: dict[tuple[str, str], list[dict]] = {}
    for p in sorted(ctx.results.glob("*/n*/seed*.json")):
        r = json.loads(p.read_text())
        cells.setdefault((r["variant"], r["budget"]), []).append(r)
    if not cells:
        print("real_study: no complete cell yet")
        return
    cols = [("aflw2000", "standard"), ("aflw2000", "rotated"), ("aflw2000", "flipped"),
            ("p04_test", "standard"), ("p04_test", "rotated"), ("p04_test", "flipped"),
            ("renders", "full_range")]
    lines = ["| variant | labels | seeds | AFLW2000 std | rotated | flipped | Euler MAE "
             "(yaw / pitch / roll / mean) | P'04 test std | rotated | flipped | renders SO(3) |",
             "|---|---|---|" + "---|" * 8]
    table = {}
    for v in VARIANTS:
        for b in BUDGETS:
            rs = cells.get((v, b), [])
            if not rs:
                continue
            vals = {f"{d}/{p}": [r[d][p]["geodesic"] for r in rs] for d, p in cols}
            eul = {k: [r["aflw2000"]["standard"]["euler"][k] for r in rs]
                   for k in ("yaw", "pitch", "roll", "mean")}
            table[f"{v}/{b}"] = {"seeds": [r["seed"] for r in rs], **vals,
                                 **{f"aflw2000/euler_{k}": x for k, x in eul.items()}}
            e = " / ".join(f"{mean_sd(eul[k])[0]:.1f}" for k in ("yaw", "pitch", "roll")) + \
                f" / {fmt(eul['mean'])}"
            row = [f"({v})", b, str(len(rs)), *(fmt(vals[f"{d}/{p}"]) for d, p in cols[:3]), e,
                   *(fmt(vals[f"{d}/{p}"]) for d, p in cols[3:])]
            lines.append("| " + " | ".join(row) + " |")
    lines.append(baseline_row(ctx))
    md = ("Mean geodesic error (deg), mean ± sample SD over seeds; the Euler MAE is AFLW2000's "
          "published-comparable one (standard view). (const): always answering the upright "
          "frontal pose (the identity rotation), no model.\n\n" + "\n".join(lines) + "\n")
    ctx.results.mkdir(parents=True, exist_ok=True)
    (ctx.results / "table.md").write_text(md)
    (ctx.results / "results.json").write_text(json.dumps(table, indent=1))
    print(md)
    figure(ctx, table)


def baseline_errors(R):
    """Mean geodesic error (deg) of always predicting the identity rotation, per protocol as
    clerf evaluates it: standard, rotated by the 9 default angles (pooled), flipped (h and v)."""
    import torch

    from clerf.augment import GeometricParams, compose_rotation
    from clerf.evaluation.protocols import DEFAULT_ROTATED_ANGLES
    from clerf.geometry import geodesic_distance

    R = torch.as_tensor(R, dtype=torch.float64)
    n = R.shape[0]
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)

    def err(p):
        return geodesic_distance(eye, compose_rotation(R, p)).mean().item()

    rot = []
    for a in DEFAULT_ROTATED_ANGLES:
        p = GeometricParams.identity(n)
        p.angle = torch.full((n,), float(a))
        rot.append(err(p))
    flips = []
    for attr in ("hflip", "vflip"):
        p = GeometricParams.identity(n)
        setattr(p, attr, torch.ones(n, dtype=torch.bool))
        flips.append(err(p))
    return {"standard": err(GeometricParams.identity(n)), "rotated": sum(rot) / len(rot),
            "flipped": sum(flips) / 2}


def baseline_row(ctx: Ctx) -> str:
    import h5py

    cells = []
    for name in ("aflw2000", "p04_test"):
        with h5py.File(ctx.store(name), "r") as f:
            b = baseline_errors(f["rotations"][:])
        cells.append(b)
    a, p = cells
    return (f"| (const) | - | - | {a['standard']:.1f} | {a['rotated']:.1f} | {a['flipped']:.1f} "
            f"| - | {p['standard']:.1f} | {p['rotated']:.1f} | {p['flipped']:.1f} | 126.5 |")


def figure(ctx: Ctx, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = {"100": 100, "300": 300, "all": 1860}
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, (desc, _) in VARIANTS.items():
        xs, ms, sds = [], [], []
        for b in BUDGETS:
            vals = table.get(f"{v}/{b}", {}).get("aflw2000/standard")
            if vals:
                m, sd = mean_sd(vals)
                xs.append(sizes[b])
                ms.append(m)
                sds.append(0.0 if math.isnan(sd) else sd)
        if xs:
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=f"({v}) {desc[:40]}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled real images (Pointing'04 people 1-10)")
    ax.set_ylabel("AFLW2000 mean geodesic error (deg)")
    ax.set_title("Real labels vs AFLW2000 error (mean ± SD over seeds)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(ctx.results / "budget_curve.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pointing04", help="Pointing'04 root (the PersonNN folders)")
    ap.add_argument("--aflw2000", help="AFLW2000-3D folder (images and .mat)")
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--stores", default=None, help="store folder (default OUT/stores)")
    ap.add_argument("--variants", default="a,b,c,d,e,f")
    ap.add_argument("--budgets", default="100,300,all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--results", default=None,
                    help="where finished cells are kept (default studies/results/real; "
                         "OUT/results with --smoke)")
    ap.add_argument("--report", action="store_true", help="only write the table and figure")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="a few steps per stage: checks the chain, measures nothing")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clerf = str(Path(sys.executable).with_name("clerf"))
    if not os.path.exists(clerf):
        clerf = "clerf"
    results = Path(a.results) if a.results else (out / "results" if a.smoke else RESULTS)
    ctx = Ctx(out, Path(a.stores) if a.stores else out / "stores", clerf, a.dry_run, a.smoke,
              results)
    if a.report:
        report(ctx)
        return
    import torch

    print(f"real_study: CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    t0 = time.time()
    variants = a.variants.split(",")
    budgets = a.budgets.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    bad = [v for v in variants if v not in VARIANTS] + [b for b in budgets if b not in BUDGETS]
    if bad:
        raise SystemExit(f"real_study: unknown variant/budget {bad} (variants {list(VARIANTS)}, "
                         f"budgets {list(BUDGETS)})")
    prepare_stores(ctx, a.pointing04, a.aflw2000)
    for v in variants:
        for b in budgets if v == "f" else budgets[:1]:
            pretrain(ctx, v, b)
    probe(ctx)
    for s in seeds:
        for b in budgets:
            for v in variants:
                cell(ctx, v, b, s)
    print(f"real_study: done in {time.time() - t0:.0f} s this call")
    if not ctx.dry:
        report(ctx)


if __name__ == "__main__":
    main()
