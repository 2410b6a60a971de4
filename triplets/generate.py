"""The generate stage: config -> triplet store (``clerf generate``).

Pure orchestration of :mod:`triplets.poses`, :mod:`triplets.rules`, a generator from
:mod:`generators` and :class:`triplets.store.StoreWriter`:

* one process: a plain store at ``out``;
* ``accelerate launch`` with W processes: process r renders a chunk-aligned share into
  ``<out>.shards/shard-0000r-of-0000W.h5`` and the main process writes the entry file ``out``
  (HDF5 virtual datasets), which readers open as one store. The content equals the one-process
  file's (:func:`triplets.store.content_hash`).

Resumable in both cases (``resume=True`` continues partial files, chunk by chunk).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clerf.config import provenance, to_dict
from clerf.errors import ConfigError, DataError
from generators import PoseGenerator, build_generator
from generators.base import check_resolution
from triplets.poses import PoseSampler, build_pose_sampler
from triplets.rules import TripletRule, TripletSampler
from triplets.store import (
    COMPRESSIONS,
    StoreWriter,
    canonical_json,
    fingerprint_difference,
    store_state,
    write_entry_file,
)

__all__ = ["run_generate", "build_triplet_sampler", "shard_ranges", "shard_dir"]


def build_triplet_sampler(triplets: Any, seed: int, accept=None) -> TripletSampler:
    """The :class:`TripletSampler` of a ``triplets`` section (pose sampler and rules) and the
    experiment's ``seed``.

    Raises:
        ConfigError: impossible ``delta``, unknown sampler, bad ranges, too few identities.
    """
    t = triplets
    try:
        poses: PoseSampler = build_pose_sampler(t)
        rule = TripletRule(float(t.delta), str(t.negatives), bool(t.hard_negatives),
                           int(t.num_identities))
        return TripletSampler(int(seed), poses, rule, int(t.sampling_block), accept)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_config(cfg: DictConfig) -> None:
    t, s, g = cfg.triplets, cfg.store, cfg.generator
    problems = []
    if t.count <= 0:
        problems.append(f"triplets.count must be positive, got {t.count}")
    try:
        check_resolution(g.resolution)
    except ValueError as exc:
        problems.append(f"generator.{exc}")
    if s.chunk_images <= 0 or s.chunk_images % 3:
        problems.append(
            f"store.chunk_images must be a positive multiple of 3 for a triplet store (a "
            f"triplet never straddles two chunks), got {s.chunk_images}"
        )
    if s.compression not in COMPRESSIONS:
        problems.append(f"store.compression must be one of {COMPRESSIONS}, got '{s.compression}'")
    if s.compression == "gzip" and not 1 <= s.compression_level <= 9:
        problems.append(f"store.compression_level must be 1-9, got {s.compression_level}")
    if cfg.seed < 0:
        problems.append(f"seed must be non-negative, got {cfg.seed}")
    if problems:
        raise ConfigError("; ".join(problems))


def shard_ranges(total: int, chunk: int, world: int) -> list[tuple[int, int]]:
    """Chunk-aligned, ordered, contiguous image ranges, one per process (some may be empty)."""
    chunks = -(-total // chunk)
    bounds = [min(total, (chunks * r // world) * chunk) for r in range(world + 1)]
    bounds[-1] = total
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def shard_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.shards"


def _process_state(partial_state: Any, device: str) -> Any:
    """accelerate's process state; CPU-only when asked, when there is no GPU, or when
    ``ACCELERATE_USE_CPU`` is set (``PartialState`` ignores that variable by itself)."""
    import os

    from accelerate.utils import parse_flag_from_env

    cpu = (parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu"
           or not torch.cuda.is_available())
    state = partial_state(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and state.num_processes != launched:
        # every process would write the same file: refuse instead of racing
        raise DataError(
            f"launched with WORLD_SIZE={launched} but accelerate sees {state.num_processes} "
            "process(es); on CPU set ACCELERATE_USE_CPU=1 (see the README, Several GPUs)"
        )
    return state


def _device(name: str, state: Any) -> torch.device:
    if name == "auto":
        if state.num_processes > 1:
            return state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the stored values (not the device, layout or paths)."""
    return {
        "seed": int(cfg.seed),
        "generator": {"name": cfg.generator.name, "resolution": int(cfg.generator.resolution),
                      "params": to_dict(cfg.generator)["params"]},
        # anchor_repeats is real-anchor's alone: generated stores made before it existed match
        "triplets": {k: v for k, v in to_dict(cfg)["triplets"].items() if k != "anchor_repeats"},
    }


def run_generate(
    cfg: DictConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Render ``cfg.triplets.count`` triplets into the store ``out``; return its path.

    Args:
        cfg: a loaded :class:`clerf.config.ExperimentConfig` (``seed``, ``generator``,
            ``triplets``, ``store`` sections).
        out: the ``.h5`` file (the entry file under several processes).
        resume: continue a partial file (an error if the partial file came from another config).
        overwrite: replace an existing file (and its shards): the generator and sampler are
            built first, the new store is written beside the old one (``.NAME.overwrite.h5``)
            and replaces it only once complete, so a failure leaves the old store as it was.
        progress: show a progress bar (images/s, ETA) on the main process.

    Raises:
        ConfigError: bad config values (impossible ``delta``, unknown generator ...).
        DataError: ``out`` exists and is complete (needs ``overwrite``), is partial (needs
            ``resume``), or belongs to another config; a write error (the file stays resumable).
    """
    from accelerate import PartialState

    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    _check_config(cfg)
    state = _process_state(PartialState, cfg.generator.device)
    world = state.num_processes
    sdir = shard_dir(out)

    current = store_state(out)
    if current == "complete" and not overwrite:
        raise DataError(f"{out} already exists and is complete; use --overwrite to replace it")
    if current not in ("missing", "complete", "partial") and not overwrite:
        raise DataError(f"{out} exists and is {current}; use --overwrite to replace it")
    if not overwrite:
        stale = sorted(sdir.glob("shard-*.h5")) if sdir.is_dir() else []
        if world == 1 and stale and current == "missing":
            raise DataError(
                f"{sdir} holds a partial run with several processes; resume it with the same "
                "accelerate launch, or use --overwrite"
            )
        if world > 1 and current == "partial":
            raise DataError(
                f"{out} is a partial one-process file; resume it with one process, or use "
                "--overwrite"
            )
        foreign = [p for p in stale if not p.name.endswith(f"-of-{world:05d}.h5")]
        if world > 1 and foreign:
            raise DataError(
                f"{sdir} holds shards of a run with a different number of processes "
                f"({foreign[0].name}); use that many processes, or --overwrite"
            )
    # Everything that can refuse the config (generator, its weights' trust, sampler) is built
    # before anything on disk is touched: a failed --overwrite leaves the old store as it was.
    g = cfg.generator
    device = _device(g.device, state)
    try:
        params = OmegaConf.to_container(g.params, resolve=True)
        generator = build_generator(g.name, seed=int(cfg.seed), device=device, **params)
    except ValueError as exc:
        raise ConfigError(f"generator: {exc}") from exc
    sampler = build_triplet_sampler(cfg.triplets, int(cfg.seed), accept=generator.reachable)
    if overwrite and (out.exists() or sdir.exists()):
        # Written beside the old store, which is replaced only once the new one is complete.
        tmp = out.with_name(f".{out.stem}.overwrite{out.suffix}")
        nonempty, entry_attrs = _write(cfg, tmp, state, generator, sampler, device, progress,
                                       resume=False, overwrite=True, shown=out.name)
        if state.is_main_process:
            _install(tmp, out, nonempty, entry_attrs)
        state.wait_for_everyone()
        return out
    _write(cfg, out, state, generator, sampler, device, progress, resume=resume,
           overwrite=overwrite, shown=out.name)
    return out


def _install(tmp: Path, out: Path, nonempty: list[Path], entry_attrs: dict[str, Any]) -> None:
    """Replace the store ``out`` (file and shards) by the complete store written at ``tmp``."""
    sdir, new_sdir = shard_dir(out), shard_dir(tmp)
    old_sdir = out.parent / f".{sdir.name}.old"
    if old_sdir.exists():
        shutil.rmtree(old_sdir)
    if not nonempty:  # one file
        os.replace(tmp, out)
        if sdir.exists():
            shutil.rmtree(sdir)
        return
    if sdir.exists():
        os.replace(sdir, old_sdir)
    os.replace(new_sdir, sdir)
    write_entry_file(out, [sdir / p.name for p in nonempty], entry_attrs)
    tmp.unlink(missing_ok=True)
    shutil.rmtree(old_sdir, ignore_errors=True)


def _write(cfg: DictConfig, out: Path, state: Any, generator: Any, sampler: TripletSampler,
           device: torch.device, progress: bool, resume: bool, overwrite: bool,
           shown: str) -> tuple[list[Path], dict[str, Any]]:  # fmt: skip
    """Render into the store ``out``; return the shard files and entry attributes (sharded)."""
    world, rank = state.num_processes, state.process_index
    sdir = shard_dir(out)
    g = cfg.generator
    if overwrite and state.is_main_process:
        if out.exists():
            out.unlink()
        if sdir.is_dir():
            shutil.rmtree(sdir)
    state.wait_for_everyone()

    total = 3 * int(cfg.triplets.count)
    chunk = int(cfg.store.chunk_images)
    # the writer records the versions itself (reserved attributes)
    reserved = ("clerf_version", "conventions_version")
    attrs = {k: v for k, v in provenance(cfg).items() if k not in reserved}
    attrs.update(
        generator=_json_safe({"name": g.name, "resolution": int(g.resolution),
                              "params": generator.params(), "device": str(device)}),
        **sampler.params(),
        world_size=world,
    )
    common = dict(
        resolution=int(g.resolution), compression=str(cfg.store.compression),
        compression_level=int(cfg.store.compression_level), chunk=chunk,
        fingerprint=_fingerprint(cfg), resume=resume,
    )
    desc = f"generate {shown}" + (f" [rank 0 of {world}]" if world > 1 else "")
    if world == 1:
        writer = StoreWriter(out, "triplets", total=total, attrs=attrs, overwrite=overwrite,
                             **common)
        with writer:
            _fill(writer, 0, generator, sampler, int(g.resolution), progress, desc)
            writer.set_attrs(num_shards=1)
            writer.finalize()
        return [], {}

    lo, hi = shard_ranges(total, chunk, world)[rank]
    paths = [sdir / f"shard-{r:05d}-of-{world:05d}.h5" for r in range(world)]
    nonempty = [p for p, (a, b) in zip(paths, shard_ranges(total, chunk, world), strict=True)
                if b > a]
    if hi > lo and store_state(paths[rank]) == "complete":
        _check_complete_shard(paths[rank], common["fingerprint"])
    elif hi > lo:
        shard_attrs = dict(attrs, shard_index=rank, shard_start=lo, shard_stop=hi,
                           entry_file=shown, entry_kind="triplets")
        writer = StoreWriter(paths[rank], "shard", total=hi - lo, attrs=shard_attrs, **common)
        with writer:
            _fill(writer, lo, generator, sampler, int(g.resolution),
                  progress and state.is_main_process, desc)
            writer.finalize()
    state.wait_for_everyone()
    entry_attrs = {"kind": "triplets", "num_shards": len(nonempty)}
    if state.is_main_process:
        write_entry_file(out, nonempty, entry_attrs)
    state.wait_for_everyone()
    return nonempty, entry_attrs


def _check_complete_shard(path: Path, fingerprint: dict[str, Any]) -> None:
    """A complete shard left by an interrupted run is reused only if it has the same config."""
    import json

    import h5py

    with h5py.File(path, "r") as f:
        have = f.attrs.get("fingerprint")
    if have != json.dumps(fingerprint, sort_keys=True, default=str):
        raise DataError(f"{path} was made with a different configuration; use --overwrite")


def _json_safe(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _fill(
    writer: StoreWriter,
    offset: int,
    generator: PoseGenerator,
    sampler: TripletSampler,
    resolution: int,
    progress: bool,
    desc: str,
) -> None:
    """Render and commit every pending chunk of ``writer`` (global image index = offset + local)."""
    from tqdm.auto import tqdm

    pending = writer.pending()
    with tqdm(total=writer.total, initial=writer.total - sum(b - a for a, b in pending),
              unit="img", unit_scale=True, desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        for a, b in pending:
            g0, g1 = offset + a, offset + b
            plan = sampler.plan(g0 // 3, g1 // 3)
            ids, rots = plan.interleaved()
            with torch.no_grad():
                rendered = generator.render(
                    ids.to(generator.device), rots.to(torch.float32).to(generator.device),
                    resolution,
                )
            images = rendered.images
            if tuple(images.shape) != (b - a, 3, resolution, resolution):
                raise DataError(
                    f"generator '{generator.name}' returned images of shape "
                    f"{tuple(images.shape)}, expected ({b - a}, 3, {resolution}, {resolution})"
                )
            writer.write_chunk(a, images.cpu(), rendered.rotations.detach().cpu().double(),
                               ids.numpy().astype(np.int64))
            bar.update(b - a)


def generated_state(cfg: DictConfig, out: str | Path) -> str:
    """State of ``out`` for this config: ``"missing"``, ``"partial"`` or ``"complete"``.

    Used to skip a generate step that is already done (``clerf pipeline``).

    Raises:
        DataError: ``out`` is complete or partial but was made from another config (names the
            first differing key), or is not a usable store.
    """
    state = store_state(out)
    if state == "missing":
        return state
    if state not in ("partial", "complete"):
        raise DataError(f"{out} exists and is {state}; remove it or choose another --out")
    with h5py.File(out, "r") as f:
        have = f.attrs.get("fingerprint")
    want = canonical_json(_fingerprint(cfg))
    if have != want:
        raise DataError(
            f"{out} was generated from another config ({fingerprint_difference(have, want)}); "
            "remove it or choose another --out"
        )
    return state
