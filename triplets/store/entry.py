"""Entry files: virtual datasets over shards, or over a real and a rendered store."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from clerf.errors import DataError
from clerf.files import replacing
from triplets.store.schema import (
    EULER_ORDER,
    attr_value,
    canonical_json,
    read_attrs,
)


def write_entry_file(
    path: str | Path,
    shard_paths: Sequence[str | Path],
    attrs: Mapping[str, Any],
    triplets: np.ndarray | None = None,
) -> Path:
    """Write the entry file of a sharded store: virtual datasets over complete shard files.

    The shards (written by :class:`StoreWriter` with ``kind="shard"``, attributes
    ``shard_start``/``shard_stop``) must tile ``[0, N)`` in order. Shard paths are stored relative
    to the entry file's folder, which is where HDF5 looks for them; keep the folder together.
    ``attrs`` must contain ``kind`` (``"triplets"`` or ``"labelled"``); the rest is provenance.
    A triplets store without ``triplets`` is interleaved (rows ``3t, 3t+1, 3t+2``); a given
    ``triplets`` table ``(T, 3)`` is stored as such (``triplet_layout = "table"``).
    """
    sources = []
    first: dict[str, Any] = {}
    expect = 0
    for sp in shard_paths:
        sp = Path(sp)
        with h5py.File(sp, "r") as f:
            a = read_attrs(f)
            if not a.get("complete") or a.get("kind") != "shard":
                raise DataError(f"{sp}: not a complete shard (kind {a.get('kind')!r})")
            shapes = {k: (f[k].shape, f[k].dtype) for k in f if isinstance(f[k], h5py.Dataset)}
        if int(a["shard_start"]) != expect:
            raise DataError(f"{sp}: shard starts at {a['shard_start']}, expected {expect}")
        expect = int(a["shard_stop"])
        sources.append(EntrySource(sp, int(a["shard_start"]), expect, shapes))
        first = first or a
    skip = ("shard_start", "shard_stop", "shard_index", "completed", "complete")
    merged = {**{k: v for k, v in first.items() if k not in skip}, **attrs}
    return write_virtual_entry(path, sources, list(sources[0].shapes), merged, triplets)


@dataclass
class EntrySource:
    """Rows ``[start, stop)`` of an entry file come from the file ``path`` (its datasets and
    their ``(shape, dtype)``)."""

    path: Path
    start: int
    stop: int
    shapes: dict[str, tuple[tuple[int, ...], Any]]


def write_virtual_entry(
    path: str | Path,
    sources: Sequence[EntrySource],
    names: Sequence[str],
    attrs: Mapping[str, Any],
    triplets: np.ndarray | None = None,
) -> Path:
    """The one writer of entry files: datasets ``names`` as virtual datasets over ``sources``
    (which tile ``[0, N)`` in order), a triplet table for ``kind="triplets"``, the attributes.

    Used for sharded stores (:func:`write_entry_file`) and CLERF's real-anchor stores (real
    labelled store + rendered store). Paths are stored relative to the entry's folder. Built in
    a temporary file and renamed, so it appears complete or not at all.
    """
    path = Path(path)
    n = sources[-1].stop
    kind = attrs["kind"]
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        for name in names:
            shape, dtype = sources[0].shapes[name]
            layout = h5py.VirtualLayout(shape=(n, *shape[1:]), dtype=dtype)
            for src in sources:
                rel = os.path.relpath(src.path, path.parent)
                layout[src.start:src.stop] = h5py.VirtualSource(rel, name,
                                                                shape=src.shapes[name][0])
            f.create_virtual_dataset(name, layout)
        f["euler"].attrs["order"] = EULER_ORDER
        f["euler"].attrs["units"] = "deg"
        num_triplets = 0
        if kind == "triplets":
            table = (np.arange(n, dtype=np.int64).reshape(n // 3, 3) if triplets is None
                     else np.asarray(triplets, dtype=np.int64))
            f.create_dataset("triplets", data=table)
            f["triplets"].attrs["columns"] = "anchor,positive,negative"
            num_triplets = len(table)
        for k, v in attrs.items():
            f.attrs[k] = attr_value(v)
        f.attrs["kind"] = kind
        f.attrs["num_images"] = n
        f.attrs["num_triplets"] = num_triplets
        f.attrs["triplet_layout"] = ("" if kind != "triplets"
                                     else "interleaved" if triplets is None else "table")
        f.attrs["num_shards"] = len(sources)
        f.attrs["shards"] = canonical_json([os.path.relpath(s.path, path.parent)
                                            for s in sources])  # fmt: skip
        f.attrs["complete"] = True
    return path
