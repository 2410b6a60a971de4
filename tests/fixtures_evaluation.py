"""Tiny models and stores for the evaluate / predict / export tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

from clerf.geometry import sample_euler_box


def tiny_model(seed: int = 0, head: str = "rotation6d", input_size: int = 32):
    """A random-init ``HeadPoseModel`` (resnet18 at ``input_size`` px), in eval mode."""
    from clerf.models.encoder import Encoder, EncoderSpec
    from clerf.models.pose_model import HeadPoseModel

    torch.manual_seed(seed)
    enc = Encoder(EncoderSpec(arch="resnet18", embedding_dim=8, projection_hidden=0,
                              input_size=input_size))
    model = HeadPoseModel(enc, {"type": head} if head == "binned" else {"type": head, "hidden": 16})
    return model.eval()


def save_tiny_model(directory: Path, seed: int = 0, head: str = "rotation6d",
                    input_size: int = 32) -> Path:
    tiny_model(seed, head, input_size).save_pretrained(directory, training={"note": "test"})
    return directory


def write_store(path: Path, n: int = 40, resolution: int = 32, seed: int = 0,
                chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled store of ``n`` procedural renders at 300W-LP-like poses; returns its
    ``(images uint8 (n, 3, r, r), rotations (n, 3, 3))``."""
    from generators import build_generator
    from triplets.store import StoreWriter

    R = sample_euler_box(n, pitch=(-50, 50), yaw=(-80, 80), roll=(-40, 40),
                         generator=torch.Generator().manual_seed(seed))
    gen = build_generator("procedural", seed=seed)
    out = gen.render(torch.arange(n), R, resolution)
    with StoreWriter(path, "labelled", resolution, total=n, chunk=chunk,
                     attrs={"generator": "procedural"}) as w:
        for start, stop in w.pending():
            w.write_chunk(start, out.images[start:stop], out.rotations[start:stop],
                          torch.arange(start, stop))
        w.finalize()
    return out.images, out.rotations
