"""Every performance figure of clerf in one table: runs all the benchmark scripts in one process.

    .venv/bin/python benchmarks/run_all.py [--quick] [--threads N] [--device cpu|cuda]
        [--skip SECTION ...] [--json PATH] [--verbose]

Sections (see ``benchmarks/README.md`` for what each figure means):

* ``generator``: procedural generator images/s vs ResNet-18 training images/s (bench_generator.py)
* ``input_pipeline``: pretraining steps fed by HDF5 + augmentation vs in-memory tensors
  (bench_input_pipeline.py)
* ``photometric``: clerf's YIQ saturation/hue map vs kornia's HSV functions, ms per batch
  (bench_photometric.py)
* ``store``: HDF5 triplet store write/read images/s and MB per 1,000 triplets (bench_store.py)
* ``export``: onnxruntime vs torch eager latency and throughput (bench_export.py)
* ``prepare``: real-data conversion images/s on a generated 300W-LP-like tree (bench_prepare.py)
* ``detect``: face search at any in-plane angle, ms per 640 x 480 photo and detection rate per
  angle step, video frames/s with and without tracking (bench_detect.py)
* ``pipeline``: wall time of ``clerf pipeline configs/quickstart.yaml --out TMP`` end to end,
  measured here in a subprocess (what a user waits for, interpreter start-up included)

Full mode runs every script with its own defaults (the figures the scripts document; the
quickstart pipeline alone takes several minutes on a 2-core CPU). ``--quick`` uses tiny sizes to
check that everything runs (well under a minute): its figures are NOT comparable to full ones.

Every section uses the same torch thread count (``--threads``, default: all usable cores). Each
section's own output is kept (``--verbose`` shows it live, ``--json`` saves it with the
figures). A failing section is reported as such and the others still run; the exit status is 1
if any section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the bench_* modules, when imported from elsewhere (tests)
    sys.path.insert(0, str(BENCH))

SECTIONS = ("generator", "input_pipeline", "streaming", "photometric", "store", "export",
            "prepare", "detect", "pipeline")

#: the quickstart made tiny for --quick (same config and stages, 32 px, a few steps per stage)
QUICK_PIPELINE = [
    "generator.resolution=32", "encoder.input_size=32", "triplets.count=12",
    "pipeline.test_count=6", "store.chunk_images=18", "pretrain.val_size=12",
    "pretrain.train.batch_size=6", "finetune.train.batch_size=12", "finetune.train.epochs=1",
    "finetune.stream.epoch_size=24",
    "evaluate.protocols=[standard]", "evaluate.full_range_n=8", "evaluate.figures=false",
]


@dataclass
class Row:
    """One figure of the table. ``target`` is a comparison such as ``>= 3`` (or empty)."""

    section: str
    figure: str
    value: float
    unit: str
    target: str = ""

    def met(self) -> bool | None:
        """Whether ``value`` meets ``target`` (None when there is no target)."""
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


# --------------------------------------------------------------------------- sections
# Each section takes the parsed options and returns its rows; the bench_* modules print their
# own tables (captured) and return their figures as a dict.


def sec_generator(o: argparse.Namespace) -> list[Row]:
    import bench_generator

    argv = ["--device", o.device, "--threads", str(o.threads)]
    if o.quick:
        argv += ["--batch", "4", "--train-batch", "4", "--repeats", "1"]
    r = bench_generator.main(argv)
    rows = []
    for x in r["rows"]:
        px = x["px"]
        rows += [
            Row("generator", f"procedural generator, {px} px, batch {r['batch']}",
                x["generator_img_s"], "img/s"),
            Row("generator", f"ResNet-18 training, {px} px, batch {r['train_batch']}",
                x["train_img_s"], "img/s"),
            Row("generator", f"generator / training, {px} px", x["ratio"], "x", ">= 3"),
        ]  # fmt: skip
    return rows


def sec_input_pipeline(o: argparse.Namespace) -> list[Row]:
    import bench_input_pipeline

    argv = ["--device", o.device, "--threads", str(o.threads)]
    if o.quick:
        argv += ["--size", "32", "--triplets", "8", "--batch", "2", "--rounds", "1",
                 "--steps", "1"]
    r = bench_input_pipeline.main(argv)
    what = f"{r['size']} px, {r['batch']} triplets/step"
    s = "input_pipeline"
    return [
        Row(s, f"pretrain step, HDF5 + augmentation ({what})", r["real_img_s"], "img/s"),
        Row(s, f"pretrain step, in-memory tensors ({what})", r["memory_img_s"], "img/s"),
        Row(s, "input pipeline overhead", r["overhead_pct"], "%", "<= 10"),
        Row(s, "input pipeline alone (read + augment)", r["input_only_img_s"], "img/s"),
    ]


def sec_streaming(o: argparse.Namespace) -> list[Row]:
    import bench_streaming

    argv = ["--device", o.device, "--threads", str(o.threads)]
    if o.quick:
        argv += ["--size", "32", "--batch", "4", "--rounds", "1", "--steps", "1"]
    r = bench_streaming.main(argv)
    what = f"{r['size']} px, batch {r['batch']}"
    s = "streaming"
    return [
        Row(s, f"fine-tune step, images in memory ({what})", r["memory_img_s"], "img/s"),
        Row(s, f"fine-tune step, HDF5 store ({what})", r["store_img_s"], "img/s"),
        Row(s, f"fine-tune step, streamed in process ({what})", r["stream_img_s"], "img/s"),
        Row(s, f"fine-tune step, streamed in {r['workers']} worker(s) ({what})",
            r["stream_workers_img_s"], "img/s"),
        Row(s, "store overhead", r["store_overhead_pct"], "%"),
        Row(s, "streaming overhead, in process", r["stream_overhead_pct"], "%", "<= 10"),
        Row(s, "streaming overhead, in workers", r["stream_workers_overhead_pct"], "%", "<= 10"),
    ]  # fmt: skip


def sec_photometric(o: argparse.Namespace) -> list[Row]:
    import bench_photometric

    argv = ["--device", o.device, "--threads", str(o.threads)]
    if o.quick:
        argv += ["--size", "32", "--batch", "8", "--rounds", "1", "--repeat", "1"]
    r = bench_photometric.main(argv)
    what = f"{r['batch']} images, {r['size']} px"
    s = "photometric"
    return [
        Row(s, f"saturation + hue, YIQ map ({what})", r["yiq_ms"], "ms"),
        Row(s, f"saturation + hue, kornia HSV ({what})", r["hsv_ms"], "ms"),
        Row(s, "kornia HSV / YIQ", r["ratio"], "x"),
        Row(s, f"photometric at defaults ({what})", r["photometric_ms"], "ms"),
    ]


def sec_store(o: argparse.Namespace) -> list[Row]:
    import bench_store

    argv = ["--triplets", "32", "--workers", "0", "--batch", "8"] if o.quick else []
    r = bench_store.main(argv)
    rows = []
    for x in r["rows"]:
        what = f"{x['px']} px, {x['compression']}"
        rows += [
            Row("store", f"write, {what}", x["write_img_s"], "img/s"),
            Row("store", f"read, {what} (batch {r['batch']}, {r['workers']} workers)",
                x["read_img_s"], "img/s"),
            Row("store", f"size, {what}", x["mb_per_1k_triplets"], "MB/1k triplets"),
        ]  # fmt: skip
    return rows


def sec_export(o: argparse.Namespace) -> list[Row]:
    import bench_export

    argv = ["--threads", str(o.threads)]
    if o.quick:
        argv += ["--size", "32", "--repeats", "3", "--batch", "8", "--batch-repeats", "1"]
    r = bench_export.main(argv)
    rows = []
    for name, x in r["runtimes"].items():
        rows.append(Row("export", f"latency batch 1, {name}", x["latency_ms"], "ms"))
    for name, x in r["runtimes"].items():
        rows.append(Row("export", f"throughput batch {r['batch']}, {name}",
                        x["throughput_img_s"], "img/s"))  # fmt: skip
    rows += [
        Row("export", f"max abs difference of R, onnxruntime vs torch, batch {r['batch']}",
            r["max_abs_diff"], ""),
        Row("export", f"ONNX export ({r['exporter']}), {r['arch']} {r['size']} px",
            r["export_s"], "s"),
    ]  # fmt: skip
    return rows


def sec_prepare(o: argparse.Namespace) -> list[Row]:
    import bench_prepare

    argv = ["--threads", str(o.threads)]
    if o.quick:
        argv += ["--n", "16", "--resolutions", "64", "--workers", "0"]
    r = bench_prepare.main(argv)
    rows = [Row("prepare", "scan 300W-LP tree (labels + header check)", r["scan_img_s"],
                "img/s")]  # fmt: skip
    for x in r["rows"]:
        rows.append(Row("prepare", f"prepare 300wlp, {x['px']} px, {x['workers']} workers",
                        x["img_s"], "img/s"))  # fmt: skip
    return rows


def sec_detect(o: argparse.Namespace) -> list[Row]:
    import bench_detect

    # the full run measures what docs/evaluate_predict_export.md reports (12 turns, 6 frames):
    # bench_detect's own defaults (24 turns, 12 frames) are 120 searches of a few seconds each
    # at step 15, over ten minutes on a 2-core CPU
    argv = ["--steps", "0", "90", "--test-step", "90", "--repeats", "1", "--frames", "3"] \
        if o.quick else ["--test-step", "30", "--repeats", "1", "--frames", "6"]
    r = bench_detect.main(argv)
    rows = []
    for x in r["rows"]:
        rows += [
            Row("detect", f"face search, step {x['step']:g} deg, 640x480", x["ms"], "ms"),
            Row("detect", f"face found, step {x['step']:g} deg ({r['turns']} turns)",
                100 * x["rate"], "%"),
        ]  # fmt: skip
    rows += [
        Row("detect", "video, full search every frame", r["video_full_fps"], "fps"),
        Row("detect", "video, previous faces searched first", r["video_tracked_fps"], "fps"),
    ]  # fmt: skip
    return rows


def sec_pipeline(o: argparse.Namespace) -> list[Row]:
    """``clerf pipeline configs/quickstart.yaml`` in a subprocess, timed end to end."""
    overrides = list(QUICK_PIPELINE) if o.quick else []
    if o.device == "cpu":  # keep every stage on the CPU even where an accelerator exists
        overrides += ["generator.device=cpu", "pretrain.train.cpu=true",
                      "finetune.train.cpu=true", "evaluate.cpu=true"]  # fmt: skip
    else:
        overrides += [f"generator.device={o.device}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(o.threads), "MKL_NUM_THREADS": str(o.threads)}
    with tempfile.TemporaryDirectory(prefix="clerf_bench_pipeline_") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "clerf.cli", "pipeline", str(ROOT / "configs/quickstart.yaml"),
               "--out", str(out), "--no-progress", *overrides]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(proc.stdout + proc.stderr, end="", flush=True)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"clerf pipeline exited with {proc.returncode}: {tail[0]}")
        timings = json.loads((out / "timings.json").read_text())
    # the full quickstart must finish within 10 minutes on a 2-core CPU (issue 9)
    rows = [Row("pipeline", "quickstart" + (" (tiny)" if o.quick else "") + ", end to end",
                wall, "s", "" if o.quick else "<= 900")]  # fmt: skip
    for stage, seconds in timings.items():
        rows.append(Row("pipeline", f"stage {stage}", seconds, "s"))
    return rows


RUNNERS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "generator": sec_generator,
    "input_pipeline": sec_input_pipeline,
    "streaming": sec_streaming,
    "photometric": sec_photometric,
    "store": sec_store,
    "export": sec_export,
    "prepare": sec_prepare,
    "detect": sec_detect,
    "pipeline": sec_pipeline,
}


# --------------------------------------------------------------------------- machine and table


def machine(o: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = o.device
    if o.device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(torch.device(o.device))})"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": device, "python": platform.python_version(),
            "platform": platform.platform(), "commit": commit or None,
            "mode": "quick" if o.quick else "full"}  # fmt: skip


def fmt_value(v: float) -> str:
    """Three significant figures at least, no exponent for ordinary magnitudes."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.2f}"
    return f"{v:.2g}"


def table(rows: list[Row], judge: bool = True) -> str:
    """A Markdown table (readable as plain text too); ``judge``: say whether targets are met."""
    head = ["section", "figure", "value", "unit", "target"]
    body = []
    for r in rows:
        met = r.met() if judge else None
        target = r.target + ("" if met is None else " (met)" if met else " (MISSED)")
        body.append([r.section, r.figure, fmt_value(r.value), r.unit, target])
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w[i]) if i == 2 else c.ljust(w[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join("-" * (n + 1) + ":" if i == 2 else "-" * (n + 2)
                         for i, n in enumerate(w)) + "|"  # fmt: skip
    return "\n".join([line(head), sep, *(line(b) for b in body)])


class _Tee(io.TextIOBase):
    """Write to several text streams (the captured log and, with --verbose, the terminal)."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes: checks that every benchmark runs (figures not comparable)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for every section (default: all usable cores)")
    ap.add_argument("--device", default="cpu",
                    help="device for the generator, input-pipeline and pipeline sections")
    ap.add_argument("--skip", nargs="+", action="extend", default=[], choices=SECTIONS,
                    metavar="SECTION", help=f"sections to leave out ({', '.join(SECTIONS)})")
    ap.add_argument("--json", default="", metavar="PATH",
                    help="also save machine, figures and each section's output as JSON")
    ap.add_argument("--verbose", action="store_true", help="show each section's output live")
    o = ap.parse_args(argv)

    import torch

    if o.threads < 0:
        ap.error(f"--threads must be >= 0, got {o.threads}")
    if not o.threads:
        try:
            o.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            o.threads = os.cpu_count() or 1
    torch.set_num_threads(o.threads)
    info = machine(o)
    print(f"machine: {info['cpu']}; {info['cpu_count']} CPUs ({info['usable_cpus']} usable); "
          f"torch {info['torch']}, {info['torch_threads']} threads; device {info['device']}; "
          f"python {info['python']}; {info['mode']} mode"
          + (f"; commit {info['commit']}" if info["commit"] else ""), flush=True)  # fmt: skip

    rows: list[Row] = []
    sections: dict[str, dict[str, Any]] = {}
    failed = []
    for name in SECTIONS:
        if name in o.skip:
            continue
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        log = io.StringIO()
        sink = _Tee(log, sys.stdout) if o.verbose else log
        t0 = time.perf_counter()
        error = None
        try:
            with contextlib.redirect_stdout(sink):
                got = RUNNERS[name](o)
            torch.set_num_threads(o.threads)  # a script may have changed it; not the next one
        except Exception as e:  # one broken section must not hide the others' figures
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc(file=log)
            got = []
            failed.append(name)
        seconds = time.perf_counter() - t0
        rows += got
        sections[name] = {"seconds": seconds, "error": error, "output": log.getvalue()}
        status = f"FAILED ({error})" if error else f"done in {seconds:.1f} s"
        print(f"[{name}] {status}", file=sys.stderr, flush=True)
        if error and not o.verbose:
            print(log.getvalue(), file=sys.stderr, end="", flush=True)

    # quick figures come from tiny batches: comparing them with the targets would mislead
    print(table(rows, judge=not o.quick))
    for name in failed:
        print(f"section {name} FAILED: {sections[name]['error']}")
    if o.json:
        path = Path(o.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "machine": info,
            "argv": sys.argv[1:] if argv is None else argv,
            "rows": [{**asdict(r), "met": None if o.quick else r.met()} for r in rows],
            "sections": sections,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"figures saved to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
