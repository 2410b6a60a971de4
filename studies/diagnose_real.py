"""Why a model trained on procedural renders fails on real faces: one factor at a time.

Evaluates a saved model on a prepared real store (standard view) after a transform of its
images: as stored; grayscale; zoomed out (the crop shrunk into a canvas of its mean colour, so
the head covers the share of the frame it covers in the renders); colour statistics matched to
the renders' per-channel mean and spread; and combinations. Prints mean / median geodesic error.

    python studies/diagnose_real.py runs/quickstart/finetune /work/stores/aflw2000_64.h5 \
        --renders runs/quickstart/data/test.h5
"""

from __future__ import annotations

import argparse

import h5py
import torch
import torch.nn.functional as F

from clerf.geometry import geodesic_distance
from clerf.models.pose_model import HeadPoseModel


def zoom_out(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Shrink ``(N, 3, r, r)`` float images by ``factor`` into a canvas of each image's mean."""
    n, c, r, _ = x.shape
    s = max(1, int(round(r / factor)))
    small = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    out = x.mean(dim=(2, 3), keepdim=True).expand(n, c, r, r).clone()
    o = (r - s) // 2
    out[:, :, o:o + s, o:o + s] = small
    return out


def match_colour(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(0, 2, 3), keepdim=True)
    sd = x.std(dim=(0, 2, 3), keepdim=True)
    return ((x - m) / sd * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("store")
    ap.add_argument("--renders", required=True, help="a store of the model's training domain")
    ap.add_argument("--max", type=int, default=2000)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = HeadPoseModel.from_pretrained(a.model)
    with h5py.File(a.store) as f:
        imgs = torch.from_numpy(f["images"][: a.max]).float() / 255
        R = torch.from_numpy(f["rotations"][: a.max]).float()
    with h5py.File(a.renders) as f:
        rend = torch.from_numpy(f["images"][:512]).float() / 255
    r_mean, r_std = rend.mean(dim=(0, 2, 3)), rend.std(dim=(0, 2, 3))
    gray = lambda x: x.mean(dim=1, keepdim=True).expand_as(x)  # noqa: E731
    views = {
        "as stored": imgs,
        "grayscale": gray(imgs),
        "zoom out x1.5": zoom_out(imgs, 1.5),
        "zoom out x2": zoom_out(imgs, 2.0),
        "renders' colour stats": match_colour(imgs, r_mean, r_std),
        "zoom x2 + colour stats": match_colour(zoom_out(imgs, 2.0), r_mean, r_std),
    }
    print(f"{a.model} on {a.store} ({len(imgs)} images)")
    print("| view | geo mean | geo median | <30 deg |")
    print("|---|---|---|---|")
    for name, x in views.items():
        with torch.no_grad():
            pred = model.predict((x * 255).round().to(torch.uint8)).rotations.float()
        e = geodesic_distance(pred, R)  # degrees
        print(f"| {name} | {e.mean():.1f} | {e.median():.1f} | {(e < 30).float().mean():.1%} |")


if __name__ == "__main__":
    main()
