"""The clerf HDF5 store: schema, resumable writer, validating reader, torch datasets and loaders.

One schema family serves two kinds of store (full description in ``triplets/SCHEMA.md``):

* ``kind="triplets"``: rendered anchor/positive/negative images; triplet ``t`` is the images
  ``3t, 3t+1, 3t+2`` (anchor, positive, negative) and the ``triplets`` table says so explicitly.
* ``kind="labelled"``: single labelled images (real datasets prepared by ``clerf prepare``).

Every image has a uint8 ``(3, H, W)`` RGB array, a float32 rotation ``(3, 3)`` (rows = head axes
in camera coordinates, ``docs/conventions.md``), Euler degrees ``(pitch, yaw, roll)`` derived
from it with :func:`clerf.geometry.euler_from_rotation`, and an int64 identity.

Writing (:class:`StoreWriter`) is resumable: the image axis is cut into commit chunks of ``chunk``
images (also the HDF5 chunk), each chunk's data is written and flushed before its entry in the
progress record is set and flushed, and the completion marker is only set by
:meth:`StoreWriter.finalize`. A process killed at any moment leaves a file whose committed chunks
are whole; reopening with ``resume=True`` rewrites only the missing chunks.

Reading (:func:`open_store`, :class:`TripletDataset`, :class:`LabelledDataset`,
:func:`make_loader`) validates the file once, then opens h5py lazily in each process (DataLoader
workers never share a handle) and reads contiguous slices only: h5py fancy indexing is a hundred
times slower (measured with h5py on this project's 2-core machines).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clerf.config import first_difference
from clerf.errors import DataError
from clerf.files import replacing, temp_path_beside
from clerf.versions import CONVENTIONS_VERSION, __version__

__all__ = [
    "EntrySource",
    "write_virtual_entry",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "KINDS",
    "COMPRESSIONS",
    "ExtraSpec",
    "StoreWriter",
    "Store",
    "open_store",
    "store_state",
    "content_hash",
    "write_entry_file",
    "TripletDataset",
    "LabelledDataset",
    "BlockBatchSampler",
    "make_loader",
]

SCHEMA_NAME = "clerf-store"
SCHEMA_VERSION = 1
#: ``shard`` files are the per-process parts of a distributed store; readers open the entry file.
KINDS = ("triplets", "labelled", "shard")
COMPRESSIONS = ("none", "lzf", "gzip")
EULER_ORDER = "pitch,yaw,roll"
_DIGEST_BYTES = 16
#: raw-data chunk cache per open dataset (bytes): holds several decompressed chunks so that a
#: batch touching a compressed chunk several times decompresses it once.
_CHUNK_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ExtraSpec:
    """An extra per-image dataset: ``shape`` after the image axis and a numpy dtype.

    Use ``h5py.string_dtype()`` for text (e.g. the source file of a real image).
    """

    shape: tuple[int, ...] = ()
    dtype: Any = np.float32


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _attr_value(value: Any) -> Any:
    """Attributes are scalars or strings; anything else is stored as JSON text."""
    if isinstance(value, bool | int | float | str | np.integer | np.floating):
        return value
    return canonical_json(value)


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _chunk_digest(arrays: Sequence[np.ndarray]) -> np.ndarray:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for a in arrays:
        if a.dtype == object:
            for item in a.reshape(-1):
                h.update(item.encode() if isinstance(item, str) else bytes(item))
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _euler_deg(rotations: np.ndarray) -> np.ndarray:
    from clerf.geometry import euler_from_rotation

    e = euler_from_rotation(torch.from_numpy(rotations.astype(np.float64)))
    return torch.stack([e.pitch, e.yaw, e.roll], dim=-1).numpy().astype(np.float32)


def _filter_kwargs(compression: str, level: int) -> dict[str, Any]:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": int(level)}
    raise ValueError(f"store compression must be one of {COMPRESSIONS}, got '{compression}'")


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Create (or resume) a store and fill it chunk by chunk.

    Args:
        path: the ``.h5`` file to write.
        kind: ``"triplets"``, ``"labelled"`` or ``"shard"`` (see ``triplets/SCHEMA.md``).
        resolution: images are ``(3, resolution, resolution)`` uint8.
        total: number of images ``N`` (a multiple of 3 for triplet stores).
        attrs: provenance written as file attributes (generator, config, counts...); values that
            are not scalars/strings are stored as JSON text. Reserved names are refused.
        compression: ``"none"``, ``"lzf"`` or ``"gzip"`` (level ``compression_level``).
        chunk: images per commit chunk and per HDF5 chunk (a multiple of 3 for triplet stores, so
            a triplet never straddles two chunks).
        extra: extra per-image datasets, ``{name: ExtraSpec}``; each :meth:`write_chunk` call then
            passes ``extra={name: array}``.
        fingerprint: JSON-friendly description of everything that determines the content; a
            resumed file must have been started with the same one.
        triplets: ``(T, 3)`` int64 table for triplet stores; default the interleaved table
            ``[[0, 1, 2], [3, 4, 5], ...]``. Indices may point outside this file only through a
            documented source attribute (``anchor_source``, see SCHEMA.md).
        resume: continue an existing partial file; without it an existing partial file is an
            error that says to resume.
        overwrite: replace an existing file, complete or not.

    Raises:
        DataError: the file exists (complete, or partial without ``resume``), or belongs to a
            different configuration, or cannot be written.
        ValueError: inconsistent arguments.

    Example:
        >>> with StoreWriter("x.h5", "labelled", 64, total=100, chunk=32) as w:  # doctest: +SKIP
        ...     for start, stop in w.pending():
        ...         w.write_chunk(start, images[start:stop], rotations[start:stop], ids[start:stop])
        ...     w.finalize()
    """

    _RESERVED = {
        "schema", "schema_version", "kind", "resolution", "num_images", "num_triplets",
        "chunk_images", "num_chunks", "compression", "complete", "fingerprint",
        "euler_order", "angle_units", "conventions_version", "clerf_version", "extra_datasets",
        "triplet_layout",
    }  # fmt: skip

    def __init__(
        self,
        path: str | Path,
        kind: str,
        resolution: int,
        total: int,
        *,
        attrs: Mapping[str, Any] | None = None,
        compression: str = "none",
        compression_level: int = 4,
        chunk: int = 96,
        extra: Mapping[str, ExtraSpec] | None = None,
        fingerprint: Any = None,
        triplets: np.ndarray | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        if kind not in KINDS:
            raise ValueError(f"store kind must be one of {KINDS}, got '{kind}'")
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"store compression must be one of {COMPRESSIONS}, got '{compression}'"
            )
        if resolution <= 0 or total <= 0 or chunk <= 0:
            raise ValueError(
                f"resolution, total and chunk must be positive, got {resolution}, {total}, {chunk}"
            )
        if kind == "triplets" and (total % 3 or chunk % 3):
            raise ValueError(
                f"a triplet store needs total and chunk to be multiples of 3, got {total}, {chunk}"
            )
        clash = self._RESERVED & set(attrs or {})
        if clash:
            raise ValueError(f"attrs may not set reserved store attributes {sorted(clash)}")
        self.kind = kind
        self.resolution = int(resolution)
        self.total = int(total)
        self.chunk = int(chunk)
        self.num_chunks = -(-self.total // self.chunk)
        self.extra = dict(extra or {})
        self.fingerprint = canonical_json(fingerprint)
        self._file: h5py.File | None = None
        # Overwriting writes a sibling file that replaces the old store in finalize(): a run
        # that fails or is killed before then leaves the old store as it was.
        self._write_path = self.path
        if overwrite and self.path.exists():
            self._write_path = self.path.with_name(f".{self.path.stem}.overwrite{self.path.suffix}")
        self.overwriting = self._write_path != self.path

        if self.path.exists() and not overwrite:
            state = store_state(self.path)
            if state == "complete":
                raise DataError(
                    f"{self.path} already exists and is complete; use --overwrite to replace it"
                )
            if not resume:
                raise DataError(
                    f"{self.path} exists but is incomplete ({state}); use --resume to continue it "
                    "or --overwrite to start again"
                )
            if state != "partial":
                raise DataError(
                    f"{self.path} cannot be resumed: {state}; use --overwrite to start again"
                )
            self._open_existing()
        else:
            self._create(attrs or {}, compression, compression_level, triplets)

    # -- creation / resume

    def _create(
        self,
        attrs: Mapping[str, Any],
        compression: str,
        level: int,
        triplets: np.ndarray | None,
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Build the empty structure in a temporary file and move it into place, so a kill during
        # creation never leaves a half-made file under the final name.
        tmp = temp_path_beside(self.path)
        try:
            with h5py.File(tmp, "w") as f:
                self._build(f, attrs, compression, level, triplets)
            os.replace(tmp, self._write_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._file = h5py.File(self._write_path, "r+")

    def _build(self, f, attrs, compression, level, triplets) -> None:
        n, c, r = self.total, min(self.chunk, self.total), self.resolution
        filt = _filter_kwargs(compression, level)
        f.create_dataset("images", (n, 3, r, r), np.uint8, chunks=(c, 3, r, r), **filt)
        f.create_dataset("rotations", (n, 3, 3), np.float32, chunks=(c, 3, 3), **filt)
        f.create_dataset("euler", (n, 3), np.float32, chunks=(c, 3), **filt)
        f.create_dataset("identities", (n,), np.int64, chunks=(c,), **filt)
        f["euler"].attrs["order"] = EULER_ORDER
        f["euler"].attrs["units"] = "deg"
        f["rotations"].attrs["convention"] = (
            "R = Rz(roll) @ Ry(yaw) @ Rx(pitch); rows = head axes (right, up, nose) in camera "
            "coordinates x=image right, y=image up, z=toward viewer (docs/conventions.md)"
        )
        for name, spec in self.extra.items():
            if name in ("images", "rotations", "euler", "identities", "triplets", "progress"):
                raise ValueError(f"extra dataset name '{name}' is reserved")
            f.create_dataset(name, (n, *spec.shape), spec.dtype, chunks=(c, *spec.shape), **filt)
        layout = ""
        if self.kind == "triplets":
            t = n // 3
            interleaved = np.arange(n, dtype=np.int64).reshape(t, 3)
            table = interleaved if triplets is None else np.asarray(triplets, dtype=np.int64)
            if table.ndim != 2 or table.shape[1] != 3:
                raise ValueError(f"triplets table must be (T, 3), got {table.shape}")
            f.create_dataset("triplets", data=table)
            f["triplets"].attrs["columns"] = "anchor,positive,negative"
            layout = "interleaved" if np.array_equal(table, interleaved) else "table"
        prog = f.create_group("progress")
        prog.create_dataset("committed", (self.num_chunks,), np.uint8, fillvalue=0)
        prog.create_dataset("digest", (self.num_chunks, _DIGEST_BYTES), np.uint8, fillvalue=0)
        a = f.attrs
        a["schema"] = SCHEMA_NAME
        a["schema_version"] = SCHEMA_VERSION
        a["kind"] = self.kind
        a["resolution"] = r
        a["num_images"] = n
        a["num_triplets"] = len(f["triplets"]) if self.kind == "triplets" else 0
        a["triplet_layout"] = layout
        a["chunk_images"] = self.chunk
        a["num_chunks"] = self.num_chunks
        a["compression"] = compression if compression != "gzip" else f"gzip-{level}"
        a["euler_order"] = EULER_ORDER
        a["angle_units"] = "deg"
        a["conventions_version"] = CONVENTIONS_VERSION
        a["clerf_version"] = __version__
        a["extra_datasets"] = canonical_json(
            {k: [list(s.shape), str(np.dtype(s.dtype))] for k, s in self.extra.items()}
        )
        a["fingerprint"] = self.fingerprint
        a.setdefault("anchor_source", "")
        for k, v in attrs.items():
            a[k] = _attr_value(v)
        a["complete"] = False

    def _open_existing(self) -> None:
        try:
            f = h5py.File(self.path, "r+")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot reopen to resume ({exc})") from exc
        a = _read_attrs(f)
        expected = {
            "kind": self.kind, "resolution": self.resolution, "num_images": self.total,
            "chunk_images": self.chunk, "fingerprint": self.fingerprint,
        }  # fmt: skip
        for key, want in expected.items():
            have = a.get(key)
            if have != want:
                f.close()
                what = (fingerprint_difference(have, want) if key == "fingerprint"
                        else f"{key}: {have!r} then, {want!r} now")
                raise DataError(
                    f"{self.path} was started with a different configuration ({what}); "
                    "use --overwrite to start again"
                )
        missing = [k for k in self.extra if k not in f]
        if missing:
            f.close()
            raise DataError(f"{self.path}: extra datasets {missing} missing; use --overwrite")
        self._file = f

    # -- writing

    def pending(self) -> list[tuple[int, int]]:
        """Image ranges ``[(start, stop), ...]`` of the chunks not yet committed, in order."""
        committed = self._f["progress/committed"][:]
        return [self._range(k) for k in np.flatnonzero(committed == 0).tolist()]

    @property
    def committed(self) -> int:
        """Number of images already committed."""
        committed = self._f["progress/committed"][:]
        return int(sum(self._range(k)[1] - self._range(k)[0] for k in np.flatnonzero(committed)))

    def _range(self, k: int) -> tuple[int, int]:
        return k * self.chunk, min((k + 1) * self.chunk, self.total)

    @property
    def _f(self) -> h5py.File:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        return self._file

    def write_chunk(
        self,
        start: int,
        images: np.ndarray | torch.Tensor,
        rotations: np.ndarray | torch.Tensor,
        identities: np.ndarray | torch.Tensor,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write and commit whole chunks beginning at image ``start``.

        ``start`` must be a chunk boundary and the number of images a multiple of ``chunk``
        (or reach ``total``). ``images`` ``(n, 3, H, W)`` uint8, ``rotations`` ``(n, 3, 3)``
        (float, proper rotations), ``identities`` ``(n,)`` integers. Rewriting a committed chunk
        is allowed (same data in a deterministic pipeline).

        Raises:
            DataError: wrong shape/dtype/values (naming the field), or a write error (the file
                stays resumable: the failed chunks are not marked committed).
        """
        imgs = _to_numpy(images)
        rots = _to_numpy(rotations)
        ids = _to_numpy(identities)
        n = len(imgs)
        stop = start + n
        r = self.resolution
        if start % self.chunk or start < 0 or stop > self.total or n == 0:
            raise ValueError(
                f"write_chunk: start {start} must be a multiple of chunk {self.chunk} and "
                f"start + n ({stop}) at most total {self.total}"
            )
        if n % self.chunk and stop != self.total:
            raise ValueError(
                f"write_chunk: {n} images is not a whole number of {self.chunk}-image chunks"
            )
        if imgs.dtype != np.uint8 or imgs.shape != (n, 3, r, r):
            raise DataError(
                f"{self.path}: images must be uint8 ({n}, 3, {r}, {r}), "
                f"got {imgs.dtype} {tuple(imgs.shape)}"
            )
        if rots.shape != (n, 3, 3):
            raise DataError(f"{self.path}: rotations must be ({n}, 3, 3), got {tuple(rots.shape)}")
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"{self.path}: identities must be ({n},) integers, got "
                            f"{ids.dtype} {tuple(ids.shape)}")
        from clerf.geometry import check_rotation

        try:
            check_rotation(torch.from_numpy(rots.astype(np.float64)), tol=1e-3, name="rotations")
        except ValueError as exc:
            raise DataError(f"{self.path}: {exc}") from exc
        rots32 = rots.astype(np.float32)
        ids64 = ids.astype(np.int64)
        extras: dict[str, np.ndarray] = {}
        for name, spec in self.extra.items():
            if extra is None or name not in extra:
                raise DataError(f"{self.path}: write_chunk is missing extra dataset '{name}'")
            arr = np.asarray(extra[name])
            if arr.shape != (n, *spec.shape):
                raise DataError(f"{self.path}: extra '{name}' must be ({n}, "
                                f"{', '.join(map(str, spec.shape))}), got {arr.shape}")
            extras[name] = arr
        unknown = set(extra or {}) - set(self.extra)
        if unknown:
            raise DataError(f"{self.path}: extra datasets {sorted(unknown)} were not declared")
        f = self._f
        try:
            self._write_arrays(start, stop, imgs, rots32, ids64, extras)
            f.flush()  # data first ...
            for k in range(start // self.chunk, -(-stop // self.chunk)):
                a, b = self._range(k)
                sl = slice(a - start, b - start)
                parts = [imgs[sl], rots32[sl], ids64[sl], *(extras[e][sl] for e in sorted(extras))]
                f["progress/digest"][k] = _chunk_digest(parts)
                f["progress/committed"][k] = 1
            f.flush()  # ... then the progress record that says it is there
        except OSError as exc:
            self.close()
            if self.overwriting:
                raise DataError(
                    f"writing images {start}-{stop} of {self.path} failed ({exc}); the existing "
                    "store is unchanged: fix the cause and rerun with --overwrite"
                ) from exc
            raise DataError(
                f"writing images {start}-{stop} of {self.path} failed ({exc}); the file keeps "
                "its committed chunks: fix the cause and rerun with --resume"
            ) from exc

    def _write_arrays(self, start, stop, imgs, rots, ids, extras) -> None:
        f = self._f
        f["images"][start:stop] = imgs
        f["rotations"][start:stop] = rots
        f["euler"][start:stop] = _euler_deg(rots)
        f["identities"][start:stop] = ids
        for name, arr in extras.items():
            f[name][start:stop] = arr

    def set_attrs(self, **attrs: Any) -> None:
        """Add or update provenance attributes (e.g. counts known only at the end)."""
        clash = self._RESERVED & set(attrs)
        if clash:
            raise ValueError(f"attrs may not set reserved store attributes {sorted(clash)}")
        for k, v in attrs.items():
            self._f.attrs[k] = _attr_value(v)

    def finalize(self) -> Path:
        """Set the completion marker once every chunk is committed; close; return the path."""
        left = self.pending()
        if left:
            raise DataError(
                f"{self.path}: cannot finalize, {len(left)} of {self.num_chunks} chunks are not "
                f"written (first at image {left[0][0]})"
            )
        import datetime as _dt

        f = self._f
        f.attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = True
        f.flush()
        self.close()
        if self.overwriting:
            os.replace(self._write_path, self.path)
        return self.path

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing after a write error must not mask it
                pass
            self._file = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fingerprint_difference(old_json: Any, new_json: str) -> str:
    """First differing key between two fingerprints (JSON text), for error messages."""
    try:
        old, new = json.loads(old_json), json.loads(new_json)
    except (TypeError, ValueError):
        return "fingerprint differs"
    return first_difference(old, new) or "fingerprint differs"


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def store_state(path: str | Path) -> str:
    """``"complete"``, ``"partial"``, ``"missing"`` or a short reason it is not a usable store."""
    p = Path(path)
    if not p.exists():
        return "missing"
    try:
        with h5py.File(p, "r") as f:
            a = _read_attrs(f)
    except OSError as exc:
        return f"unreadable HDF5 ({' '.join(str(exc).split())[:120]})"
    if a.get("schema") != SCHEMA_NAME:
        return "not a clerf store"
    return "complete" if a.get("complete") else "partial"


# --------------------------------------------------------------------------- distributed entry


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
            a = _read_attrs(f)
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
            f.attrs[k] = _attr_value(v)
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


# --------------------------------------------------------------------------- reader


_REQUIRED = {
    "images": (np.uint8, 4),
    "rotations": (np.float32, 3),
    "euler": (np.float32, 2),
    "identities": (np.int64, 1),
}


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
                self.path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES, rdcc_nslots=10007, rdcc_w0=0.0
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
        a = _read_attrs(f)
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
    for name, (dtype, ndim) in _REQUIRED.items():
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
            a = _read_attrs(f)
            chunk, n = int(a["chunk_images"]), int(a.get("shard_stop", a["num_images"])) - int(
                a.get("shard_start", 0))
            extra = sorted(json.loads(a.get("extra_datasets", "{}")))  # digests hash extras sorted
            digests = f["progress/digest"][:]
            for k in range(len(digests)):
                s0, s1 = k * chunk, min((k + 1) * chunk, n)
                parts = [f["images"][s0:s1], f["rotations"][s0:s1], f["identities"][s0:s1]]
                parts += [f[e][s0:s1] for e in extra]
                if not np.array_equal(_chunk_digest(parts), digests[k]):
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


# --------------------------------------------------------------------------- torch datasets


class _StoreDataset(Dataset):
    def __init__(self, path: str | Path | Store) -> None:
        self.store = path if isinstance(path, Store) else open_store(path)

    @property
    def block_size(self) -> int:
        """Items per HDF5 chunk: the natural shuffle block (see :class:`BlockBatchSampler`)."""
        raise NotImplementedError

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

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


class _Batches(Dataset):
    """Adapter: ``loader`` items are whole batches read by ``dataset.read_batch(indices)``."""

    def __init__(self, dataset: _StoreDataset) -> None:
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
        _Batches(dataset), batch_size=None, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
    )
