"""Streaming generator sources: training data rendered on the fly instead of read from a store.

The procedural generator renders several times faster than a ResNet trains, so a fixed store of a
few thousand images is the wrong shape for it: it caps the data and invites over-fitting. With
``pretrain.stream.enabled`` / ``finetune.stream.enabled`` a stage takes its training batches
straight from the ``generator`` section instead of ``train_store``:

* fine-tuning gets labelled images (poses from the ``triplets`` section's pose sampler, a new
  identity for every image);
* pretraining gets triplets by the same rules as ``clerf generate`` (:mod:`triplets.rules`, the
  whole ``triplets`` section), with identities drawn from ``[0, triplets.num_identities)``.

Every batch is fresh: sample ``k`` of the stream has the global index
``k = ((epoch * batches_per_epoch + micro_batch) * world_size + rank) * batch_size + j`` and
depends only on ``(seed, k)`` for triplets (``triplets.sampling_block`` aside), and on ``(seed,
batch start, batch size)`` for labelled images. So a batch depends only on ``(seed, step,
rank)``: a resumed run (even after ``kill -9``) sees exactly the batches an uninterrupted run
would, skipped batches are never rendered (the loop's skip goes through the sampler), and ``N``
processes see disjoint, deterministic data.

Where rendering runs: ``train.num_workers = 0`` renders in the training process on the
generator's device (``generator.device``: ``auto`` = the training device); ``num_workers > 0``
renders on the CPU in DataLoader workers, overlapping with the training step.

Validation and test sets are fixed held-out sets rendered by a generator with another seed
(``seed + stream.val_seed_offset``: other identities) and other pose draws; see
:func:`held_out_labelled`.

The builders here take the sections they read (``stream``, ``generator``, ``triplets``) and the
seed, never the whole experiment config; :mod:`clerf.data_sources` picks a stage's sections.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from clerf.devices import resolve_device
from clerf.errors import ConfigError

__all__ = [
    "StreamingLabelled",
    "StreamingTriplets",
    "StreamBatchSampler",
    "build_stream",
    "held_out_labelled",
    "stream_poses",
    "StreamKind",
    "make_training_loader",
    "stage_loader",
    "is_stream",
]

#: identity of labelled stream sample ``k`` is ``STREAM_IDENTITY_BASE + k``: held-out sets (and the
#: evaluation's full-range set) use identities from 0, so even under an equal generator seed a
#: training image never shows a held-out face
STREAM_IDENTITY_BASE = 1 << 40
#: what a stream yields: labelled images (fine-tuning) or triplets (pretraining)
StreamKind = Literal["labelled", "triplets"]
#: stream ids mixed into the seeds (independent of the triplet sampler's stream 1)
_STREAM_LABELLED = 11
_STREAM_HELD_OUT = 12


def _build_generator(generator: Any, seed: int, device: torch.device, extra_params: Any = None):
    """The generator of a ``generator`` section (name, params) with ``extra_params`` (a stream's
    ``generator_params``) on top."""
    from clerf.config import to_dict
    from generators.base import build_generator

    params = to_dict(generator.params)
    params.update(to_dict(extra_params))
    try:
        return build_generator(str(generator.name), seed=int(seed), device=device, **params)
    except ValueError as exc:
        raise ConfigError(f"generator: {exc}") from exc


class _Source:
    """Common part of the two stream kinds: the generator, its device and the sample count."""

    #: the streams have no HDF5 chunks; kept for the reader interface
    block_size = 1

    def __init__(self, generator: Any, resolution: int, seed: int, epoch_size: int) -> None:
        if epoch_size < 1:
            raise ConfigError(f"stream.epoch_size: expected an integer >= 1, got {epoch_size}")
        self.generator, self.resolution = generator, int(resolution)
        self.seed, self.epoch_size = int(seed), int(epoch_size)
        #: render on the training device (``generator.device: auto``) when in-process
        self.follow_device = False

    def __len__(self) -> int:
        return self.epoch_size

    def to(self, device: torch.device | str) -> _Source:
        """Render on ``device`` from now on (the generator is moved when it supports it)."""
        dev = torch.device(device)
        if hasattr(self.generator, "to"):
            self.generator = self.generator.to(dev)
        else:
            self.generator.device = dev
        return self

    def describe(self) -> dict[str, Any]:
        g = self.generator
        return {"source": "stream", "generator": getattr(g, "name", type(g).__name__),
                "generator_params": g.params(), "resolution": self.resolution,
                "seed": self.seed, "epoch_size": self.epoch_size}  # fmt: skip


class StreamingLabelled(_Source):
    """Labelled images rendered on demand: ``read_batch(ids)`` -> ``{"images", "rotations",
    "identities", "index"}`` with the reader interface of ``triplets.store.LabelledDataset``.

    ``ids`` must be consecutive (a batch of the stream). Identity of sample ``k``:
    ``STREAM_IDENTITY_BASE + k`` (every image shows a new face); rotations: ``poses.sample``
    with a generator seeded by ``(seed, batch start, batch size)``.
    """

    def __init__(self, generator: Any, poses: Any, resolution: int, seed: int,
                 epoch_size: int) -> None:  # fmt: skip
        super().__init__(generator, resolution, seed, epoch_size)
        self.poses = poses

    def read_batch(self, ids) -> dict[str, Tensor]:
        from triplets.poses import seeded_generator

        ids = [int(i) for i in ids]
        start, n = ids[0], len(ids)
        if ids != list(range(start, start + n)):
            raise ValueError("StreamingLabelled.read_batch: ids must be consecutive")
        g = seeded_generator(self.seed, _STREAM_LABELLED, start, n)
        R = self.poses.sample(n, g).to(torch.float32)
        identities = torch.arange(start, start + n, dtype=torch.int64) + STREAM_IDENTITY_BASE
        dev = self.generator.device
        out = self.generator.render(identities.to(dev), R.to(dev), self.resolution)
        return {"images": out.images.cpu() if dev.type == "cpu" else out.images,
                "rotations": out.rotations.float(), "identities": identities,
                "index": torch.arange(start, start + n, dtype=torch.int64)}  # fmt: skip


class StreamingTriplets(_Source):
    """Triplets rendered on demand by the rules of ``clerf generate``: ``read_batch(ids)`` ->
    ``{"images": (T, 3, 3, H, W), "rotations": (T, 3, 3, 3), "identities": (T, 3), "index"}``
    with the reader interface of ``triplets.store.TripletDataset``.

    Triplet ``t`` is ``sampler.plan(t, t + 1)``: it depends only on ``(seed, t,
    triplets.sampling_block)``, exactly as triplet ``t`` of a store written by ``clerf
    generate`` with the same config would.
    """

    def __init__(self, generator: Any, sampler: Any, resolution: int, epoch_size: int) -> None:
        super().__init__(generator, resolution, sampler.seed, epoch_size)
        self.sampler = sampler

    def read_batch(self, ids) -> dict[str, Tensor]:
        ids = [int(i) for i in ids]
        start, n = ids[0], len(ids)
        if ids != list(range(start, start + n)):
            raise ValueError("StreamingTriplets.read_batch: ids must be consecutive")
        plan = self.sampler.plan(start, start + n)
        identities, R = plan.interleaved()  # a0, p0, n0, a1, ...
        dev = self.generator.device
        out = self.generator.render(identities.to(dev), R.to(torch.float32).to(dev),
                                    self.resolution)  # fmt: skip
        h, w = out.images.shape[-2:]
        return {"images": out.images.reshape(n, 3, 3, h, w),
                "rotations": out.rotations.float().reshape(n, 3, 3, 3),
                "identities": identities.reshape(n, 3),
                "index": torch.arange(start, start + n, dtype=torch.int64)}  # fmt: skip


def is_stream(data: Any) -> bool:
    return isinstance(data, _Source)


class StreamBatchSampler(Sampler[list[int]]):
    """Consecutive global sample ids per batch, never repeated across epochs, disjoint per rank.

    Batch ``m`` of epoch ``e`` on ``rank`` holds ids ``[g * B, (g + 1) * B)`` with
    ``g = (e * batches_per_epoch + m) * world_size + rank``. Call :meth:`set_epoch` each epoch.
    """

    def __init__(self, epoch_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.batches_per_epoch = int(epoch_size) // (self.batch_size * self.world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for m in range(self.batches_per_epoch):
            g = (self.epoch * self.batches_per_epoch + m) * self.world_size + self.rank
            yield list(range(g * b, (g + 1) * b))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def stage_loader(data: Any, ctx: Any, what: str) -> DataLoader:
    """:func:`make_training_loader` with a training stage's ``train`` settings and process
    (``ctx``: the loop's ``clerf.training.StepContext``)."""
    tc = ctx.train_cfg
    return make_training_loader(
        data, int(tc.batch_size), seed=ctx.seed, num_workers=int(tc.num_workers),
        rank=ctx.rank, world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda",
        device=ctx.device, what=what,
    )  # fmt: skip


def make_training_loader(
    data: Any, batch_size: int, *, seed: int, num_workers: int = 0, rank: int = 0,
    world_size: int = 1, pin_memory: bool = False, device: torch.device | str | None = None,
    what: str = "train_store",
) -> DataLoader:
    """The training loader of a stage: a stream (every batch fresh) or a store (shuffled).

    A stream renders in the training process on ``device`` (``num_workers = 0``, when the
    generator's device is ``auto``), or on the CPU in ``num_workers`` DataLoader workers.

    Raises:
        DataError: fewer samples than one batch on every process.
    """
    from clerf.errors import DataError

    if len(data) < batch_size * world_size:
        raise DataError(
            f"{what}: {len(data)} samples per epoch are fewer than one batch "
            f"(train.batch_size={batch_size} x {world_size} process(es))"
        )
    from triplets.store import BatchDataset, make_loader

    if not is_stream(data):
        return make_loader(
            data, batch_size, shuffle=True, seed=seed, num_workers=num_workers, rank=rank,
            world_size=world_size, drop_last=True, pin_memory=pin_memory,
        )  # fmt: skip
    if num_workers > 0:
        data.to("cpu")
    elif device is not None and data.follow_device:
        data.to(device)
    sampler = StreamBatchSampler(len(data), batch_size, rank=rank, world_size=world_size)
    return DataLoader(
        BatchDataset(data), batch_size=None, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory and num_workers > 0, worker_init_fn=_worker_init,
        persistent_workers=False,
    )  # fmt: skip


def stream_poses(triplets: Any, stream: Any) -> Any:
    """The ``triplets`` section with the stream's ``poses`` applied (when set)."""
    from omegaconf import OmegaConf

    poses = str(stream.poses or "")
    if not poses or poses == triplets.poses:
        return triplets
    return OmegaConf.merge(triplets, {"poses": poses})


def build_stream(kind: StreamKind, *, stream: Any, generator: Any, triplets: Any,
                 seed: int) -> _Source:  # fmt: skip
    """The stream of ``kind`` (``labelled``: fine-tuning's images; ``triplets``: pretraining's)
    from its sections: ``stream`` (a :class:`~clerf.config.StreamConfig`: ``poses``,
    ``generator_params``, ``epoch_size``), ``generator`` (name, params, device, resolution),
    ``triplets`` (the pose sampler, and the triplet rules of a triplet stream) and the
    experiment's ``seed``. A stage's stream: :func:`clerf.data_sources.stage_stream`."""
    from triplets.poses import build_pose_sampler

    if kind not in get_args(StreamKind):
        raise ValueError(f"build_stream: kind must be one of {get_args(StreamKind)}, got {kind!r}")
    triplets = stream_poses(triplets, stream)
    dev_name = str(generator.device)
    gen = _build_generator(generator, int(seed), resolve_device(dev_name, "generator.device"),
                           stream.generator_params)  # fmt: skip
    res = int(generator.resolution)
    if kind == "triplets":
        from triplets.generate import build_triplet_sampler

        accept = gen.reachable if type(gen).reachable is not _default_reachable() else None
        src: _Source = StreamingTriplets(gen, build_triplet_sampler(triplets, seed, accept=accept),
                                         res, int(stream.epoch_size))  # fmt: skip
    else:
        try:
            poses = build_pose_sampler(triplets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        src = StreamingLabelled(gen, poses, res, int(seed), int(stream.epoch_size))
    src.follow_device = dev_name == "auto"
    return src


def _default_reachable():
    from generators.base import PoseGenerator

    return PoseGenerator.reachable


def held_out_labelled(n: int, seed: int, *, stream: Any, generator: Any, triplets: Any,
                      batch: int = 128) -> Mapping[str, Tensor]:  # fmt: skip
    """A fixed held-out labelled set of ``n`` images rendered by the stream's generator (the
    ``generator`` section with ``stream.generator_params``) with ``seed`` (pass the
    experiment's seed + ``stream.val_seed_offset``: other identities than training) and poses
    from the stream's sampler (``stream.poses`` or ``triplets.poses``) drawn from another
    stream: ``{"images", "rotations"}`` on the CPU."""
    from triplets.poses import build_pose_sampler, seeded_generator

    triplets = stream_poses(triplets, stream)
    if n < 2:
        raise ConfigError(f"stream.val_size: expected an integer >= 2, got {n}")
    device = resolve_device(str(generator.device), "generator.device")
    gen = _build_generator(generator, int(seed), device, stream.generator_params)
    try:
        poses = build_pose_sampler(triplets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    R = poses.sample(n, seeded_generator(int(seed), _STREAM_HELD_OUT)).to(torch.float32)
    res = int(generator.resolution)
    images, rots = [], []
    for i in range(0, n, batch):
        ids = torch.arange(i, min(i + batch, n), dtype=torch.int64)
        out = gen.render(ids.to(gen.device), R[i:i + batch].to(gen.device), res)
        images.append(out.images.cpu())
        rots.append(out.rotations.float().cpu())
    return {"images": torch.cat(images), "rotations": torch.cat(rots)}
