"""``clerf probe ENCODER... --data STORE``: how much pose a frozen encoder carries."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "probe",
        parents=parents,
        help="measure frozen encoders by kNN pose retrieval and a linear probe on a store",
        description=(
            "Embed the images of a labelled or triplet store with each encoder's backbone "
            "features (no augmentation) and print the mean geodesic error (deg) of kNN pose "
            "retrieval (k = 1 and 5, cosine similarity, leave-one-out) and of a 2-fold ridge "
            "linear probe from the features to the rotation. ENCODER: a pretrain output, an "
            "encoder directory, a fine-tune output (its model's encoder), or 'random:ARCH@SIZE' "
            "for a randomly initialised backbone (e.g. random:resnet18@64). Chance for uniform "
            "rotations is about 126.5 deg."
        ),
    )
    p.add_argument("encoders", nargs="+", metavar="ENCODER")
    p.add_argument("--data", required=True, help="labelled or triplet store (.h5)")
    p.add_argument("--max-samples", type=int, default=1024,
                   help="use the first N images (default 1024)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of a random encoder (default 0)")
    p.add_argument("--across-identities", action="store_true",
                   help="neighbours and probe folds from other identities only (the store's "
                        "identities, e.g. Pointing'04's people; needs them known)")
    p.set_defaults(func=run)


def _load(spec: str, seed: int):
    import torch

    from clerf.errors import ConfigError, UsageError
    from clerf.models.encoder import Encoder, EncoderSpec

    if spec.startswith("random:"):
        arch, _, size = spec[len("random:"):].partition("@")
        try:
            torch.manual_seed(seed)
            return Encoder(EncoderSpec(arch=arch, input_size=int(size or 64)))
        except (ValueError, TypeError, ConfigError) as exc:
            raise UsageError(f"ENCODER '{spec}': expected random:ARCH@SIZE ({exc})") from None
    from clerf.models.pose_model import HeadPoseModel, head_pose_model_dir

    if head_pose_model_dir(spec) is not None:
        return HeadPoseModel.from_pretrained(spec).encoder
    return Encoder.from_pretrained(spec)


def run(args: argparse.Namespace) -> int:
    import torch

    from clerf.augment import to_float_images
    from clerf.errors import UsageError
    from clerf.evaluation.probe import probe_features
    from triplets.store import open_store

    if args.max_samples < 6:
        raise UsageError(f"--max-samples must be >= 6, got {args.max_samples}")
    store = open_store(args.data)
    n = min(int(store.num_images), args.max_samples)
    part = store.read_range(0, n)
    images = torch.from_numpy(part["images"])
    R = torch.from_numpy(part["rotations"]).double()
    groups = None
    if args.across_identities:
        groups = torch.from_numpy(part["identities"]).long()
        if bool((groups < 0).any()) or len(torch.unique(groups)) < 2:
            raise UsageError(f"--across-identities: {args.data} does not name at least 2 "
                             "identities for its images (identities -1 or all one)")
    across = ", across identities" if groups is not None else ""
    print(f"{n} images of {args.data}{across}; mean geodesic error (deg), chance about 126.5")
    print("| encoder | kNN-1 | kNN-5 | linear probe |")
    print("|---|---|---|---|")
    for spec in args.encoders:
        enc = _load(spec, args.seed).eval()
        with torch.no_grad():
            feats = torch.cat([enc.features(to_float_images(images[i:i + 128],
                                                            enc.spec.input_size)).float()
                               for i in range(0, n, 128)])  # fmt: skip
        r = probe_features(feats, R, groups)
        print(f"| {spec} | {r['knn1_deg']:.1f} | {r['knn5_deg']:.1f} | "
              f"{r['linear_probe_deg']:.1f} |")
    return 0
