"""``clerf landmark-fit STORE --out DIR``: the landmark-to-pose baseline's mean 3D face."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "landmark-fit",
        parents=parents,
        help="fit the HopeNet paper's landmark-to-pose baseline (face mesh + PnP) on a "
             "labelled training store",
        description=(
            "Fit the mean 3D face of the landmark-to-pose baseline: MediaPipe's face mesh on "
            "every image of a labelled TRAINING store whose label is within --max-angle deg of "
            "frontal, each mesh turned into the head frame by its label and averaged. The "
            "output directory is a predictor that 'clerf evaluate' and 'clerf predict' take "
            "where they take a model: 2D landmarks (the face oval left out) solved by PnP "
            "against the mean face with focal length --focal x the image side. Needs mediapipe "
            "(make detect-extra). Never fit it on a test set."
        ),
    )
    p.add_argument("store", metavar="STORE", help="labelled training store (.h5)")
    p.add_argument("--out", required=True, help="output directory (landmark_pose.json)")
    p.add_argument("--max-angle", type=float, default=30.0,
                   help="use images whose label is within this many degrees of frontal (the "
                        "angle of the nose from the camera direction; default 30)")
    p.add_argument("--max-samples", type=int, default=2000,
                   help="use at most the first N selected images (default 2000)")
    p.add_argument("--focal", type=float, default=1.0,
                   help="the PnP camera's focal length in units of the image side (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from clerf.errors import UsageError
    from clerf.geometry import view_angles
    from clerf.inference.landmarks import (
        LANDMARK_MODEL_FILE,
        MeshLandmarker,
        fit_mean_shape,
        save_landmark_model,
    )
    from triplets.store import open_store

    if not 0.0 < args.max_angle <= 180.0:
        raise UsageError(f"--max-angle must be in (0, 180], got {args.max_angle}")
    if args.max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
    if not args.focal > 0.0:
        raise UsageError(f"--focal must be > 0, got {args.focal}")
    out = Path(args.out)
    if (out / LANDMARK_MODEL_FILE).exists() and not args.overwrite:
        raise UsageError(f"{out / LANDMARK_MODEL_FILE} exists: pass --overwrite to replace it")
    store = open_store(args.store)
    if store.kind != "labelled":
        raise UsageError(f"{args.store}: expected a labelled store (clerf prepare), got a "
                         f"{store.kind} store")  # fmt: skip
    selected, meshes, rotations = 0, [], []
    landmarker = MeshLandmarker()
    chunk = 256
    for start in range(0, store.num_images, chunk):
        part = store.read_range(start, min(start + chunk, store.num_images))
        R = torch.from_numpy(part["rotations"]).double()
        _, nose = view_angles(R)
        for i in np.flatnonzero(nose.numpy() <= args.max_angle):
            if selected >= args.max_samples:
                break
            selected += 1
            meshes.append(landmarker(np.ascontiguousarray(part["images"][i].transpose(1, 2, 0))))
            rotations.append(R[i].numpy())
        if selected >= args.max_samples:
            break
    landmarker.close()
    if selected == 0:
        raise UsageError(f"{args.store}: no image is within --max-angle {args.max_angle:g} deg "
                         "of frontal")  # fmt: skip
    shape = fit_mean_shape(meshes, np.stack(rotations))
    found = sum(m is not None for m in meshes)
    attrs = store.attrs
    preset = attrs.get("crop_preset", "none")
    preset = preset.decode() if isinstance(preset, bytes) else str(preset)
    fitted_on = {"store": str(args.store), "images_selected": selected, "faces_found": found,
                 "max_angle_deg": args.max_angle, "resolution": store.resolution}
    path = save_landmark_model(out, shape, args.focal, store.resolution, preset, fitted_on)
    print(f"landmark-fit: the face mesh found {found} of {selected} images within "
          f"{args.max_angle:g} deg of frontal in {args.store}; mean 3D face written to {path} "
          f"(input {store.resolution} px, crop preset {preset}, focal {args.focal:g} x side)")
    return 0
