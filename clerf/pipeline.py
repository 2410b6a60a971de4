"""``clerf pipeline``: generate -> pretrain -> finetune -> evaluate in one output directory.

Each stage is the same stage function that its own command calls; this module only decides the
paths that connect them and skips what is already complete, so rerunning the same command resumes
where it stopped (a partial store is resumed, a training stage auto-resumes from its newest
checkpoint). Layout of ``OUT`` (``pipeline.data_dir`` can point the stores elsewhere, so that
several runs, e.g. ablations, share one data set)::

    OUT/config.yaml          the resolved pipeline config
    OUT/data/train.h5        triplet store (training; read as labelled images by finetune)
    OUT/data/test.h5         held-out store: other seed, so other identities and poses
    OUT/pretrain/            contrastive stage (encoder/, checkpoints/, metrics.jsonl, ...)
    OUT/finetune/            fine-tune stage (model/, checkpoints/, metrics.jsonl, ...)
    OUT/evaluate/            report.json, report.md, figures
    OUT/results.md           the results table, also printed

A stage whose output exists but was made from another configuration is an error naming the first
differing key: the pipeline never mixes artefacts of two configurations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf

from clerf.config import (
    DISPLAY_KEYS,
    EvaluateConfig,
    PipelineStage,
    comparable,
    first_difference,
    save_resolved,
    section_config,
    structured,
    to_dict,
)
from clerf.devices import is_main_process
from clerf.errors import ConfigError, DataError

__all__ = ["STAGES", "run_pipeline", "stage_configs"]

#: the stages in the order they run (:data:`clerf.config.PipelineStage`)
STAGES: tuple[str, ...] = get_args(PipelineStage)


def _derive(cfg: DictConfig, updates: dict[str, Any]) -> DictConfig:
    """A new read-only config: ``cfg`` with dotted-key ``updates`` applied."""
    merged = structured(to_dict(cfg))
    for key, value in updates.items():
        OmegaConf.update(merged, key, value, merge=False)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]


def needs_train_store(cfg: DictConfig) -> bool:
    """Whether a training stage of the pipeline reads the training store (one that does not
    stream from the generator)."""
    return any(name in cfg.pipeline.stages and not cfg[name].stream.enabled
               for name in ("pretrain", "finetune"))  # fmt: skip


def needs_val_store(cfg: DictConfig) -> bool:
    """Whether a training stage validates on the pipeline's validation store (a stage that
    streams renders its own held-out images instead)."""
    return needs_train_store(cfg)


def stage_configs(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """The per-stage configs and paths of a pipeline run (pure: creates nothing)."""
    p = cfg.pipeline
    unknown = [s for s in p.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {unknown}; choose from {STAGES}")
    data_dir = Path(p.data_dir) if p.data_dir else out / "data"
    train_store, test_store = data_dir / "train.h5", data_dir / "test.h5"
    val_store = data_dir / "val.h5"
    if int(p.val_seed_offset) == int(p.test_seed_offset) or int(p.val_seed_offset) == 0:
        raise ConfigError(
            f"pipeline.val_seed_offset: {p.val_seed_offset} would render the validation set from "
            "the training or test seed; choose another offset"
        )

    def val_for(stage: str) -> str:
        # a streaming stage renders its own held-out images; the test store is never used
        return "" if cfg[stage].stream.enabled else str(val_store)

    pretrain_dir, finetune_dir = out / "pretrain", out / "finetune"
    use_pretrain = "pretrain" in p.stages
    return {
        "train_store": train_store,
        "test_store": test_store,
        "val_store": val_store,
        "pretrain_dir": pretrain_dir,
        "finetune_dir": finetune_dir,
        "evaluate_dir": out / "evaluate",
        "generate_train": cfg,
        "generate_test": _derive(
            cfg, {"seed": int(cfg.seed) + int(p.test_seed_offset),
                  "triplets.count": int(p.test_count)}
        ),
        "generate_val": _derive(
            cfg, {"seed": int(cfg.seed) + int(p.val_seed_offset),
                  "triplets.count": int(p.val_count)}
        ),
        "pretrain": _derive(
            cfg,
            {"pretrain.train_store": str(train_store), "pretrain.val_store": val_for("pretrain")},
        ),
        "finetune": _derive(
            cfg,
            {"finetune.train_store": str(train_store), "finetune.val_store": val_for("finetune"),
             "finetune.val_fraction": 0.0,
             # without a pretrain stage: the config's own encoder (null: a fresh one)
             "finetune.encoder": str(pretrain_dir) if use_pretrain
             else (cfg.finetune.encoder or None)},
        ),
    }


#: the config sections that determine each training stage's result (its data are checked by the
#: generate step's fingerprint)
STAGE_SECTIONS = {
    "pretrain": ("seed", "encoder", "pretrain"),
    "finetune": ("seed", "encoder", "head", "finetune"),
}


def _training_state(stage_cfg: DictConfig, directory: Path, artefact: str, name: str) -> str:
    """``missing``, ``partial`` or ``complete``; raises if made from another config."""
    saved = directory / "config.yaml"
    if not saved.exists():
        return "missing"
    keys = STAGE_SECTIONS[name]
    if stage_cfg[name].stream.enabled:  # the data come from these sections, not from a store
        keys = (*keys, "generator", "triplets")
    from clerf.training import saved_run_config

    old = {k: v for k, v in saved_run_config(directory).items() if k in keys}
    new = {k: v for k, v in comparable(to_dict(stage_cfg)).items() if k in keys}
    diff = first_difference(old, new, DISPLAY_KEYS)
    if diff:
        raise DataError(
            f"{directory} was made from another config ({diff}); remove it or choose another --out"
        )
    done = (directory / "summary.json").exists() and (directory / artefact).is_dir()
    return "complete" if done else "partial"


def run_pipeline(
    cfg: DictConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the configured stages in order, skipping complete ones; return the evaluation report.

    Args:
        cfg: a loaded :class:`clerf.config.ExperimentConfig` with a ``pipeline`` section.
        out: the output directory (created).
        progress: progress bars in the stages.
        log: where one-line stage messages go.

    Returns:
        ``{"report": report or None, "timings": {stage: seconds}, "paths": {...}}``.
    """
    from triplets.generate import generated_state, run_generate

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not progress:
        cfg = _derive(cfg, {"pretrain.train.progress": False, "finetune.train.progress": False})
    sc = stage_configs(cfg, out)
    # Under several processes every rank runs the stages (each is distributed), but the
    # pipeline's own files and messages come from the main process only.
    main = is_main_process()
    if not main:
        log = _silent
    else:
        save_resolved(cfg, out)
    stages = list(cfg.pipeline.stages)
    timings: dict[str, float] = {}

    if "generate" in stages:
        t0 = time.perf_counter()
        stores = [("generate_test", sc["test_store"])]
        if needs_train_store(cfg):  # otherwise every training stage streams from the generator
            stores[:0] = [("generate_train", sc["train_store"]), ("generate_val", sc["val_store"])]
        for key, path in stores:
            state = generated_state(sc[key], path)
            if state == "complete":
                log(f"[generate] {path} is complete: skipped")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            log(f"[generate] {'resuming' if state == 'partial' else 'writing'} {path}")
            run_generate(sc[key], path, resume=state == "partial", progress=progress)
        timings["generate"] = time.perf_counter() - t0

    for name in ("pretrain", "finetune"):
        if name not in stages:
            continue
        directory = sc[f"{name}_dir"]
        artefact = "encoder" if name == "pretrain" else "model"
        state = _training_state(sc[name], directory, artefact, name)
        if state == "complete":
            log(f"[{name}] {directory} is complete: skipped")
            continue
        log(f"[{name}] {'resuming' if state == 'partial' else 'training'} in {directory}")
        t0 = time.perf_counter()
        if name == "pretrain":
            from clerf.pretrain import run_pretrain

            run_pretrain(sc[name], directory)
        else:
            from clerf.finetune import run_finetune

            run_finetune(sc[name], directory)
        timings[name] = time.perf_counter() - t0

    report = None
    if "evaluate" in stages:
        report = _evaluate(cfg, sc, progress, log)
        timings["evaluate"] = report.pop("_seconds", 0.0)
        table = _results_table(cfg, report)
        if main:
            (out / "results.md").write_text(table + "\n")
        log(table)
    if main:
        timing_file = out / "timings.json"
        old = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        timing_file.write_text(json.dumps({**old, **timings}, indent=2))
    return {"report": report, "timings": timings,
            "paths": {k: str(v) for k, v in sc.items() if isinstance(v, Path)}}


def _silent(message: str) -> None:
    """The log of a rank other than the main one."""


def _evaluate(cfg: DictConfig, sc: dict[str, Any], progress: bool,
              log: Callable[[str], None]) -> dict[str, Any]:
    from clerf.evaluation.evaluate import run_evaluate

    directory: Path = sc["evaluate_dir"]
    model = sc["finetune_dir"] / "model"
    if not model.is_dir():
        raise DataError(f"[evaluate] no model at {model}: run the finetune stage first")
    report_file = directory / "report.json"
    marker = directory / "pipeline_config.yaml"
    if report_file.exists() and marker.exists():
        diff = first_difference(comparable(to_dict(OmegaConf.load(marker))),
                                comparable(to_dict(cfg)), DISPLAY_KEYS)
        if diff is None and report_file.stat().st_mtime >= (model / "config.json").stat().st_mtime:
            log(f"[evaluate] {report_file} is complete: skipped")
            return json.loads(report_file.read_text())
    t0 = time.perf_counter()
    log(f"[evaluate] {', '.join(cfg.evaluate.protocols)} on {sc['test_store']}")
    opts = section_config(EvaluateConfig, cfg.evaluate, "evaluate")
    report = run_evaluate([str(model)], directory, data=str(sc["test_store"]), opts=opts,
                          names=[str(cfg.name)], cfg=cfg)
    if is_main_process():
        save_resolved(cfg, directory, "pipeline_config.yaml")
    report["_seconds"] = time.perf_counter() - t0
    return report


def _results_table(cfg: DictConfig, report: dict[str, Any]) -> str:
    """A Markdown table of the pooled headline metrics per protocol (degrees)."""
    lines = [
        f"Results of '{cfg.name}' on the held-out set (degrees; chance, a uniformly random "
        "rotation, gives a mean geodesic error of about 126.5)",
        "",
        "| model | protocol | N | geodesic mean | median | p90 | MAEV | <10 deg | <15 deg "
        "| Euler MAE (N) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report.get("models", []):
        for proto, res in m.get("results", {}).items():
            s = res["pooled"]
            geo, under, euler = s["geodesic"], s["under"], s.get("euler") or {}
            euler_txt = f"{euler['mean']:.1f} ({euler['n']})" if euler.get("mean") is not None \
                else "-"
            lines.append(
                f"| {m['name']} | {proto} | {s['n']} | {geo['mean']:.1f} | {geo['median']:.1f} | "
                f"{geo['p90']:.1f} | {s['maev']:.1f} | {100 * under['10']:.0f}% | "
                f"{100 * under['15']:.0f}% | {euler_txt} |"
            )
    return "\n".join(lines)
