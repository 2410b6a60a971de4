"""The store's schema: names, kinds, attributes, chunk digests, fingerprints, file state."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import h5py
import numpy as np
import torch

from clerf.config import Compression, first_difference

SCHEMA_NAME = "clerf-store"
SCHEMA_VERSION = 1
#: ``shard`` files are the per-process parts of a distributed store; readers open the entry file.
KINDS = ("triplets", "labelled", "shard")
#: the ``store.compression`` choices (:data:`clerf.config.Compression`)
COMPRESSIONS: tuple[str, ...] = get_args(Compression)
EULER_ORDER = "pitch,yaw,roll"
DIGEST_BYTES = 16
#: raw-data chunk cache per open dataset (bytes): holds several decompressed chunks so that a
#: batch touching a compressed chunk several times decompresses it once.
CHUNK_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ExtraSpec:
    """An extra per-image dataset: ``shape`` after the image axis and a numpy dtype.

    Use ``h5py.string_dtype()`` for text (e.g. the source file of a real image).
    """

    shape: tuple[int, ...] = ()
    dtype: Any = np.float32


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def attr_value(value: Any) -> Any:
    """Attributes are scalars or strings; anything else is stored as JSON text."""
    if isinstance(value, bool | int | float | str | np.integer | np.floating):
        return value
    return canonical_json(value)


def read_attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def chunk_digest(arrays: Sequence[np.ndarray]) -> np.ndarray:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for a in arrays:
        if a.dtype == object:
            for item in a.reshape(-1):
                h.update(item.encode() if isinstance(item, str) else bytes(item))
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def euler_deg(rotations: np.ndarray) -> np.ndarray:
    from clerf.geometry import euler_from_rotation

    e = euler_from_rotation(torch.from_numpy(rotations.astype(np.float64)))
    return torch.stack([e.pitch, e.yaw, e.roll], dim=-1).numpy().astype(np.float32)


def filter_kwargs(compression: str, level: int) -> dict[str, Any]:
    if compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": int(level)}
    raise ValueError(f"store compression must be one of {COMPRESSIONS}, got '{compression}'")


def fingerprint_difference(old_json: Any, new_json: str) -> str:
    """First differing key between two fingerprints (JSON text), for error messages."""
    try:
        old, new = json.loads(old_json), json.loads(new_json)
    except (TypeError, ValueError):
        return "fingerprint differs"
    return first_difference(old, new) or "fingerprint differs"


def to_numpy(x: Any) -> np.ndarray:
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
            a = read_attrs(f)
    except OSError as exc:
        return f"unreadable HDF5 ({' '.join(str(exc).split())[:120]})"
    if a.get("schema") != SCHEMA_NAME:
        return "not a clerf store"
    return "complete" if a.get("complete") else "partial"


REQUIRED = {
    "images": (np.uint8, 4),
    "rotations": (np.float32, 3),
    "euler": (np.float32, 2),
    "identities": (np.int64, 1),
}
