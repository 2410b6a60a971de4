"""CLERF's real-anchor triplets: a real photograph as anchor, renders at its pose as positive.

For every real image ``j`` of a prepared labelled store (``clerf prepare``) with label ``R_j``:

* **anchor**: the real image itself, **not copied**: the triplet store's rows ``[0, N_real)`` are
  an HDF5 virtual dataset mapping the labelled store;
* **positive**: the generator's render of a synthetic identity at exactly ``R_j``
  (look-at generators such as EG3D/PanoHead reach it through
  :func:`clerf.geometry.split_camera_inplane` inside their adapter; the rotation they report is
  checked against ``R_j``);
* **negative**: a render at a rotation at least ``triplets.delta`` deg from ``R_j``, drawn by the
  triplet rules of :mod:`triplets.rules` (``negatives``: ``poses`` or ``uniform``). With
  ``hard_negatives`` it shows the positive's identity (the render pair differs in pose only),
  else another identity.

Files: ``<out>.rendered.h5`` holds the renders (a labelled store written with
:class:`triplets.store.StoreWriter`, so it is resumable; rows ``2j`` / ``2j + 1`` are the positive /
negative of triplet ``j``; extra datasets ``anchor_row`` and ``role`` (1 positive, 2 negative)), and
``<out>`` is the entry file: ``images``, ``rotations``, ``euler``, ``identities`` are virtual
datasets (rows ``[0, N_real)`` = the labelled store, then the renders) and ``triplets[j] =
[anchor_row_j, N_real + 2j, N_real + 2j + 1]`` (``triplet_layout = "table"``). The two source files
are listed in the ``shards`` attribute, so :func:`triplets.store.open_store` checks that both are
present and complete. Keep the three files in their folders (paths are stored relative).

With ``triplets.anchor_repeats = k`` every real image anchors ``k`` triplets (tiled: triplet
``j`` has anchor ``j mod n``), each with its own rendered identities and negative.

Identities: real rows keep the labelled store's ids (300W-LP face id or -1), rendered rows hold
generator identities; the two namespaces are unrelated (attribute ``identity_namespaces``).
Real images the generator cannot render (``reachable`` is false, e.g. EG3D beyond its yaw range)
get no triplet; they are counted (``count_unreachable_anchors``) and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from clerf.config import provenance, to_dict
from clerf.devices import resolve_device
from clerf.errors import ConfigError, DataError
from clerf.geometry import geodesic_distance
from clerf.versions import CONVENTIONS_VERSION, __version__
from generators import PoseGenerator, build_generator
from triplets.poses import build_pose_sampler
from triplets.rules import TripletRule, TripletSampler
from triplets.store import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    EntrySource,
    ExtraSpec,
    Store,
    StoreWriter,
    canonical_json,
    open_store,
    store_state,
    write_virtual_entry,
)

__all__ = ["RealAnchorResult", "run_real_anchor", "rendered_path"]

log = logging.getLogger("clerf.triplets")

#: seed stream of the real-anchor plans (triplets.rules uses stream 1 for generated triplets)
_STREAM_REAL_ANCHOR = 5
#: a positive is accepted when the generator reports a rotation this close to the anchor's (deg)
POSITIVE_TOLERANCE_DEG = 0.5
_ROLE_POSITIVE, _ROLE_NEGATIVE = 1, 2


@dataclass
class RealAnchorResult:
    path: Path
    rendered: Path
    num_triplets: int
    unreachable: int


def rendered_path(out: Path) -> Path:
    return out.parent / f"{out.name}.rendered.h5"


def run_real_anchor(
    cfg: DictConfig,
    real_store: str | Path,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RealAnchorResult:
    """Build the real-anchor triplet store ``out`` over the labelled store ``real_store``.

    Uses ``cfg.seed``, ``cfg.generator`` (name, params, device; renders at the real store's
    resolution), ``cfg.triplets`` (``delta``, ``negatives``, ``hard_negatives``,
    ``num_identities``, ``sampling_block``, ``anchor_repeats`` and the pose ranges for
    ``negatives: poses``) and
    ``cfg.store`` (compression, chunk size, rounded up to an even number of images).

    Raises:
        DataError: missing/incomplete/foreign real store, existing output, generator failures.
        ConfigError: impossible triplet rules.
    """
    out = Path(out)
    real = _open_real(real_store, out, overwrite)
    # With overwrite, the old entry file stays until the new one replaces it, and the rendered
    # store is replaced only once complete (StoreWriter): a failure loses nothing.
    poses, rule, gen = _build(cfg)
    R_real = torch.from_numpy(real.file["rotations"][:].astype(np.float64))
    anchor_rows, unreachable = _reachable_anchors(R_real, gen, real)
    repeats = int(cfg.triplets.anchor_repeats)
    if repeats < 1:
        raise ConfigError(f"triplets.anchor_repeats must be at least 1, got {repeats}")
    # Repeats are tiled: pass k over all anchors comes before pass k + 1, so every prefix of
    # the triplets covers the anchors evenly.
    anchor_rows = anchor_rows.repeat(repeats)
    n_real, n_t = len(R_real), len(anchor_rows)
    R_anchor = R_real[anchor_rows]
    try:
        sampler = TripletSampler(int(cfg.seed), poses, rule, int(cfg.triplets.sampling_block),
                                 accept=gen.reachable, anchors=R_anchor,
                                 stream=_STREAM_REAL_ANCHOR)  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    chunk = int(cfg.store.chunk_images)
    chunk += chunk % 2  # a positive and its negative never straddle two chunks
    fingerprint = _fingerprint(cfg, real, R_anchor, anchor_rows)
    prov = {k: v for k, v in provenance(cfg).items()
            if k not in ("clerf_version", "conventions_version")}
    rp = rendered_path(out)
    writer = _rendered_writer(cfg, rp, real.resolution, 2 * n_t, chunk, fingerprint, resume,
                              overwrite, {**prov, "stage": "real_anchor",  # fmt: skip
                                          "generator": {"name": gen.name, "params": gen.params()},
                                          "real_store": os.path.relpath(real.path, out.parent)})
    if writer is not None:
        with writer:
            _render(writer, sampler, gen, anchor_rows, real.resolution, progress)

    table = np.stack([anchor_rows.numpy(),
                      n_real + 2 * np.arange(n_t), n_real + 2 * np.arange(n_t) + 1], 1)
    _write_entry(out, real, rp, n_real, 2 * n_t, chunk, table, {
        **prov,
        "stage": "real_anchor",
        "generator": json.dumps({"name": gen.name, "params": gen.params()}, sort_keys=True),
        "triplet_rule": json.dumps(rule.params(), sort_keys=True),
        "real_store": os.path.relpath(real.path, out.parent),
        "rendered_store": os.path.relpath(rp, out.parent),
        "count_unreachable_anchors": int(unreachable),
        "identity_namespaces": "rows < num_real: labelled store ids; others: generator ids",
        "num_real": int(n_real),
        "anchor_repeats": int(repeats),
        "source_dataset": str(real.attrs.get("source_dataset", "")),
    })
    return RealAnchorResult(out, rp, n_t, int(unreachable))


def _open_real(real_store: str | Path, out: Path, overwrite: bool) -> Store:
    """The labelled store of real images, once ``out`` is known to be writable."""
    real = open_store(real_store)
    if real.kind != "labelled":
        raise DataError(f"{real.path}: real anchors come from a labelled store, not {real.kind}")
    state = store_state(out)
    if state == "complete" and not overwrite:
        raise DataError(f"{out} already exists and is complete; use --overwrite to replace it")
    if state not in ("missing", "complete") and not overwrite:
        raise DataError(f"{out} exists but is not a usable store ({state}); use --overwrite")
    return real


def _build(cfg: DictConfig) -> tuple[Any, TripletRule, PoseGenerator]:
    """Pose sampler, triplet rule and generator of the config; config errors as such."""
    t = cfg.triplets
    try:
        poses = build_pose_sampler(t)
        rule = TripletRule(float(t.delta), str(t.negatives), bool(t.hard_negatives),
                           int(t.num_identities))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if int(t.sampling_block) <= 0 or cfg.seed < 0:
        raise ConfigError("triplets.sampling_block must be positive and seed non-negative")
    g = cfg.generator
    try:
        device = resolve_device(g.device, "generator.device")
        gen = build_generator(g.name, seed=int(cfg.seed), device=device,
                              **to_dict(cfg)["generator"]["params"])
    except ValueError as exc:
        raise ConfigError(f"generator: {exc}") from exc
    return poses, rule, gen


def _reachable_anchors(R_real: Tensor, gen: PoseGenerator, real: Store) -> tuple[Tensor, int]:
    """Rows of the real images the generator can render, and how many it cannot."""
    reach = gen.reachable(R_real.to(torch.float32).to(gen.device)).to(torch.bool).cpu()
    anchor_rows = torch.nonzero(reach).flatten()
    unreachable = len(R_real) - len(anchor_rows)
    if unreachable:
        log.warning("%d of %d real images are outside what generator '%s' can render: no "
                    "triplet for them", unreachable, len(R_real), gen.name)
    if len(anchor_rows) == 0:
        raise DataError(f"{real.path}: the generator '{gen.name}' can render none of the poses")
    return anchor_rows, unreachable


def _fingerprint(cfg: DictConfig, real: Store, R_anchor: Tensor, anchor_rows: Tensor
                 ) -> dict[str, Any]:  # fmt: skip
    """What the renders depend on: a resumed or reused rendered store must match it."""
    c = to_dict(cfg)
    return {
        "seed": int(cfg.seed),
        "generator": {"name": cfg.generator.name, "params": c["generator"]["params"]},
        "triplets": {k: c["triplets"][k] for k in (
            "delta", "negatives", "hard_negatives", "num_identities", "sampling_block", "poses",
            "pitch_range", "yaw_range", "roll_range", "max_camera_angle", "inplane_range")},
        **({"anchor_repeats": int(cfg.triplets.anchor_repeats)}
           if int(cfg.triplets.anchor_repeats) != 1 else {}),
        "real_store": str(real.attrs.get("fingerprint", "")),
        "anchors": hashlib.blake2b(
            R_anchor.numpy().tobytes() + anchor_rows.numpy().tobytes(), digest_size=16
        ).hexdigest(),
        "resolution": real.resolution,
    }


def _rendered_writer(cfg: DictConfig, rp: Path, res: int, n: int, chunk: int,
                     fingerprint: dict[str, Any], resume: bool, overwrite: bool,
                     attrs: dict[str, Any]) -> StoreWriter | None:  # fmt: skip
    """The writer of the rendered store, or None when a complete one from an earlier run that
    stopped before its entry file can be reused."""
    if store_state(rp) == "complete" and not overwrite:
        import h5py

        with h5py.File(rp, "r") as f:
            same = f.attrs.get("fingerprint") == canonical_json(fingerprint)
        if not same:
            raise DataError(f"{rp} exists from another configuration; use --overwrite")
        return None
    extra = {"anchor_row": ExtraSpec((), np.int64), "role": ExtraSpec((), np.uint8)}
    return StoreWriter(
        rp, "labelled", res, n, attrs=attrs, compression=cfg.store.compression,
        compression_level=cfg.store.compression_level, chunk=chunk, extra=extra,
        fingerprint=fingerprint, resume=resume, overwrite=overwrite,
    )  # fmt: skip


def _render(writer: StoreWriter, sampler: TripletSampler, gen: PoseGenerator,
            anchor_rows: Tensor, res: int, progress: Callable[[int], None] | None) -> None:
    """Render every pending chunk: rows ``2j`` / ``2j + 1`` are triplet ``j``'s positive (at
    exactly the real anchor's rotation, checked) and negative."""
    for start, stop in writer.pending():
        t0, t1 = start // 2, stop // 2
        plan = sampler.plan(t0, t1)
        ids = torch.stack([plan.anchor_ids, plan.negative_ids], 1).reshape(-1)
        rots = torch.stack([plan.anchor_rotations, plan.negative_rotations], 1)
        rots = rots.reshape(-1, 3, 3).to(torch.float32)
        try:
            rendered = gen.render(ids.to(gen.device), rots.to(gen.device), res)
        except ValueError as exc:
            raise DataError(f"generator '{gen.name}' failed: {exc}") from exc
        got = rendered.rotations.detach().cpu().to(torch.float64)
        err = geodesic_distance(got[0::2], plan.anchor_rotations)
        if float(err.max()) > POSITIVE_TOLERANCE_DEG:
            j = int(err.argmax()) + t0
            raise DataError(
                f"generator '{gen.name}' rendered the positive of triplet {j} "
                f"{float(err.max()):.2f} deg away from its real anchor's rotation "
                f"(tolerance {POSITIVE_TOLERANCE_DEG} deg)"
            )
        rows = anchor_rows[t0:t1].repeat_interleave(2)
        roles = np.tile(np.array([_ROLE_POSITIVE, _ROLE_NEGATIVE], np.uint8), t1 - t0)
        writer.write_chunk(start, rendered.images.cpu(), got, ids,
                           extra={"anchor_row": rows.numpy(), "role": roles})
        if progress is not None:
            progress(t1 - t0)
    writer.finalize()


def _write_entry(out: Path, real: Store, rendered: Path, n_real: int, n_rendered: int,
                 chunk: int, table: np.ndarray, attrs: dict[str, Any]) -> None:
    """The entry file: the real store's rows then the renders, and the triplet table."""
    import h5py

    names = ("images", "rotations", "euler", "identities")
    sources = []
    for path, start, stop in ((real.path, 0, n_real),
                              (rendered, n_real, n_real + n_rendered)):  # fmt: skip
        with h5py.File(path, "r") as f:
            sources.append(EntrySource(Path(path), start, stop,
                                       {k: (f[k].shape, f[k].dtype) for k in names}))
            compression = str(f.attrs.get("compression", ""))
    n = n_real + n_rendered
    meta = {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "kind": "triplets",
        "resolution": int(real.resolution), "chunk_images": int(chunk),
        "num_chunks": -(-n // chunk), "compression": compression,
        "euler_order": "pitch,yaw,roll", "angle_units": "deg",
        "conventions_version": CONVENTIONS_VERSION, "clerf_version": __version__,
        "anchor_source": "", "extra_datasets": "{}",
    }  # fmt: skip
    write_virtual_entry(out, sources, names, {**attrs, **meta}, triplets=table)
