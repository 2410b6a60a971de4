"""A label-free consistency protocol on real photos (``clerf evaluate MODEL --consistency ...``).

Labelled real data is rarely at hand, but CLERF's claim (robust to in-plane rotations and flips)
can be measured on any face images: predict on the original and on copies turned by known angles
and mirrored, compose each prediction back with the exact rules of the geometry core
(``docs/conventions.md`` section 3), and report the geodesic **disagreement** with the
prediction on the original (degrees: mean, median, p90 per view). A perfectly consistent model
scores 0 whatever its accuracy; a model that ignores the turn scores about the turn angle.

* ``turn phi``: the image turned by ``phi`` deg clockwise on screen; its prediction ``R_v``
  is taken back with ``rotate_inplane(R_v, -phi)``.
* ``hflip`` / ``vflip``: the mirrored image; the rules are involutions, so ``hflip_rotation(R_v)``
  / ``vflip_rotation(R_v)`` take it back.

Two modes:

* **photos** (default): the whole pipeline of ``clerf predict`` (face search at any angle,
  verification, upright crop, composition) on each transformed photo. The face of a view is the
  detection nearest to where the original face lands under the known transform (within a
  quarter of its size); a face not found there counts in ``found``, not in the figures.
* **crops** (``--crops``): each input is one face crop; it is resized to the model's input and
  the views are the evaluation protocols' own (:class:`clerf.evaluation.protocols.View`, the
  training warp about the centre, black corners), so no detector is involved.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clerf.errors import ConfigError, DataError
from clerf.geometry import geodesic_distance, hflip_rotation, rotate_inplane, vflip_rotation

__all__ = [
    "DEFAULT_TURNS",
    "ConsistencyView",
    "consistency_views",
    "undo",
    "transform_photo",
    "photo_disagreements",
    "crop_disagreements",
    "summarize_disagreements",
    "run_consistency",
]

#: every 15 deg, which holds the rotated protocol's default sweep (+-15, +-30, +-60, +-90, 180)
DEFAULT_TURNS: tuple[float, ...] = tuple(float(a) for a in range(-165, 181, 15))


@dataclass(frozen=True)
class ConsistencyView:
    """A turn by ``angle`` deg clockwise, or a flip (``"h"``, ``"v"``)."""

    name: str
    angle: float | None = None
    flip: str | None = None


def consistency_views(turns: Sequence[float] = DEFAULT_TURNS, flips: bool = True
                      ) -> list[ConsistencyView]:
    """One view per non-zero turn (``rot+15`` ...) plus ``hflip`` and ``vflip``.

    Raises:
        ConfigError: no view, or a turn given twice.
    """
    from clerf.geometry import wrap180

    turns = [wrap180(a) for a in turns if wrap180(a) != 0.0]
    if len(set(turns)) != len(turns):
        raise ConfigError(f"--angles: a turn is given twice (modulo 360) in {list(turns)}")
    views = [ConsistencyView(f"rot{a:+g}", angle=a) for a in turns]
    if flips:
        views += [ConsistencyView("hflip", flip="h"), ConsistencyView("vflip", flip="v")]
    if not views:
        raise ConfigError("--angles: the consistency protocol needs at least one view")
    return views


def undo(view: ConsistencyView, R: torch.Tensor) -> torch.Tensor:
    """The prediction on a view taken back to the original image's frame (exact rules)."""
    if view.angle is not None:
        return rotate_inplane(R, -float(view.angle))
    return hflip_rotation(R) if view.flip == "h" else vflip_rotation(R)


def transform_photo(image: np.ndarray, view: ConsistencyView
                    ) -> tuple[np.ndarray, Callable[[float, float], tuple[float, float]]]:
    """The transformed photo and the map of an original pixel to its place in it."""
    from clerf.inference.search import turn_image

    h, w = image.shape[:2]
    if view.angle is not None:
        out, M = turn_image(image, view.angle)
        return out, lambda x, y: tuple(M[:, :2] @ np.array([x, y]) + M[:, 2])
    if view.flip == "h":
        return np.ascontiguousarray(image[:, ::-1]), lambda x, y: (w - 1 - x, y)
    return np.ascontiguousarray(image[::-1]), lambda x, y: (x, h - 1 - y)


def photo_disagreements(predictor: Any, image: np.ndarray, views: Sequence[ConsistencyView],
                        source: str = "image") -> list[dict[str, Any]]:
    """Rows ``{face, view, found, disagreement}`` for every face of the original photo and every
    view (``predictor``: a :class:`clerf.inference.predict.FacePredictor`)."""
    base = predictor(image, source)
    rows = []
    for view in views:
        img_v, where = transform_photo(image, view)
        faces_v = predictor(img_v, source)
        for f in base:
            cx, cy = where(f.box.x + f.box.w / 2, f.box.y + f.box.h / 2)
            best, dist = None, 0.25 * max(f.box.w, f.box.h)
            for g in faces_v:
                d = float(np.hypot(g.box.x + g.box.w / 2 - cx, g.box.y + g.box.h / 2 - cy))
                if d <= dist:
                    best, dist = g, d
            row: dict[str, Any] = {"file": source, "face": f.face, "view": view.name,
                                   "found": best is not None, "disagreement": None}
            if best is not None:
                R_back = undo(view, torch.as_tensor(best.rotation, dtype=torch.float64))
                row["disagreement"] = float(geodesic_distance(
                    R_back, torch.as_tensor(f.rotation, dtype=torch.float64)))
            rows.append(row)
    return rows


def crop_disagreements(model: Any, crops: Sequence[np.ndarray], names: Sequence[str],
                       views: Sequence[ConsistencyView]) -> list[dict[str, Any]]:
    """Rows for face crops (``(H, W, 3)`` uint8 each): each crop resized to the model's input
    (:func:`clerf.data.crop.resize_square`), views by :class:`clerf.evaluation.protocols.View`."""
    from clerf.data.crop import resize_square
    from clerf.evaluation.protocols import View

    if not crops:
        return []
    x = torch.from_numpy(np.stack([resize_square(np.ascontiguousarray(c), model.input_size,
                                                 model.resize_mode) for c in crops]))
    x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0).to(model.device)
    eye = torch.eye(3, dtype=torch.float64, device=model.device).expand(len(crops), 3, 3)
    with torch.inference_mode():
        R0 = model.forward_rotations(x).double()
        rows = []
        for view in views:
            v = View("consistency", view.name, angle=view.angle, flip=view.flip)
            x_v, _ = v.apply(x, eye)
            R_back = undo(view, model.forward_rotations(x_v).double())
            d = geodesic_distance(R_back, R0).cpu()
            rows += [{"file": n, "face": 0, "view": view.name, "found": True,
                      "disagreement": float(d[i])} for i, n in enumerate(names)]
    return rows


def summarize_disagreements(rows: Sequence[dict[str, Any]], views: Sequence[ConsistencyView]
                            ) -> dict[str, Any]:
    """Per view and pooled: ``n`` faces, ``found``, ``mean``, ``median``, ``p90`` (deg)."""

    def stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
        d = np.array([r["disagreement"] for r in sel if r["found"]], dtype=np.float64)
        out: dict[str, Any] = {"n": len(sel), "found": int(d.size)}
        for k, f in (("mean", np.mean), ("median", np.median),
                     ("p90", lambda a: np.percentile(a, 90))):
            out[k] = float(f(d)) if d.size else None
        return out

    per = {v.name: stats([r for r in rows if r["view"] == v.name]) for v in views}
    turns = [r for r in rows if r["view"].startswith("rot")]
    flips = [r for r in rows if not r["view"].startswith("rot")]
    return {"views": per, "turns": stats(turns), "flips": stats(flips), "all": stats(list(rows))}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _markdown(results: list[dict[str, Any]], views: Sequence[ConsistencyView]) -> str:
    lines = ["# Consistency (label-free): geodesic disagreement with the original's prediction",
             "", "Degrees; each view's prediction composed back with the exact rules "
             "(docs/conventions.md section 3).", "",
             "| model | faces | turns mean | turns median | turns p90 | flips mean | "
             "found |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['name']} | {r['faces']} | {_fmt(s['turns']['mean'])} | "
                     f"{_fmt(s['turns']['median'])} | {_fmt(s['turns']['p90'])} | "
                     f"{_fmt(s['flips']['mean'])} | {s['all']['found']}/{s['all']['n']} |")
    lines += ["", "Per view (mean / median / p90, found):", "",
              "| view | " + " | ".join(r["name"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for v in views:
        cells = []
        for r in results:
            s = r["summary"]["views"][v.name]
            cells.append(f"{_fmt(s['mean'])} / {_fmt(s['median'])} / {_fmt(s['p90'])} "
                         f"({s['found']}/{s['n']})")
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(results: list[dict[str, Any]], views: Sequence[ConsistencyView], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    turns = sorted((v for v in views if v.angle is not None), key=lambda v: v.angle)
    for r in results:
        xs = [0.0] + [v.angle for v in turns]
        means = [0.0] + [r["summary"]["views"][v.name]["mean"] for v in turns]
        p90 = [0.0] + [r["summary"]["views"][v.name]["p90"] for v in turns]
        order = np.argsort(xs)
        xs_o = np.array(xs)[order]
        line = ax.plot(xs_o, [np.nan if means[i] is None else means[i] for i in order],
                       marker="o", label=f"{r['name']} mean")[0]
        ax.plot(xs_o, [np.nan if p90[i] is None else p90[i] for i in order], ls="--",
                color=line.get_color(), label=f"{r['name']} p90")
    ax.set_xlabel("in-plane turn of the image (deg, clockwise)")
    ax.set_ylabel("disagreement with the original (deg)")
    ax.set_title("Label-free consistency: prediction composed back vs original")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_consistency(models: Sequence[str], inputs: Sequence[str], out: str | Path,
                    names: Sequence[str] | None = None, turns: Sequence[float] = DEFAULT_TURNS,
                    crops: bool = False, detector_factory: Callable[[], Any] | None = None,
                    device: str = "cpu", figures: bool = True, refine: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The protocol for every model; writes ``consistency.json``, ``consistency.md``,
    ``consistency_rows.csv`` and ``consistency.png`` into ``out``.

    Raises:
        DataError: an input is missing, unreadable or of an unknown type (videos are refused).
        ConfigError: bad turns, or ``names`` of the wrong length.
    """
    from clerf.inference.model import load_pose_model
    from clerf.inference.predict import FacePredictor, collect_inputs, read_image

    views = consistency_views(turns)
    items = collect_inputs(inputs)
    videos = [str(p) for p, k in items if k != "image"]
    if videos:
        raise DataError(f"--consistency: {videos[0]} is a video; give images or folders")
    if names and len(names) != len(models):
        raise ConfigError(f"--name: {len(names)} name(s) for {len(models)} model(s)")
    images = [(str(p), read_image(p)) for p, _ in items]  # every file checked before any work
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    results, all_rows = [], []
    for i, path in enumerate(models):
        model = load_pose_model(path, device=device)
        name = names[i] if names else Path(path).name
        if crops:
            rows = crop_disagreements(model, [im for _, im in images], [n for n, _ in images],
                                      views)
            faces = len(images)
        else:
            if detector_factory is None:
                raise ConfigError("consistency on photos needs a detector")
            predictor = FacePredictor(model, detector_factory(), refine=refine)
            rows, faces = [], 0
            for src, im in images:
                r = photo_disagreements(predictor, im, views, src)
                if not r:
                    log(f"consistency: {src}: no face found")
                faces += len({row["face"] for row in r})
                rows += r
        summary = summarize_disagreements(rows, views)
        results.append({"name": name, "model": str(path), "faces": faces, "summary": summary})
        all_rows += [{"model": name, **r} for r in rows]
        s = summary["turns"]
        log(f"consistency: {name}: {faces} face(s); turns mean {_fmt(s['mean'])} deg, "
            f"median {_fmt(s['median'])}, p90 {_fmt(s['p90'])}; flips mean "
            f"{_fmt(summary['flips']['mean'])} deg")
    report = {"mode": "crops" if crops else "photos", "refine": refine,
              "inputs": [n for n, _ in images], "views": [v.__dict__ for v in views],
              "models": results}
    (out / "consistency.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "consistency.md").write_text(_markdown(results, views))
    with (out / "consistency_rows.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["model", "file", "face", "view", "found", "disagreement"])
        w.writeheader()
        w.writerows(all_rows)
    if figures:
        _figure(results, views, out / "consistency.png")
    return report
