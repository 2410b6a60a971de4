"""The evaluate stage: models x protocols -> per-sample errors -> report, tables, figures.

:func:`run_evaluate` is the stage function behind ``clerf evaluate``. It runs the same way in one
process and under ``accelerate launch`` (each process takes one contiguous block of the samples;
the main process writes the report).

Results do not depend on the batch size, the sample order or the number of processes: every
prediction is recorded with its sample index, the per-process records are gathered, records
repeated by a padded gather are dropped (de-duplicated by index) and everything is sorted by
index before any figure is computed (:mod:`clerf.evaluation.metrics`). The model always runs on
batches of the same shape (``model_batch``, the last one zero-padded): a CPU convolution rounds
differently for another batch shape (about 1e-5 deg of error here), but not for other samples
in a batch of the same shape. What remains is last-bit rounding of vectorised elementwise
functions that depends on a sample's position in a batch (below 1e-9 deg); sample counts and
shares are exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clerf.config import EvaluateConfig
from clerf.errors import ConfigError, DataError
from clerf.evaluation.metrics import SampleErrors, compute_errors, merge, summarize
from clerf.evaluation.protocols import (
    EvalSource,
    GeneratorSource,
    StoreSource,
    View,
    build_views,
)

__all__ = [
    "Predictor",
    "collect_errors",
    "evaluate_predictor",
    "run_evaluate",
]

#: images ``(B, 3, H, W)`` float in [0, 1] on the model's device -> rotations ``(B, 3, 3)``
Predictor = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- core loop


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous block ``[lo, hi)`` of ``n`` samples for process ``rank`` of ``world``."""
    return rank * n // world, (rank + 1) * n // world


def _gather_records(rows: Tensor, n: int, world: int, gather: Callable[[Tensor], Tensor] | None
                    ) -> Tensor:
    """All processes' ``(m, 19)`` records, padded rows and repeats removed, sorted by index."""
    if world > 1 and gather is not None:
        cap = -(-n // world)
        pad = torch.full((cap - rows.shape[0], rows.shape[1]), -1.0, dtype=rows.dtype,
                         device=rows.device)
        rows = gather(torch.cat([rows, pad]).contiguous()).cpu()
    rows = rows[rows[:, 0] >= 0]
    idx = rows[:, 0].to(torch.int64).numpy()
    _, first = np.unique(idx, return_index=True)  # sorted by index, one record per sample
    return rows[torch.from_numpy(first)]


def collect_errors(
    predict: Predictor,
    source: EvalSource,
    views: Sequence[View],
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Tensor], Tensor] | None = None,
    model_batch: int = 32,
) -> dict[str, SampleErrors]:
    """Per-sample errors of ``predict`` on every view of ``source``.

    Each process reads its contiguous block of samples, ``batch_size`` at a time, and sends them
    through the views and the model in chunks of exactly ``model_batch`` samples (the last chunk
    padded with black images whose records are dropped). A fixed batch shape makes every
    sample's prediction bitwise independent of ``batch_size``, of the order and of the process
    that computed it (a convolution may round differently for another batch *shape*). Each record
    ``(index, R_true, R_pred)`` is kept in float64; with ``world > 1``, ``gather``
    (``accelerate.utils.gather``) collects the records of all processes and every process
    returns the same result.

    Returns:
        ``{f"{view.protocol}/{view.name}": SampleErrors}`` sorted by sample index.
    """
    n = len(source)
    lo, hi = _share(n, rank, world)
    rows: dict[str, list[Tensor]] = {f"{v.protocol}/{v.name}": [] for v in views}
    buf_img: list[Tensor] = []
    buf_R: list[Tensor] = []
    buf_idx: list[Tensor] = []

    def run_chunk(images_u8: Tensor, R: Tensor, index: Tensor) -> None:
        m = images_u8.shape[0]
        if m < model_batch:  # pad to the fixed shape; padded rows are dropped below
            pad = model_batch - m
            images_u8 = torch.cat([images_u8, images_u8.new_zeros((pad, *images_u8.shape[1:]))])
            R = torch.cat([R, torch.eye(3, dtype=R.dtype).expand(pad, 3, 3)])
        # One memory format for every chunk: a channels-last input (e.g. rendered images) makes
        # the convolutions take another code path that rounds differently.
        images = images_u8.to(device).contiguous().float().div_(255.0)
        R = R.to(device=device, dtype=torch.float64)
        for v in views:
            imgs_v, R_v = v.apply(images, R)
            R_pred = predict(imgs_v)
            if R_pred.shape != R_v.shape:
                raise ValueError(f"model returned rotations of shape {tuple(R_pred.shape)} "
                                 f"for a batch of {imgs_v.shape[0]} images")
            rows[f"{v.protocol}/{v.name}"].append(torch.cat(
                [index[:, None], R_v[:m].flatten(1).cpu(),
                 R_pred[:m].to(torch.float64).flatten(1).cpu()], dim=1))

    def flush(final: bool) -> None:
        nonlocal buf_img, buf_R, buf_idx
        if not buf_img:
            return
        imgs, Rs, idx = torch.cat(buf_img), torch.cat(buf_R), torch.cat(buf_idx)
        k = 0
        while imgs.shape[0] - k >= model_batch or (final and k < imgs.shape[0]):
            run_chunk(imgs[k:k + model_batch], Rs[k:k + model_batch], idx[k:k + model_batch])
            k += model_batch
        buf_img, buf_R, buf_idx = [imgs[k:]], [Rs[k:]], [idx[k:]]

    with torch.inference_mode():
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            images_u8, R = source.read(start, stop)
            if images_u8.shape[0] != stop - start or R.shape[0] != stop - start:
                raise DataError(f"source returned {images_u8.shape[0]} samples for "
                                f"[{start}, {stop})")
            buf_img.append(images_u8.cpu())
            buf_R.append(R.cpu().to(torch.float64))
            buf_idx.append(torch.arange(start, stop, dtype=torch.float64))
            flush(final=False)
        flush(final=True)
    out = {}
    # The dataset's own Euler triple labels the images as stored: identity views only.
    ds_euler = source.dataset_euler()
    # the dataset's triple still labels a lowres view (resampled, not turned)
    identity = {f"{v.protocol}/{v.name}" for v in views if v.angle is None and v.flip is None}
    for key, parts in rows.items():
        local = torch.cat(parts) if parts else torch.zeros(0, 19, dtype=torch.float64)
        allrows = _gather_records(local.to(device), n, world, gather).cpu()
        if allrows.shape[0] != n:
            raise RuntimeError(f"{key}: gathered {allrows.shape[0]} of {n} samples")
        index = allrows[:, 0].to(torch.int64)
        ed = None
        if ds_euler is not None and key in identity:
            ed = ds_euler[index.numpy()]  # (pitch, yaw, roll), as every Euler array
        out[key] = compute_errors(index, allrows[:, 10:].view(-1, 3, 3),
                                  allrows[:, 1:10].view(-1, 3, 3), euler_dataset=ed)
    return out


def summarize_protocol(
    errors: dict[str, SampleErrors], views: Sequence[View], euler_range: float,
    decoding: str = "6drepnet",
) -> dict[str, Any]:
    """Per-view summaries and, for protocols with several views, the pooled summary."""
    euler = views[0].euler
    per_view = {v.name: summarize(errors[f"{v.protocol}/{v.name}"], euler=euler,
                                  euler_range=euler_range, decoding=decoding) for v in views}
    out: dict[str, Any] = {"views": per_view,
                           "view_params": {v.name: v.describe() for v in views}}
    if len(views) > 1:
        parts = [errors[f"{v.protocol}/{v.name}"] for v in views]
        n = max(int(p.index.max()) + 1 for p in parts)
        pooled = merge(parts, offsets=[i * n for i in range(len(parts))])
        out["pooled"] = summarize(pooled, euler=euler, euler_range=euler_range)
    else:
        out["pooled"] = per_view[views[0].name]
    return out


def evaluate_predictor(
    predict: Predictor,
    protocols: Sequence[str],
    opts: EvaluateConfig,
    data: EvalSource | None,
    full_range: EvalSource | None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Tensor], Tensor] | None = None,
    decoding: str = "6drepnet",
) -> tuple[dict[str, Any], dict[str, dict[str, SampleErrors]]]:
    """All protocols for one model: ``(summaries per protocol, per-sample errors per protocol)``.

    The stored-data protocols (standard, rotated, flipped) share one pass over ``data``.
    ``decoding``: how the published-comparable Euler MAE reads the prediction's angles
    (:func:`peers_decoding` of the model's head).
    """
    views = {p: build_views(p, opts.rotated_angles) for p in protocols}
    on_data = [v for p in protocols if p != "full_range" for v in views[p]]
    errors: dict[str, SampleErrors] = {}
    if on_data:
        if data is None:
            raise ConfigError(f"protocols {[p for p in protocols if p != 'full_range']} need "
                              "--data (a labelled or triplet store)")
        errors.update(collect_errors(predict, data, on_data, opts.batch_size, device, rank,
                                     world, gather, opts.model_batch))
    if "full_range" in protocols:
        if full_range is None:
            raise ConfigError("the full_range protocol needs a generator or a stored set")
        errors.update(collect_errors(predict, full_range, views["full_range"], opts.batch_size,
                                     device, rank, world, gather, opts.model_batch))
    summaries, samples = {}, {}
    for p in protocols:
        summaries[p] = summarize_protocol(errors, views[p], opts.euler_range_deg, decoding)
        samples[p] = {v.name: errors[f"{v.protocol}/{v.name}"] for v in views[p]}
    return summaries, samples


def peers_decoding(head: dict[str, Any] | None) -> str:
    """``bins`` for a model whose rotations come from a HopeNet-style binned head (its angles
    are the bins' own, as HopeNet scores them), else ``6drepnet`` (a matrix, decomposed as
    6DRepNet does); ``head`` is the head's ``describe()``."""
    head = head or {}
    if head.get("type") == "BinnedEulerHead":
        return "bins"
    if head.get("type") == "CombinedHead" and head.get("predict_from") == "binned":
        return "bins"
    return "6drepnet"


# --------------------------------------------------------------------------- the stage


def _model_names(paths: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(paths):
            raise ConfigError(f"--name: {len(names)} names for {len(paths)} models")
        out = list(names)
    else:
        out = [Path(p).name or str(p) for p in paths]
        if len(set(out)) != len(out):  # same folder name in different places
            out = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
    out = [re.sub(r"[^A-Za-z0-9_.+/-]", "_", n) for n in out]
    if len(set(out)) != len(out):
        raise ConfigError(f"model names are not unique: {out}; give --name for each model")
    return out


def run_evaluate(
    models: Sequence[str],
    out: str | Path,
    data: str | Path | None = None,
    opts: EvaluateConfig | None = None,
    names: Sequence[str] | None = None,
    cfg: Any = None,
) -> dict[str, Any]:
    """Evaluate saved models on protocols and write ``report.json``, ``report.md`` and figures.

    Args:
        models: saved model directories (``HeadPoseModel.save_pretrained``).
        out: output directory (created).
        data: labelled/triplet store for the standard, rotated and flipped protocols.
        opts: protocols and options (the ``evaluate`` section; default: its defaults).
        names: display names of the models (default: their directory names).
        cfg: the resolved experiment config, for provenance.

    Returns:
        The report (also written to ``out/report.json`` by the main process).
    """
    from accelerate import PartialState
    from accelerate.utils import gather as accelerate_gather
    from accelerate.utils import parse_flag_from_env

    from clerf.config import provenance
    from clerf.evaluation import report as report_mod
    from clerf.inference.model import load_pose_model

    opts = opts if opts is not None else EvaluateConfig()
    opts.validate("evaluate")
    if not models:
        raise ConfigError("give at least one MODEL directory")
    model_names = _model_names([str(m) for m in models], names)
    needs_data = any(p != "full_range" for p in opts.protocols)
    if needs_data and data is None:
        raise ConfigError(f"protocols {[p for p in opts.protocols if p != 'full_range']} need "
                          "--data (a labelled or triplet store)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} exists and is not a directory")

    # PartialState, not Accelerator: inference needs the device, the process group and gather,
    # not mixed precision or gradient state (and it does not clash with a training Accelerator).
    # Accelerator reads ACCELERATE_USE_CPU itself; PartialState does not (without it, a CPU
    # `accelerate launch --multi_gpu` run silently becomes one process per rank, world size 1).
    state = PartialState(cpu=opts.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device, rank, world = state.device, state.process_index, state.num_processes
    gather = accelerate_gather if world > 1 else None

    loaded = [load_pose_model(m, device=device) for m in models]  # fail early, before any work
    source = StoreSource(data, opts.max_samples) if needs_data else None
    fr_sources: dict[int, EvalSource] = {}

    results = []
    samples = {}
    for name, path, model in zip(model_names, models, loaded, strict=True):
        fr = None
        if "full_range" in opts.protocols:
            if opts.full_range_store:
                fr = fr_sources.setdefault(0, StoreSource(opts.full_range_store))
            else:
                res = opts.full_range_resolution or model.input_size
                fr = fr_sources.get(res) or fr_sources.setdefault(res, GeneratorSource(
                    opts.full_range_n, opts.full_range_seed, res, opts.full_range_generator,
                    opts.full_range_params, device=device))
        summaries, per_sample = evaluate_predictor(
            model.predict_rotations, opts.protocols, opts, source, fr, device, rank, world, gather,
            decoding=peers_decoding(model.describe().get("head")),
        )
        results.append({"name": name, "path": str(path), "model": model.describe(),
                        "results": summaries})
        samples[name] = per_sample

    report = {
        "protocols": list(opts.protocols),
        "options": {"rotated_angles": list(opts.rotated_angles),
                    "euler_range_deg": opts.euler_range_deg,
                    "full_range_n": opts.full_range_n, "full_range_seed": opts.full_range_seed,
                    "full_range_generator": opts.full_range_generator,
                    "full_range_params": opts.full_range_params,
                    "full_range_store": opts.full_range_store or None,
                    "max_samples": opts.max_samples,
                    # the batch shape of model calls can change float rounding (~1e-5 deg)
                    "model_batch": opts.model_batch},
        "data": source.describe() if source is not None else None,
        "full_range_data": [s.describe() for s in fr_sources.values()],
        "models": results,
        # How it was run: never part of the results (they must not depend on it).
        "run": {**provenance(cfg), "world_size": world, "batch_size": opts.batch_size,
                "device": str(device)},
    }
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        report_mod.write_report(report, samples, out, figures=opts.figures)
    state.wait_for_everyone()
    return report
