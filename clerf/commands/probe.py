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
            "for a randomly initialised backbone (e.g. random:resnet18@64). With --gallery the "
            "queries (--data) are measured against another labelled store instead (e.g. "
            "photographs against renders at known poses): neighbours from the gallery, the probe "
            "fitted on the gallery. Chance for uniform rotations is about 126.5 deg."
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
    p.add_argument("--gallery", default=None, metavar="STORE",
                   help="labelled store the queries are retrieved from and the probe is fitted "
                        "on (e.g. the renders of 'clerf real-anchor' at the queries' poses)")
    p.add_argument("--gallery-max-samples", type=int, default=4096,
                   help="use the first N gallery images (default 4096)")
    p.add_argument("--embedding", action="store_true",
                   help="probe the unit-norm embedding the contrastive loss shapes (backbone + "
                        "projection) instead of the backbone features")
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

    from clerf.errors import UsageError
    from clerf.evaluation.probe import gallery_probe, probe_features
    from triplets.store import open_store

    if args.max_samples < 6:
        raise UsageError(f"--max-samples must be >= 6, got {args.max_samples}")
    if args.gallery is not None and args.gallery_max_samples < 6:
        raise UsageError(f"--gallery-max-samples must be >= 6, got {args.gallery_max_samples}")
    if args.gallery is not None and args.across_identities:
        raise UsageError("--across-identities and --gallery exclude each other (a gallery's "
                         "images are already other identities)")
    images, R, part = _read(open_store(args.data), args.max_samples)
    n = len(images)
    gallery = None
    if args.gallery is not None:
        g_images, g_R, _ = _read(open_store(args.gallery), args.gallery_max_samples)
        gallery = (g_images, g_R)
    groups = None
    if args.across_identities:
        groups = torch.from_numpy(part["identities"]).long()
        if bool((groups < 0).any()) or len(torch.unique(groups)) < 2:
            raise UsageError(f"--across-identities: {args.data} does not name at least 2 "
                             "identities for its images (identities -1 or all one)")
    where = ", across identities" if groups is not None else ""
    if gallery is not None:
        where = f", against {len(gallery[0])} gallery images of {args.gallery}"
    space = "embedding" if args.embedding else "backbone features"
    print(f"{n} images of {args.data}{where} ({space}); mean geodesic error (deg), chance "
          "about 126.5")
    print("| encoder | kNN-1 | kNN-5 | linear probe |")
    print("|---|---|---|---|")
    for spec in args.encoders:
        enc = _load(spec, args.seed).eval()
        feats = _embed(enc, images, args.embedding)
        if gallery is not None:
            r = gallery_probe(feats, R, _embed(enc, gallery[0], args.embedding), gallery[1])
        else:
            r = probe_features(feats, R, groups)
        print(f"| {spec} | {r['knn1_deg']:.1f} | {r['knn5_deg']:.1f} | "
              f"{r['linear_probe_deg']:.1f} |")
    return 0


def _read(store: Any, max_samples: int):
    """The first ``max_samples`` images of a store (uint8), their rotations, and the part read."""
    import torch

    part = store.read_range(0, min(int(store.num_images), max_samples))
    return torch.from_numpy(part["images"]), torch.from_numpy(part["rotations"]).double(), part


def _embed(enc: Any, images: Any, embedding: bool):
    """Backbone features (or the unit-norm embedding) of uint8 images, in batches of 128."""
    import torch

    from clerf.augment import to_float_images

    out = []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            x = enc.features(to_float_images(images[i:i + 128], enc.spec.input_size))
            out.append((enc.project(x) if embedding else x).float())
    return torch.cat(out)
