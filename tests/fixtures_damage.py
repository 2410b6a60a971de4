"""Damaged copies of a good store, with the chunk digests re-signed (the damage is in the labels,
not a corrupt file: only a label check can find it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

#: what a damaged copy holds in row ``row`` of ``rotations`` (or of ``triplets`` for "index")
DAMAGES = ("nan", "scaled", "singular", "index")


def damaged_copy(src: Path, dst: Path, how: str, row: int = 5) -> Path:
    """Copy the one-file store ``src`` to ``dst`` with row ``row`` damaged as ``how`` says."""
    import json

    from triplets.store.schema import chunk_digest, read_attrs

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        if how == "index":
            t = f["triplets"][:]
            t[row, 2] = int(f.attrs["num_images"]) + 7
            f["triplets"][:] = t
            return dst
        R = f["rotations"][row].astype(np.float64)
        R = {"nan": np.full((3, 3), np.nan), "scaled": 1.5 * R,
             "singular": np.stack([R[0], R[0], R[2]])}[how]  # fmt: skip
        f["rotations"][row] = R.astype(np.float32)
        a = read_attrs(f)
        chunk, n = int(a["chunk_images"]), int(a["num_images"])
        k = row // chunk
        s0, s1 = k * chunk, min((k + 1) * chunk, n)
        extra = sorted(json.loads(a.get("extra_datasets", "{}")))
        parts = [f["images"][s0:s1], f["rotations"][s0:s1], f["identities"][s0:s1]]
        parts += [f[e][s0:s1] for e in extra]
        f["progress/digest"][k] = chunk_digest(parts)
    return dst
