"""The resumable store writer (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from clerf.errors import DataError
from clerf.files import temp_path_beside
from clerf.versions import CONVENTIONS_VERSION, __version__
from triplets.store.schema import (
    COMPRESSIONS,
    DIGEST_BYTES,
    EULER_ORDER,
    KINDS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    ExtraSpec,
    attr_value,
    canonical_json,
    chunk_digest,
    euler_deg,
    filter_kwargs,
    fingerprint_difference,
    read_attrs,
    store_state,
    to_numpy,
)


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
        filt = filter_kwargs(compression, level)
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
        prog.create_dataset("digest", (self.num_chunks, DIGEST_BYTES), np.uint8, fillvalue=0)
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
            a[k] = attr_value(v)
        a["complete"] = False

    def _open_existing(self) -> None:
        try:
            f = h5py.File(self.path, "r+")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot reopen to resume ({exc})") from exc
        a = read_attrs(f)
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
        imgs = to_numpy(images)
        rots = to_numpy(rotations)
        ids = to_numpy(identities)
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
                f["progress/digest"][k] = chunk_digest(parts)
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
        f["euler"][start:stop] = euler_deg(rots)
        f["identities"][start:stop] = ids
        for name, arr in extras.items():
            f[name][start:stop] = arr

    def set_attrs(self, **attrs: Any) -> None:
        """Add or update provenance attributes (e.g. counts known only at the end)."""
        clash = self._RESERVED & set(attrs)
        if clash:
            raise ValueError(f"attrs may not set reserved store attributes {sorted(clash)}")
        for k, v in attrs.items():
            self._f.attrs[k] = attr_value(v)

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
