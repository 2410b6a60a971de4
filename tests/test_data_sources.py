"""Every source the training stages read satisfies the one declared interface (DataSource)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clerf.cli import main
from clerf.config import load_config
from clerf.data_sources import InMemoryLabelled, InMemoryTriplets, Prefix, stage_stream
from clerf.geometry import random_rotation
from triplets.store import DataSource, LabelledDataset, TripletDataset

ROOT = Path(__file__).resolve().parents[1]


def _check(source, triplets: bool) -> None:
    assert isinstance(source, DataSource)
    assert len(source) >= 3 and int(source.block_size) >= 1
    batch = source.read_batch([0, 1, 2])
    shape = (3, 3, 3, 3) if triplets else (3, 3, 3)
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape[0] == 3
    assert batch["images"].ndim == (5 if triplets else 4)
    assert batch["images"].shape[1:3] == ((3, 3) if triplets else (3, 16))
    assert tuple(batch["rotations"].shape) == shape and batch["rotations"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2]
    assert isinstance(source.describe(), dict)  # what a model trained on it remembers
    json.dumps(source.describe())


def test_stores_memory_and_streams_are_data_sources(tmp_path):
    store = tmp_path / "t.h5"
    assert main(["generate", str(ROOT / "configs" / "generate_small.yaml"), "--out", str(store),
                 "triplets.count=6", "generator.resolution=16", "--no-progress"]) == 0
    _check(TripletDataset(store), triplets=True)
    _check(LabelledDataset(store), triplets=False)
    R = random_rotation(8)
    _check(InMemoryLabelled(torch.zeros(8, 3, 16, 16, dtype=torch.uint8), R), triplets=False)
    _check(Prefix(InMemoryLabelled(torch.zeros(8, 3, 16, 16, dtype=torch.uint8), R), 4),
           triplets=False)  # fmt: skip
    _check(InMemoryTriplets(torch.zeros(4, 3, 3, 16, 16, dtype=torch.uint8),
                            R[:4, None].expand(4, 3, 3, 3)), triplets=True)  # fmt: skip
    cfg = load_config(None, ["generator.resolution=16", "finetune.stream.enabled=true",
                             "pretrain.stream.enabled=true", "generator.device=cpu"])  # fmt: skip
    _check(stage_stream(cfg, "finetune"), triplets=False)
    _check(stage_stream(cfg, "pretrain"), triplets=True)
