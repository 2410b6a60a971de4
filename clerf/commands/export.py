"""``clerf export MODEL --format onnx --out FILE``: ONNX export checked with onnxruntime."""

from __future__ import annotations

import argparse


def register(subparsers, parents) -> None:
    p = subparsers.add_parser(
        "export",
        parents=parents,
        help="export a pose model to ONNX (checked against torch with onnxruntime)",
        description=(
            "Export a saved HeadPoseModel to ONNX: input 'images' float32 (B, 3, S, S) RGB in "
            "[0, 1] with a dynamic batch (normalisation inside), outputs 'rotation' (B, 3, 3) "
            "and 'euler' (B, 3) pitch/yaw/roll in degrees. The file is checked with "
            "onnxruntime against torch (max |diff| <= --atol on the rotations) before it is "
            "written; input size, normalisation and crop preset are in its metadata."
        ),
    )
    p.add_argument("model", help="saved model directory (HeadPoseModel)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--out", required=True, help="output file (.onnx)")
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"],
                   help="torch exporter: dynamo first, legacy TorchScript if it fails (auto)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="max |onnxruntime - torch| on rotation matrices (default 1e-4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.errors import UsageError
    from clerf.inference.export import export_onnx
    from clerf.inference.model import load_pose_model

    if not args.atol > 0:
        raise UsageError(f"--atol must be > 0, got {args.atol}")
    model = load_pose_model(args.model, device="cpu")
    res = export_onnx(model, args.out, exporter=args.exporter, atol=args.atol)
    c = res["check"]
    print(f"export: {res['path']} ({res['exporter']} exporter, opset {res['opset']}); "
          f"onnxruntime vs torch: rotation max |diff| {c['rotation_max_abs']:.2g} "
          f"(tolerance {c['atol']:g}), euler max |diff| {c['euler_max_abs_deg']:.2g} deg")
    return 0
