"""The validating reader: open, check labels and tables, verify digests, hash."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from clerf.errors import DataError
from triplets.store.schema import (
    CHUNK_CACHE_BYTES,
    REQUIRED,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    chunk_digest,
    read_attrs,
    store_state,
)


class Store:
    """A validated, read-only store. h5py is opened lazily, once per process.

    Attributes:
        path, kind (``"triplets"`` | ``"labelled"``), attrs (all file attributes, JSON text as
        stored), num_images, num_triplets, resolution, chunk (images per HDF5 chunk).
    """

    def __init__(self, path: Path, attrs: dict[str, Any], triplet_layout: str) -> None:
        self.path = path
        self.attrs = attrs
        self.kind: str = attrs["kind"]
        self.num_images = int(attrs["num_images"])
        self.num_triplets = int(attrs.get("num_triplets", 0))
        self.resolution = int(attrs["resolution"])
        self.chunk = int(attrs.get("chunk_images", 64))
        self.triplet_layout = triplet_layout
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Handles never travel to other processes (spawned DataLoader workers reopen lazily).
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state["_datasets"] = {}
        return state

    @property
    def file(self) -> h5py.File:
        """This process's read-only handle (reopened after a fork)."""
        if self._file is None or self._pid != os.getpid():
            self._datasets = {}
            self._file = h5py.File(
                self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007, rdcc_w0=0.0
            )
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._datasets = {}

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) of dataset ``name`` without fancy indexing.

        Rows are grouped by HDF5 chunk and each group is read as one covering slice.
        """
        return _read_rows(self.dataset(name), np.asarray(rows, dtype=np.int64), self.chunk)

    def dataset(self, name: str) -> h5py.Dataset:
        """This process's handle of dataset ``name``, kept open: the decompressed-chunk cache
        belongs to the open dataset, so reopening it per read would decompress chunks again."""
        f = self.file
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = f[name]
        return ds

    def read_range(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Images ``[start, stop)``: ``images``, ``rotations``, ``euler``, ``identities``."""
        f = self.file
        return {k: f[k][start:stop] for k in ("images", "rotations", "euler", "identities")}

    def triplet_table(self) -> np.ndarray:
        """``(T, 3)`` int64 image indices (anchor, positive, negative)."""
        if self.kind != "triplets":
            raise DataError(f"{self.path}: a {self.kind} store has no triplet table")
        return self.file["triplets"][:]

    def __repr__(self) -> str:
        return (f"Store('{self.path}', kind={self.kind}, images={self.num_images}, "
                f"triplets={self.num_triplets}, resolution={self.resolution})")


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, block: int) -> np.ndarray:
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    if len(rows) == 0:
        return out
    if rows.min() < 0 or rows.max() >= ds.shape[0]:
        raise IndexError(f"rows out of range [0, {ds.shape[0]}) for dataset {ds.name}")
    order = np.argsort(rows, kind="stable")
    s = rows[order]
    cut = np.flatnonzero(np.diff(s // block)) + 1
    for g0, g1 in zip(np.r_[0, cut], np.r_[cut, len(s)], strict=True):
        lo, hi = int(s[g0]), int(s[g1 - 1]) + 1
        part = ds[lo:hi]
        out[order[g0:g1]] = part[s[g0:g1] - lo]
    return out


def open_store(
    path: str | Path, *, require_complete: bool = True, verify: bool = False
) -> Store:
    """Open and validate a store; raise :class:`DataError` naming what is missing or wrong.

    Checks: the file exists and is HDF5 (not truncated), carries the clerf schema attributes,
    a supported schema version and kind, the required datasets with the right dtypes and shapes,
    the completion marker (unless ``require_complete=False``), and for sharded stores that every
    shard file is present and complete. With ``verify=True`` every committed chunk is re-hashed
    and compared with the digest recorded when it was written (reads the whole file).
    """
    p = Path(path)
    with _open_hdf5(p) as f:
        a = read_attrs(f)
        _check_header(f, p, a)
        if require_complete and not a.get("complete"):
            detail = ""
            if "progress/committed" in f:
                c = f["progress/committed"][:]
                detail = f": {int(c.sum())} of {len(c)} chunks committed"
            raise DataError(
                f"{p} is incomplete{detail} (no completion marker); finish it with "
                "`clerf generate ... --resume` or regenerate it"
            )
        _check_datasets(f, p, a)
        layout = _check_triplet_table(f, p, a) if a["kind"] == "triplets" else ""
        for rel in json.loads(a["shards"]) if a.get("shards") else []:
            sp = p.parent / rel
            state = store_state(sp)
            if state != "complete":
                raise DataError(f"{p}: shard file {sp} is {state}; the store cannot be read")
        if a.get("complete"):
            check_labels(f, p, layout)
    store = Store(p, a, layout)
    if verify:
        verify_store(store)
    return store


def _open_hdf5(p: Path) -> h5py.File:
    """``p`` opened read-only, or a :class:`DataError` saying why it cannot be."""
    if not p.exists():
        raise DataError(f"store not found: {p}")
    if p.is_dir():
        raise DataError(f"{p} is a directory, expected an HDF5 store file")
    try:
        hdf5 = h5py.is_hdf5(p)
    except OSError:
        hdf5 = False
    if not hdf5:
        raise DataError(
            f"{p} is not an HDF5 file (no HDF5 signature: wrong file or damaged header)"
        )
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise DataError(
            f"{p}: cannot open HDF5 file, it is truncated or corrupt ({' '.join(str(exc).split())})"
        ) from exc


def _check_header(f: h5py.File, p: Path, a: Mapping[str, Any]) -> None:
    """Schema name and version, kind, and the attributes every store has."""
    if a.get("schema") != SCHEMA_NAME:
        names = sorted(f.keys())[:6]
        raise DataError(
            f"{p} is not a clerf store: attribute 'schema' is {a.get('schema')!r}, expected "
            f"'{SCHEMA_NAME}' (found datasets {names})"
        )
    version = a.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise DataError(f"{p}: unsupported schema_version {version!r} "
                        f"(this clerf reads 1..{SCHEMA_VERSION})")
    kind = a.get("kind")
    if kind == "shard":
        raise DataError(f"{p} is shard {a.get('shard_index')} of a distributed store; open "
                        "its entry file instead")
    if kind not in ("triplets", "labelled"):
        raise DataError(f"{p}: attribute 'kind' is {kind!r}, expected 'triplets' or 'labelled'")
    for key in ("num_images", "resolution"):
        if key not in a:
            raise DataError(f"{p}: attribute '{key}' is missing")


def _check_datasets(f: h5py.File, p: Path, a: Mapping[str, Any]) -> None:
    """The required datasets, with their dtypes, ranks, row counts and image size."""
    n, r = int(a["num_images"]), int(a["resolution"])
    for name, (dtype, ndim) in REQUIRED.items():
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise DataError(f"{p}: dataset '{name}' is missing")
        ds = f[name]
        if ds.dtype != dtype or ds.ndim != ndim or ds.shape[0] != n:
            raise DataError(
                f"{p}: dataset '{name}' is {ds.dtype} {ds.shape}, expected {np.dtype(dtype)} "
                f"with {ndim} dims and {n} rows"
            )
    if f["images"].shape[1:] != (3, r, r):
        raise DataError(f"{p}: images are {f['images'].shape[1:]}, expected (3, {r}, {r})")


def _check_triplet_table(f: h5py.File, p: Path, a: Mapping[str, Any]) -> str:
    """The triplet table's shape; returns the layout (``interleaved`` or ``table``)."""
    if "triplets" not in f:
        raise DataError(f"{p}: dataset 'triplets' is missing")
    t = f["triplets"]
    if t.ndim != 2 or t.shape[1] != 3 or t.shape[0] != int(a.get("num_triplets", -1)):
        raise DataError(f"{p}: dataset 'triplets' is {t.shape}, expected "
                        f"({a.get('num_triplets')}, 3)")
    if a.get("anchor_source"):
        raise DataError(
            f"{p}: anchors in another store ('anchor_source') need a reader that "
            "supports it (schema extension, see triplets/SCHEMA.md)"
        )
    return a.get("triplet_layout") or "table"


#: rows of labels checked at a time when a store is opened
_CHECK_BLOCK = 1 << 16


def check_labels(f: h5py.File, path: Path, layout: str = "") -> None:
    """Refuse labels no reader should use: every rotation finite, orthonormal, ``det = +1``
    (:func:`clerf.geometry.first_non_rotation`), every triplet index inside the store, an
    ``interleaved`` layout really interleaved. Vectorised, by blocks (36 bytes an image).

    Raises:
        DataError: naming the store, the dataset and the first bad row.
    """
    from clerf.geometry import first_non_rotation

    rots = f["rotations"]
    n = rots.shape[0]
    for a in range(0, n, _CHECK_BLOCK):
        found = first_non_rotation(torch.from_numpy(rots[a:a + _CHECK_BLOCK].astype(np.float64)))
        if found is not None:
            raise DataError(f"{path}: dataset 'rotations' row {a + found[0][0]} is {found[1]}; "
                            "the store's labels are damaged, regenerate or re-prepare it")
    if "triplets" not in f:
        return
    table = f["triplets"]
    for a in range(0, table.shape[0], _CHECK_BLOCK):
        t = table[a:a + _CHECK_BLOCK]
        bad = np.nonzero(((t < 0) | (t >= n)).any(axis=1))[0]
        if len(bad):
            row = t[bad[0]].tolist()
            raise DataError(f"{path}: dataset 'triplets' row {a + int(bad[0])} is {row}, "
                            f"outside the {n} images [0, {n})")
        if layout == "interleaved":
            want = np.arange(3 * a, 3 * (a + len(t)), dtype=np.int64).reshape(-1, 3)
            diff = np.nonzero((t != want).any(axis=1))[0]
            if len(diff):
                raise DataError(f"{path}: dataset 'triplets' row {a + int(diff[0])} is "
                                f"{t[diff[0]].tolist()}, but the store says its layout is "
                                "interleaved (expected "
                                f"{want[diff[0]].tolist()})")  # fmt: skip


def verify_store(store: Store) -> int:
    """Re-hash every chunk and compare with the recorded digests; return chunks checked."""
    paths = ([store.path.parent / s for s in json.loads(store.attrs["shards"])]
             if store.attrs.get("shards") else [store.path])
    checked = 0
    for sp in paths:
        with h5py.File(sp, "r") as f:
            a = read_attrs(f)
            chunk, n = int(a["chunk_images"]), int(a.get("shard_stop", a["num_images"])) - int(
                a.get("shard_start", 0))
            extra = sorted(json.loads(a.get("extra_datasets", "{}")))  # digests hash extras sorted
            digests = f["progress/digest"][:]
            for k in range(len(digests)):
                s0, s1 = k * chunk, min((k + 1) * chunk, n)
                parts = [f["images"][s0:s1], f["rotations"][s0:s1], f["identities"][s0:s1]]
                parts += [f[e][s0:s1] for e in extra]
                if not np.array_equal(chunk_digest(parts), digests[k]):
                    raise DataError(f"{sp}: chunk {k} (images {s0}-{s1}) does not match its "
                                    "recorded digest: the file is corrupt")
                checked += 1
    return checked


def content_hash(path: str | Path | Store, datasets: Sequence[str] | None = None) -> str:
    """Hex digest of the stored values (not the file bytes): equal for equal data however it
    was written (one process, several shards, resumed...)."""
    store = path if isinstance(path, Store) else open_store(path)
    f = store.file
    names = datasets or [k for k in ("images", "rotations", "euler", "identities", "triplets")
                         if k in f]
    h = hashlib.blake2b(digest_size=20)
    step = max(store.chunk, 1) * 16
    for name in names:
        ds = f[name]
        h.update(f"{name}{ds.shape}{ds.dtype}".encode())
        for s in range(0, ds.shape[0], step):
            h.update(np.ascontiguousarray(ds[s : s + step]).tobytes())
    return h.hexdigest()
