"""A clerf encoder inside your own model: load it, put your head on it, train on rendered faces.

    python examples/encoder_in_your_model.py --encoder runs/example/pretrain
    python examples/encoder_in_your_model.py --encoder runs/example/pretrain --steps 5 --toy

``--encoder`` is a ``clerf pretrain`` output directory (``examples/train_and_predict.py`` makes
one) or any directory written by ``Encoder.save_pretrained``; it is loaded strictly (never random
weights). The head here regresses a rotation through the 6D representation (Gram-Schmidt), with
labels from clerf's procedural generator: a new identity and a uniform random rotation per image.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import clerf
from clerf.geometry import geodesic_distance, random_rotation, rotation_from_6d
from generators import build_generator


class MyPoseRegressor(nn.Module):
    """Your model: clerf's backbone features -> your MLP -> a rotation matrix."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(encoder.feature_dim, 128), nn.ReLU(), nn.Linear(128, 6))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # float [0, 1], (B, 3, H, W)
        return rotation_from_6d(self.head(self.encoder.features(images)))


def batch(gen, step: int, size: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` rendered faces (new identities every step) and their true rotations."""
    g = torch.Generator().manual_seed(step)
    rotations = random_rotation(size, generator=g)
    identities = torch.arange(step * size, (step + 1) * size)
    out = gen.render(identities, rotations, resolution)
    return out.images.float() / 255, out.rotations


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True, help="a clerf pretrain output or saved encoder")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--toy", action="store_true", help="small batches (the tests' scale)")
    args = ap.parse_args(argv)

    encoder = clerf.load_encoder(args.encoder)  # strict: a mismatch is an error listing keys
    model = MyPoseRegressor(encoder)
    size = encoder.spec.input_size
    gen = build_generator("procedural", seed=0)
    bs = 4 if args.toy else args.batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def held_out_error() -> float:  # identities and poses never trained on (another seed)
        model.eval()
        with torch.no_grad():
            x, r = batch(build_generator("procedural", seed=1), 0, 4 * bs, size)
            err = geodesic_distance(model(x), r).mean().item()  # degrees
        model.train()
        return err

    before = held_out_error()
    for step in range(args.steps):
        x, r = batch(gen, step, bs, size)
        loss = geodesic_distance(model(x), r).deg2rad().mean()  # radians: a unit-scale loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_error()
    print(f"held-out mean geodesic error: {before:.1f} deg before, {after:.1f} deg after "
          f"{args.steps} steps")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
