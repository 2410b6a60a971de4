"""Torch datasets over stores, the block batch sampler and the loader."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clerf.errors import DataError
from triplets.store.reader import Store, open_store


@runtime_checkable
class DataSource(Protocol):
    """What the training stages read from: a store, tensors in memory or a stream from the
    generator (chosen in ``clerf/data_sources.py``; streams in ``clerf/streaming.py``).

    * ``len(source)``: the number of items: images for a labelled source, triplets for a triplet
      source (a stream: the samples of one epoch).
    * ``block_size``: how many consecutive items are cheap to read together; the
      :class:`BlockBatchSampler` shuffles whole blocks of this many (then the items inside a
      window of blocks), so one batch reads few HDF5 chunks. A store: the items per chunk (a
      triplet store's chunk holds ``chunk`` images, ``chunk // 3`` triplets); in memory: 32, a
      shuffle granularity only (nothing is read); a stream: 1 (batches are rendered whole).
    * ``read_batch(indices)``: a dict of tensors with a leading axis of ``len(indices)``: at least
      ``images`` (uint8), ``rotations`` (float32) and ``index`` (int64); stores and streams add
      ``identities``. Labelled items are ``(B, 3, H, W)`` images and ``(B, 3, 3)`` rotations;
      triplet items ``(B, 3, 3, H, W)`` and ``(B, 3, 3, 3)`` (anchor, positive, negative).
    * ``describe()``: what a model trained on the source remembers of it (JSON-friendly, saved in
      its training summary). A source of cropped photos names its ``crop_preset`` and ``resize``
      (``clerf.data.crop``), a rendered one its ``generator``: ``clerf finetune`` derives the
      saved model's crop protocol from these keys (``crop_protocol`` in ``clerf/finetune.py``).
    """

    def __len__(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


#: store attributes that :meth:`_StoreDataset.describe` passes on (provenance and crop protocol)
DESCRIBED_ATTRS = ("stage", "dataset", "split", "crop_preset", "resize", "generator")


class _StoreDataset(Dataset):
    def __init__(self, path: str | Path | Store) -> None:
        self.store = path if isinstance(path, Store) else open_store(path)

    @property
    def block_size(self) -> int:
        """Items per HDF5 chunk: the natural shuffle block (see :class:`BlockBatchSampler`)."""
        raise NotImplementedError

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The store's path, kind, resolution and size, and its :data:`DESCRIBED_ATTRS`."""
        store = self.store
        info: dict[str, Any] = {"path": str(store.path), "kind": store.kind,
                                "resolution": store.resolution, "num_images": store.num_images}
        for key in DESCRIBED_ATTRS:
            if key in store.attrs:
                v = store.attrs[key]
                v = v.decode() if isinstance(v, bytes) else v
                if isinstance(v, str) and v[:1] in "{[":
                    try:  # stores keep structured attributes as JSON text
                        v = json.loads(v)
                    except ValueError:
                        pass
                info[key] = v if isinstance(v, (str, int, float, bool, dict, list)) else str(v)
        return info

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # Lets a plain DataLoader(batch_size=...) fetch a batch with few contiguous reads.
        batch = self.read_batch(indices)
        return [self._item(batch, i) for i in range(len(indices))]

    def _item(self, batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in batch.items()}


class TripletDataset(_StoreDataset):
    """Triplets of a ``kind="triplets"`` store.

    ``dataset[t]`` is ``{"images": (3, 3, H, W) uint8 [anchor, positive, negative],
    "rotations": (3, 3, 3) float32, "identities": (3,) int64, "index": () int64}``;
    :meth:`read_batch` returns the same with a leading batch axis ``B``.
    """

    def __init__(self, path: str | Path | Store) -> None:
        super().__init__(path)
        if self.store.kind != "triplets":
            raise DataError(f"{self.store.path} is a {self.store.kind} store; TripletDataset "
                            "needs a triplet store (use LabelledDataset)")
        self._table: np.ndarray | None = None

    def __len__(self) -> int:
        return self.store.num_triplets

    @property
    def block_size(self) -> int:
        return max(self.store.chunk // 3, 1)

    def _image_rows(self, idx: np.ndarray) -> np.ndarray:
        if self.store.triplet_layout == "interleaved":
            return (3 * idx[:, None] + np.arange(3)).reshape(-1)
        if self._table is None:  # small (T x 3 int64); read once per process
            self._table = self.store.triplet_table()
        return self._table[idx].reshape(-1)

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"triplet index out of range [0, {len(self)})")
        rows = self._image_rows(idx)
        b, r = len(idx), self.store.resolution
        st = self.store
        return {
            "images": torch.from_numpy(st.read_rows("images", rows)).view(b, 3, 3, r, r),
            "rotations": torch.from_numpy(st.read_rows("rotations", rows)).view(b, 3, 3, 3),
            "identities": torch.from_numpy(st.read_rows("identities", rows)).view(b, 3),
            "index": torch.from_numpy(idx.copy()),
        }

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        batch = self.read_batch([int(t)])
        return {k: v[0] for k, v in batch.items()}


class LabelledDataset(_StoreDataset):
    """Single labelled images of any store kind (a triplet store's images are labelled too).

    ``dataset[i]`` is ``{"image": (3, H, W) uint8, "rotation": (3, 3) float32,
    "identity": () int64, "index": () int64}``; :meth:`read_batch` returns ``{"images":
    (B, 3, H, W), "rotations": (B, 3, 3), "identities": (B,), "index": (B,)}``.
    """

    def __len__(self) -> int:
        return self.store.num_images

    @property
    def block_size(self) -> int:
        return self.store.chunk

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        st = self.store
        return {
            "images": torch.from_numpy(st.read_rows("images", idx)),
            "rotations": torch.from_numpy(st.read_rows("rotations", idx)),
            "identities": torch.from_numpy(st.read_rows("identities", idx)),
            "index": torch.from_numpy(idx.copy()),
        }

    def _item(self, batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        return {"image": batch["images"][i], "rotation": batch["rotations"][i],
                "identity": batch["identities"][i], "index": batch["index"][i]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self._item(self.read_batch([int(i)]), 0)


class BlockBatchSampler(Sampler[list[int]]):
    """Batches of item indices, shuffled by contiguous blocks, deterministic and DDP-sharded.

    Each epoch: the blocks (``block_size`` consecutive items, by default one HDF5 chunk) are put
    in a random order; the items of every ``buffer_blocks`` consecutive blocks are shuffled
    together; the resulting sequence is cut into one equal contiguous share per rank (disjoint;
    with ``drop_last=False`` the shares are padded to equal length from the start of the
    sequence, as ``DistributedSampler`` does) and then into batches. A batch therefore touches
    about ``buffer_blocks`` chunks, each read once as one slice.

    The order depends only on ``(seed, epoch)``: call :meth:`set_epoch` every epoch.
    ``shuffle=False`` gives the items in order.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        block_size: int = 32,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        buffer_blocks: int = 4,
    ) -> None:
        if batch_size <= 0 or block_size <= 0 or buffer_blocks <= 0:
            raise ValueError("batch_size, block_size and buffer_blocks must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_items < world_size:
            raise ValueError(f"{num_items} items cannot be shared by {world_size} ranks")
        self.num_items, self.batch_size, self.block_size = num_items, batch_size, block_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last, self.buffer_blocks = drop_last, buffer_blocks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _share(self) -> int:
        n, w = self.num_items, self.world_size
        return n // w if self.drop_last else -(-n // w)

    def order(self) -> np.ndarray:
        """This rank's item order for the current epoch, ``(share,)`` int64."""
        n = self.num_items
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            nb = -(-n // self.block_size)
            blocks = rng.permutation(nb)
            starts = blocks * self.block_size
            seq = np.concatenate(
                [np.arange(s, min(s + self.block_size, n)) for s in starts]
            ).astype(np.int64)
            per = self.buffer_blocks * self.block_size
            for s in range(0, n, per):
                # in-place shuffle of one buffer's worth of items
                seq[s : s + per] = rng.permutation(seq[s : s + per])
        else:
            seq = np.arange(n, dtype=np.int64)
        share = self._share()
        total = share * self.world_size
        if total > n:
            seq = np.concatenate([seq, seq[: total - n]])
        return seq[self.rank * share : (self.rank + 1) * share]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for s in range(0, stop, self.batch_size):
            yield order[s : s + self.batch_size].tolist()

    def __len__(self) -> int:
        share = self._share()
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)


class BatchDataset(Dataset):
    """A source as a dataset whose items are whole batches: ``batches[indices]`` is
    ``source.read_batch(indices)``. Give it to a ``DataLoader(batch_size=None)`` with a batch
    sampler as ``sampler`` (:func:`make_loader` with :class:`BlockBatchSampler`; the streams of
    ``clerf.streaming`` with theirs): one read per batch, in the main process or a worker.

    Args:
        dataset: any :class:`DataSource` (a store dataset, tensors in memory, a stream).
    """

    def __init__(self, dataset: DataSource) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.dataset.read_batch(indices)


def make_loader(
    dataset: TripletDataset | LabelledDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    block_size: int | None = None,
    buffer_blocks: int = 4,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader over a store dataset yielding batch dicts (see the dataset classes).

    Batches come from a :class:`BlockBatchSampler`, available as ``loader.sampler``; call
    ``loader.sampler.set_epoch(epoch)`` each epoch.
    Under DDP pass ``rank``/``world_size``: each rank gets a disjoint share of equal length.
    Each worker opens the file itself.
    """
    sampler = BlockBatchSampler(
        len(dataset), batch_size, block_size or dataset.block_size, shuffle=shuffle, seed=seed,
        rank=rank, world_size=world_size, drop_last=drop_last, buffer_blocks=buffer_blocks,
    )
    return DataLoader(
        BatchDataset(dataset), batch_size=None, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
    )
