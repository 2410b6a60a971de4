"""CPU inference speed of a pose model: torch eager vs onnxruntime, in the same run.

Prints latency at batch 1 (median ms per call) and throughput at batch 32 (images/s, median
over repeats) for a random-init ``HeadPoseModel`` exported with ``clerf.inference.export``
(the same graph ``clerf export`` writes: normalisation, network, Gram-Schmidt / bin decoding and
Euler angles). Both runtimes use the same number of threads.

    python benchmarks/bench_export.py --arch resnet18 --size 64 --head rotation6d --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line); print it and return the figures:
    ``{"arch", "size", "head", "threads", "batch", "exporter", "export_s", "max_abs_diff",
    "runtimes": {name: {"latency_ms", "throughput_img_s"}}}``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    ap.add_argument("--size", type=int, default=64, help="input size (pixels)")
    ap.add_argument("--head", default="rotation6d", choices=["rotation6d", "binned", "both"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-repeats", type=int, default=5, help="timed calls at --batch")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from clerf.inference.export import PoseExportModule, export_onnx
    from clerf.inference.model import wrap_head_pose_model
    from clerf.models.encoder import Encoder, EncoderSpec
    from clerf.models.pose_model import HeadPoseModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = HeadPoseModel(Encoder(EncoderSpec(arch=args.arch, input_size=args.size)),
                        {"type": args.head}).eval()
    model = wrap_head_pose_model(net)
    module = PoseExportModule(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        res = export_onnx(model, path)
        export_s = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        g = torch.Generator().manual_seed(0)
        x1 = torch.rand(1, 3, args.size, args.size, generator=g)
        xb = torch.rand(args.batch, 3, args.size, args.size, generator=g)

        def torch_run(x):
            with torch.inference_mode():
                return module(x)

        def ort_run(x):
            return sess.run(None, {"images": x.numpy()})

        rows = []
        for name, fn in (("torch eager", torch_run), ("onnxruntime", ort_run)):
            lat = _time(lambda fn=fn: fn(x1), args.repeats)
            thr = _time(lambda fn=fn: fn(xb), args.batch_repeats, warmup=1)
            rows.append((name, 1000 * statistics.median(lat), args.batch / statistics.median(thr)))
        R_t = torch_run(xb)[0].numpy()
        R_o = ort_run(xb)[0]

    print(f"{args.arch} {args.size}px head={args.head}, {args.threads} threads, torch "
          f"{torch.__version__}, onnxruntime {ort.__version__}; export ({res['exporter']}) "
          f"{export_s:.1f} s; max |R_onnx - R_torch| at batch {args.batch}: "
          f"{float(np.abs(R_o - R_t).max()):.2g}")
    print(f"| runtime | latency batch 1 (ms, median of {args.repeats}) | "
          f"throughput batch {args.batch} (img/s, median of {args.batch_repeats}) |")
    print("|---|---|---|")
    for name, ms, ips in rows:
        print(f"| {name} | {ms:.2f} | {ips:.0f} |")
    return {"arch": args.arch, "size": args.size, "head": args.head, "threads": args.threads,
            "batch": args.batch, "exporter": res["exporter"], "export_s": export_s,
            "max_abs_diff": float(np.abs(R_o - R_t).max()),
            "runtimes": {name: {"latency_ms": ms, "throughput_img_s": ips}
                         for name, ms, ips in rows}}


if __name__ == "__main__":
    main()
