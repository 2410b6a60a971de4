"""``clerf predict`` over images and videos: every face, JSON and CSV records, annotated files."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clerf.errors import DataError
from clerf.files import replacing, write_text_atomic
from clerf.inference.detect import BoxMapping, FaceDetector
from clerf.inference.model import PoseModel
from clerf.inference.predict import FacePose, FacePredictor, annotate, collect_inputs, read_image
from clerf.inference.video import predict_video

__all__ = ["CSV_FIELDS", "run_predict"]


CSV_FIELDS = ["file", "frame", "face", "x", "y", "w", "h", "score", "angle", "pitch", "yaw", "roll",
              *(f"r{i}{j}" for i in range(3) for j in range(3))]


def _write_outputs(out: Path, record: dict[str, Any], faces: list[FacePose]) -> None:
    write_text_atomic(out / "predictions.json", json.dumps(record, indent=2) + "\n")
    with replacing(out / "predictions.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for f in faces:
            w.writerow([f.file, "" if f.frame is None else f.frame, f.face,
                        *(f"{v:.1f}" for v in f.box.as_list()),
                        "" if f.box.score is None else f"{f.box.score:.3f}",
                        f"{f.box.angle:.2f}",
                        f"{f.pitch:.4f}", f"{f.yaw:.4f}", f"{f.roll:.4f}",
                        *(f"{v:.6f}" for v in f.rotation.reshape(-1))])


def _unique_names(paths: Sequence[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:04d}_{s}" for i, s in enumerate(stems)]


def run_predict(
    model: PoseModel,
    inputs: Sequence[str | Path],
    out: str | Path,
    detector: FaceDetector,
    crop_preset: str | None = None,
    mapping: BoxMapping | None = None,
    refine: int = 0,
    annotate_outputs: bool = True,
    max_frames: int = 0,
    log: Callable[[str], None] = print,
    smooth: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Predict every face of every input; write JSON, CSV and annotated files into ``out``.

    Inputs are all checked (exist, known type) before any work. An input with no face gets the
    status ``"no face found"`` (and a message through ``log``), not an error; an unreadable file
    is a :class:`DataError` naming it.

    Returns:
        The ``predictions.json`` record: ``{"inputs": [...], "faces": [...], "settings": ...}``.
    """
    from clerf.drawing import save_png

    items = collect_inputs(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} exists and is not a directory")
    predictor = FacePredictor(model, detector, crop_preset, mapping, refine=refine)
    names = _unique_names([p for p, _ in items])
    # Folders appear with the first file written into them: a failed run leaves none behind.
    faces: list[FacePose] = []
    records = []
    for (path, kind), name in zip(items, names, strict=True):
        rec: dict[str, Any] = {"file": str(path), "kind": kind}
        if kind == "image":
            image = read_image(path)
            found = predictor(image, str(path))
            rec["size"] = [int(image.shape[1]), int(image.shape[0])]
            if annotate_outputs:
                target = out / "annotated" / f"{name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                save_png(target, annotate(image, found))
                rec["annotated"] = str(target)
        else:
            target = out / "annotated" / f"{name}.mp4" if annotate_outputs else None
            t0 = time.perf_counter()
            found, frames = predict_video(predictor, path, target, max_frames=max_frames,
                                          smooth=smooth)  # fmt: skip
            rec["frames"] = frames
            rec["fps"] = frames / max(time.perf_counter() - t0, 1e-9)
            if target is not None:
                rec["annotated"] = str(target)
        rec["faces"] = len(found)
        rec["status"] = "ok" if found else "no face found"
        if not found:
            log(f"predict: {path}: no face found")
        faces.extend(found)
        records.append(rec)
    record = {"inputs": records, "faces": [f.as_dict() for f in faces],
              "settings": {**predictor.describe(), "model": model.describe(),
                           "smooth": smooth},
              "conventions": "rotation rows = head axes (right, up, nose) in camera coordinates "
                             "(x right, y up, z toward the viewer); pitch, yaw, roll in degrees, "
                             "R = Rz(roll) @ Ry(yaw) @ Rx(pitch)"}
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, record, faces)
    return record
