"""``clerf predict MODEL INPUT... --out DIR``: head pose of the faces in images and videos."""

from __future__ import annotations

import argparse
import sys


def register(subparsers, parents) -> None:
    p = subparsers.add_parser(
        "predict",
        parents=parents,
        help="head pose of every face in images, folders and videos",
        description=(
            "Find faces at any in-plane angle and in profile (OpenCV's bundled Haar cascades "
            "run on turned and mirrored copies, candidates verified; or --boxes), cut the "
            "model's training crop in each face's upright frame, predict the pose, compose it "
            "back into the image's frame (R @ Rz(angle)), and write OUT/predictions.json, "
            "OUT/predictions.csv (pitch/yaw/roll in degrees and the rotation matrix per face) "
            "and OUT/annotated/ (images as PNG, videos as MP4, head axes drawn: x red, y green, "
            "nose blue)."
        ),
    )
    p.add_argument("model", help="saved model directory (HeadPoseModel)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image/video files or folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--detector", default="haar",
                   help="'haar' (default), 'blazeface' (MediaPipe's CNN; make detect-extra) or "
                   "package.module:ClassName (a FaceDetector)")
    p.add_argument("--boxes", help='JSON {"file": [[x, y, w, h], ...]} instead of a detector')
    p.add_argument("--crop", help="crop preset (default: the model's; see clerf.data.crop)")
    p.add_argument("--box-scale", type=float, nargs=2, metavar=("SX", "SY"),
                   help="detector box -> landmark box size factors (Haar: 0.88 0.68; --boxes: "
                   "1 1)")
    p.add_argument("--box-shift", type=float, metavar="DY",
                   help="detector box -> landmark box downward shift, fraction of the box "
                   "height (Haar: 0.15; --boxes: 0)")
    p.add_argument("--angle-step", type=float, metavar="DEG",
                   help="find faces at any in-plane angle: run the detector on the image turned "
                   "by every DEG degrees (must divide 360; 0 = upright only; default 15 for "
                   "haar, 90 for blazeface, 0 for a plug-in detector)")
    p.add_argument("--no-profile", action="store_true",
                   help="haar: skip the (mirrored) profile cascade")
    p.add_argument("--no-verify", action="store_true",
                   help="haar: keep every candidate (no eye / profile check of the detections; "
                   "plug-in detectors are never checked)")
    p.add_argument("--max-side", type=int, default=0, metavar="PX",
                   help="run the face search on a copy scaled to at most PX pixels on its longer "
                   "side (faster; 0 = full size)")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="re-cut each face turned by the model's own in-plane estimate, N times "
                   "(default 0)")
    p.add_argument("--max-frames", type=int, default=0, help="videos: stop after N frames")
    p.add_argument("--smooth", action="store_true",
                   help="videos: One-Euro filter each face's rotation on SO(3) over the frames "
                   "(off by default: it trades lag for steadiness)")
    p.add_argument("--smooth-min-cutoff", type=float, default=1.0, metavar="HZ",
                   help="--smooth: cutoff when the head holds still (default 1.0; lower = "
                   "steadier, more lag)")
    p.add_argument("--smooth-beta", type=float, default=0.01, metavar="B",
                   help="--smooth: cutoff increase per deg/s of head speed (default 0.01)")
    p.add_argument("--no-annotate", action="store_true", help="skip the annotated outputs")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:0 ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clerf.devices import resolve_device
    from clerf.errors import UsageError
    from clerf.inference.detect import BoxMapping, HaarDetector, build_detector
    from clerf.inference.model import load_pose_model
    from clerf.inference.run import run_predict
    from clerf.inference.search import RotationSearch, build_search_detector, search_angles

    if args.max_frames < 0:
        raise UsageError(f"--max-frames must be >= 0, got {args.max_frames}")
    if args.max_side < 0:
        raise UsageError(f"--max-side must be >= 0, got {args.max_side}")
    if args.refine < 0:
        raise UsageError(f"--refine must be >= 0, got {args.refine}")
    if args.smooth_min_cutoff <= 0 or args.smooth_beta < 0:
        raise UsageError(f"--smooth-min-cutoff must be > 0 and --smooth-beta >= 0, got "
                         f"{args.smooth_min_cutoff} and {args.smooth_beta}")
    smooth = ({"min_cutoff": args.smooth_min_cutoff, "beta": args.smooth_beta}
              if args.smooth else None)
    device = resolve_device(args.device, "--device")
    detector = build_detector(args.detector, boxes=args.boxes)
    if args.boxes is None and isinstance(detector, HaarDetector):
        step = 15.0 if args.angle_step is None else args.angle_step
        detector = build_search_detector(detector, step, profile=not args.no_profile,
                                         verify=not args.no_verify, max_side=args.max_side)
    elif args.boxes is None:  # a plug-in: searched at its own step (blazeface 90) or as asked
        step = getattr(detector, "search_step", 0.0) if args.angle_step is None \
            else args.angle_step  # fmt: skip
        if step:
            detector = RotationSearch(detector, search_angles(step), verify=False,
                                      max_side=args.max_side)
    mapping = None
    if args.box_scale is not None or args.box_shift is not None:
        base = detector.box_mapping
        sx, sy = args.box_scale if args.box_scale is not None else (base.scale_x, base.scale_y)
        dy = args.box_shift if args.box_shift is not None else base.shift_y
        mapping = BoxMapping(sx, sy, dy)
    model = load_pose_model(args.model, device=device)
    record = run_predict(model, args.inputs, args.out, detector, crop_preset=args.crop,
                         mapping=mapping, refine=args.refine, annotate_outputs=not args.no_annotate,
                         max_frames=args.max_frames, log=lambda m: print(m, file=sys.stderr),
                         smooth=smooth)
    n_in = len(record["inputs"])
    n_none = sum(r["status"] != "ok" for r in record["inputs"])
    print(f"predict: {len(record['faces'])} face(s) in {n_in} input(s)"
          + (f", {n_none} without a face" if n_none else "") + f"; results in {args.out}")
    return 0
