"""``benchmarks/run_all.py``: every benchmark runs (``--quick``) and lands in one numeric table."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"

# Every figure --quick must print, written out here independently of run_all's own code.
QUICK_FIGURES = [
    ("generator", "procedural generator, 64 px, batch 4", "img/s"),
    ("generator", "ResNet-18 training, 64 px, batch 4", "img/s"),
    ("generator", "generator / training, 64 px", "x"),
    ("generator", "procedural generator, 128 px, batch 4", "img/s"),
    ("generator", "ResNet-18 training, 128 px, batch 4", "img/s"),
    ("generator", "generator / training, 128 px", "x"),
    ("input_pipeline", "pretrain step, HDF5 + augmentation (32 px, 2 triplets/step)", "img/s"),
    ("input_pipeline", "pretrain step, in-memory tensors (32 px, 2 triplets/step)", "img/s"),
    ("input_pipeline", "input pipeline overhead", "%"),
    ("input_pipeline", "input pipeline alone (read + augment)", "img/s"),
    ("streaming", "fine-tune step, images in memory (32 px, batch 4)", "img/s"),
    ("streaming", "fine-tune step, HDF5 store (32 px, batch 4)", "img/s"),
    ("streaming", "fine-tune step, streamed in process (32 px, batch 4)", "img/s"),
    ("streaming", "fine-tune step, streamed in 1 worker(s) (32 px, batch 4)", "img/s"),
    ("streaming", "store overhead", "%"),
    ("streaming", "streaming overhead, in process", "%"),
    ("streaming", "streaming overhead, in workers", "%"),
    ("photometric", "saturation + hue, YIQ map (8 images, 32 px)", "ms"),
    ("photometric", "saturation + hue, kornia HSV (8 images, 32 px)", "ms"),
    ("photometric", "kornia HSV / YIQ", "x"),
    ("photometric", "photometric at defaults (8 images, 32 px)", "ms"),
    *[row for px in (64, 128) for comp in ("none", "lzf", "gzip") for row in (
        ("store", f"write, {px} px, {comp}", "img/s"),
        ("store", f"read, {px} px, {comp} (batch 8, 0 workers)", "img/s"),
        ("store", f"size, {px} px, {comp}", "MB/1k triplets"),
    )],
    ("export", "latency batch 1, torch eager", "ms"),
    ("export", "latency batch 1, onnxruntime", "ms"),
    ("export", "throughput batch 8, torch eager", "img/s"),
    ("export", "throughput batch 8, onnxruntime", "img/s"),
    ("export", "max abs difference of R, onnxruntime vs torch, batch 8", ""),
    ("prepare", "scan 300W-LP tree (labels + header check)", "img/s"),
    ("prepare", "prepare 300wlp, 64 px, 0 workers", "img/s"),
    *[row for step in ("0", "90") for row in (
        ("detect", f"face search, step {step} deg, 640x480", "ms"),
        ("detect", f"face found, step {step} deg (4 turns)", "%"),
    )],
    ("detect", "video, full search every frame", "fps"),
    ("detect", "video, previous faces searched first", "fps"),
    ("pipeline", "quickstart (tiny), end to end", "s"),
    # the quickstart streams its fine-tune data and has no pretrain stage
    *[("pipeline", f"stage {s}", "s") for s in ("generate", "finetune", "evaluate")],
]  # fmt: skip


def _load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _table_rows(stdout: str) -> list[list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert lines[0].split("|")[1:-1] and "section" in lines[0], stdout
    assert set(lines[1]) <= set("|-:"), lines[1]
    return [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:]]


@pytest.mark.slow
def test_run_all_quick_prints_every_figure_numeric(tmp_path):
    out = tmp_path / "figures.json"
    # One thread: on a shared 2-core CI runner, 2 OpenMP threads can be 30x slower when the
    # other core is busy (measured: ResNet-18 step 0.08 s with 1 thread, 2.8 s with 2).
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--quick", "--threads", "1",
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = proc.stdout.splitlines()[0]
    assert head.startswith("machine:") and "torch 2" in head and "1 threads" in head, head
    assert "device cpu" in head and "quick mode" in head, head

    rows = _table_rows(proc.stdout)
    got = {(r[0], r[1]): r for r in rows}
    assert len(got) == len(rows), "a figure appears twice"
    for section, figure, unit in QUICK_FIGURES:
        assert (section, figure) in got, f"missing row {section} / {figure}:\n{proc.stdout}"
        value = float(got[section, figure][2])  # numeric, or ValueError
        assert math.isfinite(value), (figure, value)
        # an overhead (%) is a difference of two noisy timings and may come out negative
        assert unit == "%" or value >= 0, (figure, value)
        assert got[section, figure][3] == unit, (figure, got[section, figure][3])
    # the two export rows whose names carry run details (exporter, size) and the ratios
    assert any(r[0] == "export" and r[1].startswith("ONNX export (") for r in rows)
    assert len(rows) == len(QUICK_FIGURES) + 1, [r[:2] for r in rows]
    # onnxruntime reproduces the torch model (rotation entries, float32)
    assert float(got["export", "max abs difference of R, onnxruntime vs torch, batch 8"][2]) < 1e-3
    ratio = got["generator", "generator / training, 64 px"]
    assert ratio[4] == ">= 3", ratio  # targets shown, not judged on quick sizes

    doc = json.loads(out.read_text())
    assert doc["machine"]["mode"] == "quick" and doc["machine"]["torch_threads"] == 1
    assert [(r["section"], r["figure"]) for r in doc["rows"]] == [(r[0], r[1]) for r in rows]
    for r, t in zip(doc["rows"], rows, strict=True):
        assert math.isclose(r["value"], float(t[2]), rel_tol=0.06, abs_tol=0.006), (r, t)
    assert all(s["error"] is None for s in doc["sections"].values())
    assert "clerf.cli pipeline" in doc["sections"]["pipeline"]["output"]


def test_skip_everything_prints_an_empty_table_and_bad_names_fail(tmp_path):
    names = ["generator", "input_pipeline", "streaming", "photometric", "store", "export",
             "prepare", "detect", "pipeline"]
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--quick", "--skip", *names],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _table_rows(proc.stdout) == []
    proc = subprocess.run([sys.executable, str(RUN_ALL), "--skip", "gpu"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--skip" in proc.stderr and "gpu" in proc.stderr


def test_targets_and_value_formatting():
    ra = _load_run_all()
    assert ra.Row("s", "f", 3.0, "x", ">= 3").met() is True
    assert ra.Row("s", "f", 2.99, "x", ">= 3").met() is False
    assert ra.Row("s", "f", 10.5, "%", "<= 10").met() is False
    assert ra.Row("s", "f", -4.0, "%", "<= 10").met() is True
    assert ra.Row("s", "f", 1.0, "s").met() is None
    for v in (0.0, 4.2e-07, 0.0123, 3.14159, 42.42, 1234.6, -5.5):
        assert math.isclose(float(ra.fmt_value(v)), v, rel_tol=0.06, abs_tol=0.006), v
    text = ra.table([ra.Row("a", "b", 2.0, "x", ">= 3"), ra.Row("a", "c", 5.0, "ms")])
    assert re.search(r"\| a +\| b +\| +2\.00 \| x +\| >= 3 \(MISSED\) \|", text), text
    assert "(met)" not in ra.table([ra.Row("a", "b", 4.0, "x", ">= 3")], judge=False)


def test_backbone_benchmark_prints_one_row_per_backbone():
    """``benchmarks/bench_backbones.py`` (the images/s column of docs/components.md's backbone
    table): one row per architecture with its pooled width and a positive training speed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_backbones.py"), "--archs", "resnet18",
         "repvgg_a0", "--size", "32", "--batch", "2", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "CPU capability" in proc.stdout
    rows = {m.group(1): (int(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^(\S+) +[\d.]+ +(\d+) +([\d.]+)$", proc.stdout, re.MULTILINE)}  # fmt: skip
    assert set(rows) == {"resnet18", "repvgg_a0"}, proc.stdout
    assert rows["resnet18"][0] == 512 and rows["repvgg_a0"][0] == 1280
    assert all(speed > 0 for _, speed in rows.values())
