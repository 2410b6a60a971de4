"""Shared fixtures for the triplet/store tests: a tiny deterministic generator and configs.

``CodeGenerator`` renders images whose pixels encode the identity and the rotation, so tests can
check what was rendered from the pixels, and content hashes are cheap. Subprocess tests name it
as ``tests.test_triplets_helpers:CodeGenerator`` in the config.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from generators.base import PoseGenerator, Rendered

ROOT = Path(__file__).resolve().parents[1]
CODE_GENERATOR = "tests.test_triplets_helpers:CodeGenerator"


class CodeGenerator(PoseGenerator):
    """Channel 0: identity code; channel 1: the 9 rotation entries quantised, tiled; channel 2:
    ``(x + y + seed) % 256``. ``delay`` sleeps per render call (for kill tests);
    ``max_abs_yaw_camera`` makes camera directions beyond that azimuth unreachable."""

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu", delay: float = 0.0,
                 max_abs_yaw_camera: float | None = None) -> None:
        super().__init__(seed, device)
        self.delay = float(delay)
        self.max_abs_yaw_camera = max_abs_yaw_camera

    def params(self) -> dict[str, Any]:
        return {"delay": self.delay, "max_abs_yaw_camera": self.max_abs_yaw_camera}

    def reachable(self, rotations: Tensor) -> Tensor:
        if self.max_abs_yaw_camera is None:
            return super().reachable(rotations)
        d = rotations[..., :, 2]
        az = torch.rad2deg(torch.atan2(d[..., 0], d[..., 2])).abs()
        return az <= self.max_abs_yaw_camera

    def render(self, identities: Tensor, rotations: Tensor, resolution: int) -> Rendered:
        if self.delay:
            time.sleep(self.delay)
        b, r = len(identities), resolution
        img = torch.empty(b, 3, r, r, dtype=torch.uint8)
        img[:, 0] = ((identities * 37 + 11) % 256).to(torch.uint8)[:, None, None]
        q = ((rotations.reshape(b, 9).double().cpu() + 1.0) * 127.5).round().clamp(0, 255)
        k = torch.arange(r * r) % 9
        img[:, 1] = q[:, k].reshape(b, r, r).to(torch.uint8)
        yy, xx = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        img[:, 2] = ((xx + yy + self.seed) % 256).to(torch.uint8)
        return Rendered(images=img.to(self.device), rotations=rotations.float())


def decode_identity_code(images: np.ndarray) -> np.ndarray:
    """Channel-0 code of ``(..., 3, H, W)`` images."""
    return images[..., 0, 0, 0]


def identity_code(ids: np.ndarray) -> np.ndarray:
    return ((ids * 37 + 11) % 256).astype(np.uint8)


def small_config(tmp_path: Path, **overrides: Any) -> Path:
    """Write a tiny generate config (CodeGenerator, 16 px) and return its path."""
    cfg = {
        "seed": 3,
        "generator": {"name": CODE_GENERATOR, "resolution": 16, "device": "cpu", "params": {}},
        "triplets": {"count": 40, "delta": 40.0, "sampling_block": 16, "num_identities": 50},
        "store": {"chunk_images": 12},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    import yaml

    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p
