"""Writing an evaluation report: ``report.json``, ``report.md``, per-sample CSVs, PNG figures.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas created locally
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no ``pyplot`` and never
``matplotlib.use``, so importing or running this never changes the user's backend.

Files (``OUT/``):

* ``report.json``: everything (per model, protocol and view: the summaries of
  :func:`clerf.evaluation.metrics.summarize`), plus the options and the provenance under ``run``.
* ``report.md``: one Markdown table per protocol (all models), with the Euler notes and the
  definition of every Euler figure; where the data carry the dataset's own Euler triple, a table
  of the **published-comparable Euler MAE** (docs/conventions.md section 7) with its N and the
  published figures it stands beside (:func:`published_comparison`).
* ``samples_<model>.csv``: one row per model x protocol x view x sample (index, errors, true
  and predicted Euler angles, the dataset's own triple where known) to recompute any figure.
* ``error_vs_euler.png``: median geodesic error against the true yaw, pitch and roll (standard
  protocol, or the first one reported).
* ``error_vs_inplane.png`` (rotated protocol): mean and median geodesic error against the
  in-plane angle; angle 0 is the standard protocol when it was run.
* ``error_vs_upright.png`` (full-range protocol): mean and median geodesic error against the tilt
  of the head's up axis (0 upright, 180 upside-down) and the angle of the nose from the camera
  (0 frontal, 180 the back of the head); see :func:`clerf.geometry.view_angles`.
* ``cumulative_error.png``: share of samples under each geodesic error, per protocol (pooled).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from clerf.evaluation.metrics import (
    EULER_AXES,
    SampleErrors,
    binned_error,
    cumulative_curve,
    merge,
)
from clerf.files import replacing, write_text_atomic
from clerf.geometry import PROTOCOL_MAX_ABS_ANGLE

__all__ = ["write_report", "markdown_report", "write_figures", "write_samples_csv",
           "published_comparison"]

#: the protocol-1 sets whose published Euler MAE the comparable figure stands beside
_PUBLISHED = {
    "aflw2000": ("the AFLW2000 MAE of HopeNet (Ruiz et al., 2018) and 6DRepNet (Hempel et al., "
                 "2022), protocol 1 (trained on 300W-LP)"),
    "biwi": ("the BIWI MAE of HopeNet and 6DRepNet, protocol 1 (trained on 300W-LP, BIWI "
             "evaluated whole)"),
}
_AFLW2000_PROTOCOL_N = 1969  # kept by the +-99 deg filter (docs/conventions.md section 6)


def published_comparison(data: dict[str, Any] | None) -> str:
    """Which published figures the comparable Euler MAE on ``data`` stands beside, or why not.

    ``data`` is the report's ``data`` entry (:meth:`StoreSource.describe`). The definition
    always matches the peers'; the *setup* matches only with their dataset, crop and filter.
    """
    attrs = (data or {}).get("attrs", {})
    name = str(attrs.get("source_dataset", attrs.get("dataset", "")))
    n = (data or {}).get("n")
    if name not in _PUBLISHED:
        return (f"the peers' definition on `{name or 'unknown data'}`; no published "
                "counterpart")
    why: list[str] = []
    lim = attrs.get("protocol_max_abs_angle_deg")
    if name == "aflw2000":
        if attrs.get("crop_preset") != "hopenet_test":
            why.append(f"crop preset `{attrs.get('crop_preset')}` is not the peers' "
                       "`hopenet_test`")
        if lim is not None and float(lim) != PROTOCOL_MAX_ABS_ANGLE:
            why.append("the +-99 deg filter was not applied" if float(lim) < 0
                       else f"filter +-{float(lim):g} deg, not +-99")
        if n != _AFLW2000_PROTOCOL_N:
            why.append(f"{n} images, not the {_AFLW2000_PROTOCOL_N} of the full set")
    if name == "biwi" and lim is not None and float(lim) >= 0:
        why.append(f"filtered to +-{float(lim):g} deg (the protocol evaluates BIWI whole)")
    if why:
        return f"same definition as {_PUBLISHED[name]}, but not their setup: " + "; ".join(why)
    resize = attrs.get("resize")
    inputs = {"6drepnet": "6DRepNet's input (Resize 256 + CenterCrop 224 at 224 px)",
              "center": "HopeNet's input (Resize 224 + CenterCrop 224 at 224 px)",
              "hopenet": "HopeNet's input (Resize 224 + CenterCrop 224 at 224 px)"}
    extra = f"; images resized as {inputs[resize]}" if resize in inputs else ""
    return f"stands beside {_PUBLISHED[name]}{extra}"



def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: one table per protocol, rows = model x view."""
    lines = ["# clerf evaluation report", ""]
    data = report.get("data")
    if data:
        lines += [f"Data: `{data.get('path', data.get('kind'))}` ({data['n']} samples).", ""]
    lines += ["All errors in degrees. Geodesic = angle of R_pred^T R_true; MAEV = mean angle "
              "between predicted and true head axes; <t = share of samples with geodesic error "
              "below t deg. Euler MAE in the protocol tables (clerf's definition): label and "
              "prediction both decomposed from their rotation matrices (yaw in [-90, 90]), "
              "differences wrapped by 360 only (never 180), over the samples whose true angles "
              "are meaningful (Euler N). It is not the figure the peers publish: see "
              "\"Published-comparable Euler MAE\" where the data allow it.", ""]
    thresholds = None
    for p in report["protocols"]:
        lines += [f"## {p}", ""]
        if p == "rotated":
            angles = ", ".join(f"{a:+g}" for a in report["options"]["rotated_angles"])
            lines += [f"In-plane angles (deg, clockwise on screen): {angles}; labels composed "
                      "exactly as R @ Rz(angle).", ""]
        if p == "full_range":
            fr = report.get("full_range_data") or []
            if fr:
                d = fr[0]
                desc = (f"generator `{d['generator']}`, seed {d['seed']}, {d['n']} rotations "
                        "uniform over SO(3)" if d.get("kind") == "generator"
                        else f"store `{d.get('path')}`")
                lines += [f"Full range: {desc}. Euler MAE is not reported.", ""]
        first = report["models"][0]["results"][p]["pooled"]
        thresholds = list(first["under"])
        head = (["model", "view", "N", "geo mean", "geo median", "geo p90", "MAEV"]
                + [f"<{t}" for t in thresholds]
                + ["yaw", "pitch", "roll", "Euler mean", "Euler N"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes: list[str] = []
        for m in report["models"]:
            res = m["results"][p]
            rows = list(res["views"].items())
            if len(rows) > 1:
                rows.append(("pooled", res["pooled"]))
            for view, s in rows:
                e = s["euler"]
                cells = [m["name"], view, str(s["n"]), _fmt(s["geodesic"]["mean"]),
                         _fmt(s["geodesic"]["median"]), _fmt(s["geodesic"]["p90"]),
                         _fmt(s["maev"])]
                cells += [f"{100 * s['under'][t]:.1f}%" for t in thresholds]
                cells += [_fmt(e.get("yaw")), _fmt(e.get("pitch")), _fmt(e.get("roll")),
                          _fmt(e.get("mean")), str(e["n"])]
                lines.append("| " + " | ".join(cells) + " |")
                if e["note"] != "all samples":
                    notes.append(f"{m['name']} / {view}: Euler {e['note']}")
                if "missed" in s:
                    ms = s["missed"]
                    found = ms["geodesic_mean_found"]
                    notes.append(f"{m['name']} / {view}: no rotation for {ms['n']} of {s['n']} "
                                 f"({100 * ms['share']:.1f}%), scored as the frontal answer; "
                                 f"geo mean of the others {_fmt(found)}")
        lines.append("")
        if notes:
            lines += [f"- {n}" for n in dict.fromkeys(notes)] + [""]
        lines += _comparable_table(report, p)
    run = report.get("run", {})
    lines += [f"clerf {run.get('clerf_version', '?')}, conventions "
              f"{run.get('conventions_version', '?')}, {run.get('world_size', 1)} process(es), "
              f"device {run.get('device', '?')}.", ""]
    return "\n".join(lines)


def _comparable_table(report: dict[str, Any], protocol: str) -> list[str]:
    """The published-comparable Euler MAE of ``protocol``'s views that have one."""
    rows = []
    for m in report["models"]:
        for view, s in m["results"][protocol]["views"].items():
            c = s.get("euler_comparable")
            if c:
                dec = str(c.get("decoding", "6drepnet")).split(":")[0]
                rows.append("| " + " | ".join([m["name"], view, str(c["n"]), _fmt(c["yaw"]),
                                               _fmt(c["pitch"]), _fmt(c["roll"]),
                                               _fmt(c["mean"]), dec]) + " |")
    if not rows:
        return []
    return [
        "### Published-comparable Euler MAE", "",
        "Ground truth = the dataset's own Euler triple (AFLW2000: `Pose_Para`, where yaw may "
        "exceed 90 deg), every evaluated image (N), the prediction's angles as the peers "
        "decode them (decoding `6drepnet`: decomposed from the matrix as 6DRepNet does; `bins`: "
        "a binned head's own angles in [-99, 99), as HopeNet's), differences wrapped by 360 "
        "only (docs/conventions.md section 7). "
        f"This figure {published_comparison(report.get('data'))}.", "",
        "| model | view | N | yaw | pitch | roll | mean | decoding |",
        "|---|---|---|---|---|---|---|---|",
        *rows, "",
    ]


def write_samples_csv(path: Path, per_protocol: dict[str, dict[str, SampleErrors]]) -> None:
    """One row per protocol x view x sample (``missed``: 1 where the predictor returned no
    rotation, scored as the frontal answer)."""
    with replacing(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["protocol", "view", "index", "geodesic", "maev", "err_right", "err_up",
                    "err_nose", *(f"{a}_{what}" for what in ("err", "true", "pred", "dataset")
                                  for a in EULER_AXES), "missed"])
        for p, views in per_protocol.items():
            for v, e in views.items():
                for i in range(len(e)):
                    w.writerow([p, v, int(e.index[i]), *(f"{x:.6f}" for x in (
                        e.geodesic[i], e.maev[i], *e.axis[i], *e.euler_err[i], *e.euler_true[i],
                        *e.euler_pred[i])),
                        *("" if math.isnan(x) else f"{x:.6f}" for x in e.euler_dataset[i]),
                        int(e.missed[i])])


def _canvas(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    with replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def write_figures(
    report: dict[str, Any], samples: dict[str, dict[str, dict[str, SampleErrors]]], out: Path
) -> list[Path]:
    """The PNG figures (module docstring); returns the paths written."""
    written: list[Path] = []
    protocols = report["protocols"]
    models = [m["name"] for m in report["models"]]

    # Error vs the true Euler angles, on the first protocol where Euler angles are meaningful.
    base = next((p for p in ("standard", "flipped", "rotated") if p in protocols), None)
    if base is not None:
        fig, axes = _canvas(1, 3, (13, 3.8))
        limits = {"yaw": 90.0, "pitch": 180.0, "roll": 180.0}
        for j, axis in enumerate(("yaw", "pitch", "roll")):
            ax, col = axes[0, j], EULER_AXES.index(axis)
            for name in models:
                views = samples[name][base]
                e = merge(list(views.values()),
                          offsets=[i * (1 + max(int(v.index.max()) for v in views.values()))
                                   for i in range(len(views))])
                x = e.euler_true[:, col]
                lim = max(limits[axis] if axis != "yaw" else 90.0, float(np.abs(x).max()))
                lim = min(180.0, math.ceil(lim / 10.0) * 10.0)
                edges = np.linspace(-lim, lim, 19)
                c, v, _ = binned_error(x, e.geodesic, edges, "median")
                ax.plot(c, v, marker="o", ms=3, label=name)
            ax.set_xlabel(f"true {axis} (deg)")
            ax.set_ylabel("median geodesic error (deg)")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"Error vs true Euler angles ({base} protocol)")
        path = out / "error_vs_euler.png"
        _save(fig, path)
        written.append(path)

    if "rotated" in protocols:
        fig, axes = _canvas(1, 1, (7, 4))
        ax = axes[0, 0]
        for m in report["models"]:
            res = m["results"]["rotated"]
            pts = [(res["view_params"][v]["angle"], s["geodesic"]["mean"], s["geodesic"]["median"])
                   for v, s in res["views"].items()]
            if "standard" in m["results"]:
                s = m["results"]["standard"]["pooled"]
                pts.append((0.0, s["geodesic"]["mean"], s["geodesic"]["median"]))
            # 180 and -180 are the same rotation: show it at both ends of the axis.
            pts += [(-180.0, a, b) for ang, a, b in pts if ang == 180.0]
            pts.sort()
            xs, mean, med = (np.array(t) for t in zip(*pts, strict=True))
            line = ax.plot(xs, mean, marker="o", label=f"{m['name']} mean")[0]
            ax.plot(xs, med, marker="x", ls="--", color=line.get_color(),
                    label=f"{m['name']} median")
        ax.set_xlabel("in-plane rotation of the image (deg, clockwise on screen)")
        ax.set_ylabel("geodesic error (deg)")
        ax.set_xticks(np.arange(-180, 181, 45))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / "error_vs_inplane.png"
        _save(fig, path)
        written.append(path)

    if "full_range" in protocols:
        path = out / "error_vs_upright.png"
        _error_vs_view(report, samples, "full_range", path)
        written.append(path)

    fig, axes = _canvas(1, len(protocols), (4.2 * len(protocols), 3.8))
    for j, p in enumerate(protocols):
        ax = axes[0, j]
        for name in models:
            views = samples[name][p]
            g = np.concatenate([v.geodesic for v in views.values()])
            t, share = cumulative_curve(g, max_deg=180.0, steps=721)
            ax.plot(t, share, label=name)
        ax.set_xscale("symlog", linthresh=10.0)
        ax.set_xlim(0, 180)
        ax.set_ylim(0, 1)
        ax.set_xlabel("geodesic error (deg)")
        ax.set_ylabel("share of samples")
        ax.set_title(p)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    path = out / "cumulative_error.png"
    _save(fig, path)
    written.append(path)
    return written


def _error_vs_view(report: dict[str, Any], samples: dict[str, dict[str, dict[str, SampleErrors]]],
                   protocol: str, path: Path) -> None:
    """Mean and median geodesic error against how far the true pose is from upright (tilt of
    the head's up axis) and from frontal (angle of the nose from the camera), 10 deg bins."""
    import torch

    from clerf.geometry import rotation_from_euler, view_angles

    fig, axes = _canvas(1, 2, (11, 3.8))
    edges = np.linspace(0.0, 180.0, 19)
    for m in report["models"]:
        views = samples[m["name"]][protocol]
        e = merge(list(views.values()),
                  offsets=[i * (1 + max(int(v.index.max()) for v in views.values()))
                           for i in range(len(views))])  # fmt: skip
        eu = torch.from_numpy(e.euler_true)
        R = rotation_from_euler(*eu.unbind(-1))
        for ax, x in zip(axes[0], view_angles(R), strict=True):
            c, mean, _ = binned_error(x.numpy(), e.geodesic, edges, "mean")
            _, med, _ = binned_error(x.numpy(), e.geodesic, edges, "median")
            line = ax.plot(c, mean, marker="o", ms=3, label=f"{m['name']} mean")[0]
            ax.plot(c, med, marker="x", ls="--", color=line.get_color(),
                    label=f"{m['name']} median")  # fmt: skip
    axes[0, 0].set_xlabel("tilt of the head's up axis (deg): 0 upright, 180 upside-down")
    axes[0, 1].set_xlabel("angle of the nose from the camera (deg): 0 frontal, 180 back of head")
    for ax in axes[0]:
        ax.set_ylabel("geodesic error (deg)")
        ax.set_xticks(np.arange(0, 181, 30))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Error against the angle from upright and from frontal ({protocol} protocol)")
    _save(fig, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(
    report: dict[str, Any],
    samples: dict[str, dict[str, dict[str, SampleErrors]]],
    out: str | Path,
    figures: bool = True,
) -> dict[str, Path]:
    """Write every report file into ``out``; returns ``{kind: path}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, per_protocol in samples.items():
        p = out / f"samples_{_safe(name)}.csv"
        write_samples_csv(p, per_protocol)
        paths[f"samples:{name}"] = p
    if figures:
        for p in write_figures(report, samples, out):
            paths[p.stem] = p
    paths["markdown"] = out / "report.md"
    write_text_atomic(paths["markdown"], markdown_report(report))
    paths["json"] = out / "report.json"
    write_text_atomic(paths["json"], json.dumps(report, indent=2, sort_keys=False) + "\n")
    return paths
