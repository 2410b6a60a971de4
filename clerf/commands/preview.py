"""``clerf preview``: render a grid of generator samples with head axes and poses drawn."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "preview",
        parents=parents,
        help="render a PNG grid of generator samples with head axes and poses",
        description=(
            "Render N samples of a pose-conditioned generator at random poses and write a PNG "
            "grid; each sample shows the head axes of its label (x red, y green, nose blue; "
            "docs/conventions.md section 2) and its pitch/yaw/roll in degrees. For eg3d/"
            "panohead, poses "
            "outside the model's usable camera range are skipped."
        ),
    )
    p.add_argument("--generator", default="procedural",
                   help="registry name (procedural, eg3d, panohead) or package.module:Class")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--resolution", default="128", help="pixels, 16..1024 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="identity and pose seed (default 0)")
    p.add_argument("--out", required=True, metavar="PNG", help="output .png path")
    p.add_argument("--poses", choices=("uniform", "box"), default="uniform",
                   help="uniform over SO(3), or an Euler box (pitch +-60, yaw +-90, roll +-45)")
    p.add_argument("--rotations", metavar="FILE", default=None,
                   help="render these rotations instead (.npy, .pt or text; N x 9 or N x 3 x 3)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="generator parameter (YAML value), repeatable: --param symmetric=true")
    p.add_argument("--checkout", default=None, help="eg3d/panohead: folder of your own checkout")
    p.add_argument("--network", default=None, help="eg3d/panohead: your network pickle")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling --network (it runs code stored in the file)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--no-axes", action="store_true", help="do not draw the head axes")
    p.set_defaults(func=run)  # fmt: skip


def _parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    from clerf.errors import UsageError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param '{item}' is not of the form KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"--param '{item}': value is not valid YAML ({exc})") from exc
    return out


def load_rotations(path: str | Path):
    """Rotations ``(N, 3, 3)`` float64 from a .npy, .pt or whitespace/comma text file."""
    import numpy as np
    import torch

    from clerf.errors import DataError
    from clerf.geometry import check_rotation

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--rotations: file not found: {p}")
    try:
        if p.suffix == ".npy":
            a = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix in (".pt", ".pth"):
            a = torch.load(p, map_location="cpu", weights_only=True)
        else:
            a = torch.from_numpy(np.loadtxt(p, delimiter=None if "," not in p.read_text()
                                            else ",", ndmin=2))  # fmt: skip
    except Exception as exc:  # numpy and torch raise many kinds for unreadable files
        raise DataError(f"--rotations: cannot read {p} ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(a, torch.Tensor) or a.numel() == 0 or a.numel() % 9:
        raise DataError(f"--rotations: {p} must hold N x 9 or N x 3 x 3 numbers")
    R = a.reshape(-1, 3, 3).double()
    try:
        return check_rotation(R, name=f"--rotations {p}")
    except ValueError as exc:
        raise DataError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    import torch

    from clerf.drawing import draw_axes, image_grid, pose_caption, save_png
    from clerf.errors import ClerfError, UsageError
    from clerf.geometry import random_rotation, sample_euler_box
    from generators import build_generator
    from generators.base import check_resolution

    if args.n <= 0 or args.n > 1024:
        raise UsageError(f"--n must be in 1..1024, got {args.n}")
    try:
        text = str(args.resolution).strip()
        res = check_resolution(int(text) if text.lstrip("+-").isdigit() else text)
    except ValueError as exc:
        raise UsageError(f"--resolution: {exc}") from exc
    if Path(args.out).suffix.lower() != ".png":
        raise UsageError(f"--out must end in .png, got {args.out}")
    params = _parse_params(args.param)
    for key in ("checkout", "network"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.trust_pickle:
        params["trust_pickle"] = True
    from clerf.devices import resolve_device

    device = resolve_device(args.device, "--device")
    try:
        gen = build_generator(args.generator, seed=args.seed, device=device, **params)
    except ClerfError:
        raise
    except ValueError as exc:  # the generator refused its flags: a usage error, as in generate
        raise UsageError(f"generator: {exc}") from exc

    rng = torch.Generator().manual_seed(args.seed)
    if args.rotations is not None:
        R = load_rotations(args.rotations)
        ok = gen.reachable(R)
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0])
            raise UsageError(f"--rotations: rotation {bad} is outside what "
                             f"'{args.generator}' can render")  # fmt: skip
    else:
        kept = []
        for _ in range(200):  # rejection-sample poses the generator can render
            cand = (random_rotation(4 * args.n, rng, dtype=torch.float64)
                    if args.poses == "uniform"
                    else sample_euler_box(4 * args.n, generator=rng, dtype=torch.float64))
            kept.append(cand[gen.reachable(cand)])
            if sum(len(k) for k in kept) >= args.n:
                break
        R = torch.cat(kept)[: args.n]
        if len(R) < args.n:
            raise UsageError(f"could not draw {args.n} poses that '{args.generator}' can render")
    ids = torch.arange(len(R))
    out = gen.render(ids, R.to(gen.device, torch.float32), res)
    tiles, captions = [], []
    for img, label in zip(out.images.cpu(), out.rotations.cpu().double(), strict=True):
        tiles.append(img if args.no_axes else draw_axes(img, label))
        captions.append(pose_caption(label))
    path = save_png(args.out, image_grid(tiles, captions))
    print(f"wrote {path} ({len(tiles)} samples of '{args.generator}' at {res} px)")
    return 0
