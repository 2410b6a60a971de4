"""The training stages' data: which source a stage trains on and which images it holds out.

One home for what ``clerf pretrain`` and ``clerf finetune`` used to each do for themselves:

* :func:`check_store_path`: a store named in the config exists (its one-line errors);
* :func:`training_source`: the stage's training :class:`~triplets.store.DataSource`: the data a
  caller passes, else the stream of ``cfg[stage].stream`` (:mod:`clerf.streaming`), else the store
  ``cfg[stage].train_store`` (pretrain: triplets, finetune: labelled images);
* :func:`held_out_set`: the held-out ``{"images", "rotations"}`` of the per-epoch evaluation
  (the stream's own set, ``val_store``, or for fine-tuning the last ``val_fraction`` of the
  training source) and the training source that remains;
* :class:`InMemoryTriplets`, :class:`InMemoryLabelled`: sources held in tensors (tests,
  benchmarks), on one base :class:`InMemorySource`; :class:`Prefix`: the first items of a source.

The loader that turns a source into batches is :func:`clerf.streaming.make_training_loader`; both
it and :func:`triplets.store.make_loader` read whole batches through one adapter,
:class:`triplets.store.BatchDataset`.

The held-out set is read or rendered on the main process only (the per-epoch evaluation runs
there); every rank checks it, so that a bad setting stops all of them rather than hanging the
others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clerf.devices import is_main_process
from clerf.errors import ConfigError, DataError

if TYPE_CHECKING:
    from triplets.store import DataSource

__all__ = [
    "STAGES",
    "check_store_path",
    "training_source",
    "stage_stream",
    "held_out_set",
    "InMemorySource",
    "InMemoryTriplets",
    "InMemoryLabelled",
    "Prefix",
]

#: the training stages, and the commands that write the stores each one reads (for the message
#: of a store left unset)
STAGES = {"pretrain": "clerf generate", "finetune": "clerf prepare or clerf generate"}


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {sorted(STAGES)}")
    return stage


def check_store_path(value: str | None, key: str, made_by: str = STAGES["pretrain"]) -> Path:
    """The path of the store named by config key ``key``.

    Raises:
        ConfigError: no store given (the message says which command makes one: ``made_by``).
        DataError: no file at that path.
    """
    if not value:
        raise ConfigError(f"{key}: no store given (set {key}=PATH to a store from {made_by})")
    p = Path(value)
    if not p.is_file():
        raise DataError(f"{key}: store not found: {p}")
    return p


def training_source(cfg: Any, stage: str, train_data: DataSource | None = None) -> DataSource:
    """The source ``stage`` (``pretrain`` or ``finetune``) trains on.

    ``train_data`` when given; else the stream of ``cfg[stage].stream`` when it is enabled
    (pretrain: triplets, finetune: labelled images); else the store ``cfg[stage].train_store``
    (pretrain: :class:`~triplets.store.TripletDataset`, finetune:
    :class:`~triplets.store.LabelledDataset`).
    """
    sc = cfg[_stage(stage)]
    if train_data is not None:
        return train_data
    if sc.stream.enabled:
        return stage_stream(cfg, stage)
    from triplets.store import LabelledDataset, TripletDataset

    dataset = TripletDataset if stage == "pretrain" else LabelledDataset
    return dataset(check_store_path(sc.train_store, f"{stage}.train_store", STAGES[stage]))


def stage_stream(cfg: Any, stage: str) -> DataSource:
    """The generator stream of ``stage`` (pretrain: triplets, finetune: labelled images), built
    from the sections it reads: ``cfg[stage].stream``, ``generator``, ``triplets``, ``seed``."""
    from clerf.streaming import build_stream

    kind = "triplets" if _stage(stage) == "pretrain" else "labelled"
    return build_stream(kind, stream=cfg[stage].stream, generator=cfg.generator,
                        triplets=cfg.triplets, seed=int(cfg.seed))  # fmt: skip


def held_out_set(cfg: Any, stage: str, train: DataSource, *, streaming: bool,
                 val_data: Mapping[str, Tensor] | None = None,
                 ) -> tuple[Mapping[str, Tensor] | None, DataSource]:  # fmt: skip
    """The held-out images of ``stage``'s per-epoch evaluation and what is left to train on.

    In order: ``val_data`` when given; the stream's own held-out set when ``streaming``, no
    ``val_store`` is set and ``stream.val_size`` is not 0 (rendered with another seed:
    :func:`clerf.streaming.held_out_labelled`); the first rows of ``cfg[stage].val_store``
    (pretrain: ``val_size`` of them, finetune: ``val_max_images``, 0 = all); for fine-tuning
    without a stream, the last ``val_fraction`` of ``train`` (which then trains on the rest:
    a :class:`Prefix`). Otherwise no held-out set.

    Args:
        train: the training source (:func:`training_source`).
        streaming: whether the held-out set may come from the stream. The stages differ:
            pretraining renders one whenever ``pretrain.stream.enabled`` (even for passed
            training data), fine-tuning only when it trains on its configured stream.

    Returns:
        ``({"images": (N, 3, H, W) uint8, "rotations": (N, 3, 3)}`` or None, the training
        source). The set is None on every process but the main one; the training source is the
        same on all.

    Raises:
        ConfigError: ``stream.val_size`` under 2, or a store left unset.
        DataError: a store not found, or fewer than 2 held-out images (on every process).
    """
    sc = cfg[_stage(stage)]
    main = is_main_process()
    if val_data is not None:
        return val_data, train
    if streaming and not sc.val_store and int(sc.stream.val_size):
        if int(sc.stream.val_size) < 2:
            raise ConfigError(f"{stage}.stream.val_size: expected an integer >= 2, got "
                              f"{sc.stream.val_size}")  # fmt: skip
        if not main:
            return None, train
        from clerf.streaming import held_out_labelled

        seed = int(cfg.seed) + int(sc.stream.val_seed_offset)
        return held_out_labelled(int(sc.stream.val_size), seed, stream=sc.stream,
                                 generator=cfg.generator, triplets=cfg.triplets), train
    if sc.val_store:
        from triplets.store import LabelledDataset

        ds = LabelledDataset(check_store_path(sc.val_store, f"{stage}.val_store", STAGES[stage]))
        rows = _held_out_rows(cfg, stage, 0, len(ds))
        return (ds.read_batch(rows) if main else None), train  # one contiguous read
    if stage == "finetune" and float(sc.val_fraction) > 0 and not streaming:
        n = len(train)
        n_val = int(round(n * float(sc.val_fraction)))
        if n_val < 2 or n - n_val < 1:
            raise DataError(
                f"finetune.val_fraction={sc.val_fraction} of {n} images leaves {n_val} "
                f"held-out and {n - n_val} training images; need at least 2 and 1"
            )
        rows = _held_out_rows(cfg, stage, n - n_val, n)
        return (train.read_batch(rows) if main else None), Prefix(train, n - n_val)
    return None, train


def _held_out_rows(cfg: Any, stage: str, start: int, stop: int) -> list[int]:
    """The held-out rows of ``[start, stop)`` (contiguous: one slice per chunk), at most the
    stage's cap (pretrain: ``val_size``; finetune: ``val_max_images``, 0 = no cap); >= 2."""
    if stage == "pretrain":
        n = min(int(cfg.pretrain.val_size), stop - start)
        if n < 2:
            raise DataError("pretrain.val_store: needs at least 2 images for the check")
        return list(range(start, start + n))
    cap = int(cfg.finetune.val_max_images)
    if cap:
        stop = min(stop, start + cap)
    if stop - start < 2:
        raise DataError(f"finetune: the held-out set has {stop - start} image(s); need >= 2")
    return list(range(start, stop))


# --------------------------------------------------------------------------- sources


class InMemorySource:
    """Items held in tensors, with the :class:`~triplets.store.DataSource` interface.

    ``images`` (uint8) and ``rotations`` share the leading item axis; ``identities``, when given,
    too (then :meth:`read_batch` returns them). Use a subclass: :class:`InMemoryTriplets` or
    :class:`InMemoryLabelled`, which check the item shape they hold.
    """

    #: a shuffle granularity only (nothing is read)
    block_size = 32

    def __init__(self, images: Tensor, rotations: Tensor,
                 identities: Tensor | None = None) -> None:  # fmt: skip
        self.images, self.rotations = images, rotations.float()
        self.identities = identities

    def __len__(self) -> int:
        return self.images.shape[0]

    def read_batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        batch = {"images": self.images[idx], "rotations": self.rotations[idx]}
        if self.identities is not None:
            batch["identities"] = self.identities[idx]
        batch["index"] = idx
        return batch

    def describe(self) -> dict[str, Any]:
        return {"source": "in-memory tensors"}


class InMemoryTriplets(InMemorySource):
    """Triplets held in tensors, like ``triplets.store.TripletDataset``.

    ``images`` ``(T, 3, 3, H, W)`` uint8 (anchor, positive, negative), ``rotations``
    ``(T, 3, 3, 3)``, ``identities`` ``(T, 3)`` (default zeros).
    """

    def __init__(self, images: Tensor, rotations: Tensor, identities: Tensor | None = None):
        if images.ndim != 5 or images.shape[1:3] != (3, 3):
            raise ValueError(f"expected images (T, 3, 3, H, W), got {tuple(images.shape)}")
        t = images.shape[0]
        super().__init__(images, rotations,
                         identities if identities is not None else torch.zeros(t, 3).long())


class InMemoryLabelled(InMemorySource):
    """Labelled images held in tensors, like ``triplets.store.LabelledDataset``.

    ``images`` ``(N, 3, H, W)`` uint8, ``rotations`` ``(N, 3, 3)``; batches carry no identities.
    """

    def __init__(self, images: Tensor, rotations: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {tuple(images.shape)} "
                             f"{images.dtype}")  # fmt: skip
        if rotations.shape != (images.shape[0], 3, 3):
            raise ValueError(f"expected rotations ({images.shape[0]}, 3, 3), got "
                             f"{tuple(rotations.shape)}")  # fmt: skip
        super().__init__(images, rotations)


class Prefix:
    """The first ``n`` items of a source (fine-tuning holds out the rest)."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, int(n)

    def __len__(self) -> int:
        return self.n

    @property
    def block_size(self) -> int:
        return self.dataset.block_size

    def read_batch(self, indices) -> dict[str, Tensor]:
        return self.dataset.read_batch(indices)

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.dataset, "describe", None)  # a user's source may lack it
        return dict(describe()) if callable(describe) else {"source": type(self.dataset).__name__}
