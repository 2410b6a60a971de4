"""The ``prepare`` stage: a real dataset -> a labelled HDF5 store (``triplets/SCHEMA.md``).

Pass 1 scans the dataset (labels, the +-99 deg protocol filter, a decode check of every kept
image; see :mod:`clerf.data.base`), so bad input is reported before anything is written.
Pass 2 crops every kept image with the protocol crop (:mod:`clerf.data.crop`), resizes it to the
store resolution (PIL bilinear, antialiased when shrinking; ``center`` = torchvision
``Resize(r)`` + ``CenterCrop(r)``) and writes it with :class:`triplets.store.StoreWriter`
(resumable chunks, completion marker). Labels become matrices through
:func:`clerf.geometry.rotation_from_euler` only.

Per-image extra datasets: ``source_key`` (the sample's path in its dataset), ``crop_box``
(int32 ``x0, y0, x1, y1`` in source pixels, half-open; the whole image for the ``none`` preset),
``crop_k`` (the margin factor; NaN for ``none``) and ``dataset_euler`` (float64 ``pitch, yaw,
roll`` in degrees **as the dataset stores them**: ``Pose_Para``, or the BIWI ``.npz`` pose after
its sign convention; yaw may exceed 90 there, unlike the ``euler`` derived from the matrix: the
ground truth of the published-comparable Euler MAE, docs/conventions.md section 7). File
attributes carry the source dataset, split, crop preset and its factors (including how -1
landmarks were treated) and how many kept images had missing landmarks, the resize mode, the k
seed, the scan counts (kept, rejected by the angle filter, skipped as bad, beyond +-99 deg, per
subset) and the resolved config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from clerf.config import PrepareConfig, provenance, section_config
from clerf.data.base import RealDataset, RealSample, ScanReport, dataset_class, rotations_of
from clerf.data.crop import (
    CropPreset,
    get_preset,
    has_missing_landmarks,
    protocol_crop,
    resize_square,
    sample_k,
)
from clerf.errors import ConfigError, DataError
from clerf.geometry import PROTOCOL_MAX_ABS_ANGLE

__all__ = [
    "PrepareResult", "run_prepare", "build_dataset", "identities_of", "process_sample",
    "select_budget",
]

log = logging.getLogger("clerf.data")

INTERPOLATION = "PIL bilinear (antialiased when shrinking)"
_RESERVED_PROVENANCE = {"clerf_version", "conventions_version"}  # the writer sets these itself


@dataclass
class PrepareResult:
    """What :func:`run_prepare` made."""

    path: Path
    report: ScanReport
    split: str
    crop: str
    num_images: int
    resumed_from: int  # images already committed when the run started
    missing_landmarks: int = 0  # kept images with at least one -1 landmark


def build_dataset(pc: DictConfig | Any) -> RealDataset:
    """The (unscanned) loader a ``prepare`` config section describes."""
    if not pc.dataset:
        raise ConfigError("prepare.dataset is empty: give 300wlp, aflw2000, biwi or pointing04")
    if not pc.root:
        raise ConfigError("prepare.root is empty: give the dataset's directory (BIWI: .npz)")
    cls = dataset_class(pc.dataset)
    common = dict(max_abs_angle=pc.max_abs_angle, skip_bad=bool(pc.skip_bad),
                  verify_images=pc.verify_images)
    if cls.name == "300wlp":
        return cls(pc.root, subsets=list(pc.subsets) or None, **common)
    if cls.name == "pointing04":
        # every Pointing'04 label lies within +-99 deg: no filter unless max_abs_angle differs
        if pc.max_abs_angle == PROTOCOL_MAX_ABS_ANGLE:
            common["max_abs_angle"] = None
        return cls(pc.root, subsets=list(pc.subsets) or None, **common)
    if cls.name == "biwi":
        # BIWI is evaluated whole: the angle filter only when asked for (biwi_filter)
        if not bool(getattr(pc, "biwi_filter", False)):
            common["max_abs_angle"] = None
        return cls(pc.root, signs=pc.biwi_signs, channels=pc.biwi_channels, **common)
    if list(pc.subsets):
        raise ConfigError(
            f"prepare.subsets applies to 300wlp and pointing04 only, not {cls.name}"
        )
    return cls(pc.root, **common)


_VIEW_SUFFIX = re.compile(r"_\d+$")


def identities_of(dataset: RealDataset, samples: list[RealSample]) -> np.ndarray:
    """int64 identity per sample; -1 = unknown.

    300W-LP: one id per source face, shared by its synthesized views and its ``_Flip`` twin
    (``AFW/AFW_134212_1_3`` and ``AFW_Flip/AFW_134212_1_0`` -> face ``AFW_134212_1``), numbered
    in sorted order of the faces present. Pointing'04: the person's number (1-15), which the
    loader puts in each sample. AFLW2000 and the BIWI ``.npz`` do not say who is pictured: -1.
    """
    if samples and all(s.identity is not None for s in samples):
        return np.array([s.identity for s in samples], dtype=np.int64)
    if dataset.name != "300wlp":
        return np.full(len(samples), -1, dtype=np.int64)
    faces = [_VIEW_SUFFIX.sub("", s.key.rsplit("/", 1)[-1]) for s in samples]
    ids = {f: i for i, f in enumerate(sorted(set(faces)))}
    return np.array([ids[f] for f in faces], dtype=np.int64)


def select_budget(samples: list[RealSample], n: int, seed: int) -> list[RealSample]:
    """A label budget: ``n`` of ``samples``, spread as evenly as possible over identities.

    Identities (unknown ones count as one group) take turns in a seeded random order, each
    giving its next image of a seeded shuffle, until ``n`` are picked; the result keeps the
    samples' order. Deterministic in ``(samples, n, seed)``; a smaller budget of the same seed
    is a subset of a larger one.
    """
    if n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xB0D6E7]))
    groups: dict[object, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.identity, []).append(i)
    order = [list(rng.permutation(idx)) for _, idx in sorted(groups.items(), key=lambda kv:
                                                              str(kv[0]))]
    turn = list(rng.permutation(len(order)))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for g in turn:
            if depth < len(order[g]) and len(picked) < n:
                picked.append(int(order[g][depth]))
        depth += 1
    return [samples[i] for i in sorted(picked)]


def process_sample(
    image: np.ndarray,
    sample: RealSample,
    preset: CropPreset,
    k: float,
    resolution: int,
    resize: str,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop + resize one image: ``(3, r, r)`` uint8 RGB and the crop box in source pixels."""
    source = str(sample.image_path or sample.key)
    crop, box = protocol_crop(image, sample.pt2d, preset, k, source, box=sample.box)
    if box is None:
        box = (0, 0, image.shape[1], image.shape[0])
    out = resize_square(crop, resolution, resize)
    return np.ascontiguousarray(out.transpose(2, 0, 1)), box


def _worker(args: tuple) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    # Runs in a worker process: file-backed samples only (paths and landmarks are picklable).
    from clerf.data.mat import read_rgb_image

    sample, preset, k, resolution, resize = args
    return process_sample(read_rgb_image(sample.image_path), sample, preset, k, resolution, resize)


def _content_digest(samples: list[RealSample]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for s in samples:
        h.update(s.key.encode())
        h.update(np.asarray(s.euler, dtype=np.float64).tobytes())
        if s.pt2d is not None:
            h.update(np.ascontiguousarray(s.pt2d, dtype=np.float64).tobytes())
        if s.box is not None:
            h.update(np.asarray(s.box, dtype=np.float64).tobytes())
    return h.hexdigest()


def run_prepare(
    cfg: DictConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_scanned: Callable[[ScanReport, int], None] | None = None,
) -> PrepareResult:
    """Convert ``cfg.prepare``'s dataset into a labelled store at ``out``.

    Args:
        cfg: experiment config (sections ``prepare``, ``store``, and ``seed`` = the k seed).
        out: the ``.h5`` to write.
        resume: continue a partial file (same configuration and data required).
        overwrite: replace an existing file.
        progress: called with the number of images written after each chunk.
        on_scanned: called once after the scan with the report and the images left to write.

    Raises:
        ConfigError: bad ``prepare`` values. DataError: bad data, or an existing output.
    """
    from triplets.store import ExtraSpec, StoreWriter, store_state

    pc = cfg.prepare
    out = Path(out)
    section_config(PrepareConfig, pc, "prepare")  # as load_config does (configs built in code)
    ds = build_dataset(pc)
    split = pc.split or ds.default_split
    try:
        preset = get_preset(pc.crop or ds.default_crop[split])
    except ValueError as exc:
        raise ConfigError(f"prepare.crop: {exc}") from None
    # Refuse an existing output before a long scan, with the writer's own rules and wording.
    state = store_state(out)
    if not overwrite and state == "complete":
        raise DataError(f"{out} already exists and is complete; use --overwrite to replace it")
    if not overwrite and state != "missing" and not resume:
        raise DataError(
            f"{out} exists but is incomplete ({state}); use --resume to continue it "
            "or --overwrite to start again"
        )

    report = ds.scan()
    samples = ds.samples
    if not samples:
        raise DataError(f"{ds.root}: no sample left to prepare ({report.summary()})")
    seed = int(cfg.seed)
    scanned_kept = len(samples)
    if int(pc.max_images) > 0:
        samples = select_budget(samples, int(pc.max_images), seed)
        log.info("%s: a label budget of %d of the %d kept images (seed %d, spread evenly over "
                 "identities)", ds.name, len(samples), scanned_kept, seed)
    ks = [sample_k(preset, seed, s.key) if preset.enabled else float("nan") for s in samples]
    rotations = rotations_of(samples).numpy()
    identities = identities_of(ds, samples)
    keys = np.array([s.key for s in samples], dtype=object)
    dataset_euler = np.array([s.euler for s in samples], dtype=np.float64)
    n_missing = sum(has_missing_landmarks(s.pt2d) for s in samples)
    if preset.enabled:
        log.info("%s: %d of %d kept images have missing (-1) landmarks; crop preset %s %s them",
                 ds.name, n_missing, len(samples), preset.name,
                 "takes them as coordinates (as the peers do) with" if preset.missing == "peers"
                 else "excludes")

    fingerprint = {
        "dataset": ds.name,
        "dataset_params": ds.params(),
        "root": str(Path(pc.root).resolve()),
        "split": split,
        "crop": asdict(preset),
        "k_seed": seed if preset.random else None,
        "resolution": int(pc.resolution),
        "resize": pc.resize,
        "max_abs_angle": ds.max_abs_angle,
        "samples": _content_digest(samples),
    }
    if int(pc.max_images) > 0:  # (absent otherwise: older partial stores still resume)
        fingerprint["max_images"] = int(pc.max_images)
    prov = {k: v for k, v in provenance(cfg).items() if k not in _RESERVED_PROVENANCE}
    attrs = {
        **prov,
        **report.as_attrs(),
        "stage": "prepare",
        "dataset_params": ds.params(),
        "split": split,
        "crop_preset": preset.name,
        "crop_preset_params": asdict(preset),
        "crop_missing_landmarks": preset.missing if preset.enabled else "n/a (no crop)",
        "count_missing_landmarks": int(n_missing),
        "crop_k_seed": seed,
        "resize": pc.resize,
        "dataset_euler_meaning": "pitch, yaw, roll (deg) as the dataset stores them, before any "
                                 "matrix round trip (yaw may exceed 90)",
        "interpolation": INTERPOLATION,
        "channel_order": "RGB",
        "identity_meaning": {"300wlp": "300W-LP source face id",
                             "pointing04": "Pointing'04 person (1-15)"}.get(ds.name,
                                                                         "unknown (-1)"),
        "budget_max_images": int(pc.max_images),
        "budget_of_kept": int(scanned_kept),
    }
    import h5py

    # Declared in sorted name order: the store's digest check re-reads extras sorted by name.
    extra = {
        "crop_box": ExtraSpec((4,), np.int32),
        "crop_k": ExtraSpec((), np.float32),
        "dataset_euler": ExtraSpec((3,), np.float64),
        "source_key": ExtraSpec((), h5py.string_dtype()),
    }
    st = cfg.store
    writer = StoreWriter(
        out, "labelled", int(pc.resolution), len(samples), attrs=attrs,
        compression=st.compression, compression_level=st.compression_level,
        chunk=int(st.chunk_images), extra=extra, fingerprint=fingerprint,
        resume=resume, overwrite=overwrite,
    )  # fmt: skip
    with writer:
        resumed_from = writer.committed
        if on_scanned is not None:
            on_scanned(report, len(samples) - resumed_from)
        pool = None
        if pc.workers > 0 and samples[0].image_path is not None:
            pool = ProcessPoolExecutor(max_workers=int(pc.workers))
        try:
            _write_all(writer, pool, samples, ds, preset, ks, rotations, identities, keys,
                       dataset_euler, int(pc.resolution), pc.resize, progress)
        except DataError as exc:
            raise DataError(
                f"{exc}; the store keeps its finished chunks: fix or remove that file and rerun "
                "with --resume, or rescan with prepare.verify_images=full --skip-bad --overwrite"
            ) from exc
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        path = writer.finalize()
    log.info("prepared %d images into %s", len(samples), path)
    return PrepareResult(path, report, split, preset.name, len(samples), resumed_from,
                         int(n_missing))


def _write_all(
    writer: Any, pool: ProcessPoolExecutor | None, samples: list[RealSample], ds: RealDataset,
    preset: CropPreset, ks: list[float], rotations: np.ndarray, identities: np.ndarray,
    keys: np.ndarray, dataset_euler: np.ndarray, resolution: int, resize: str,
    progress: Callable[[int], None] | None,
) -> None:
    """Pass 2: crop, resize and commit every pending chunk."""
    for start, stop in writer.pending():
        idx = range(start, stop)
        if pool is not None:
            jobs = [(samples[i], preset, ks[i], resolution, resize) for i in idx]
            results = list(pool.map(_worker, jobs, chunksize=8))
        else:
            results = [
                process_sample(
                    ds.load_image(samples[i]), samples[i], preset, ks[i], resolution, resize
                )
                for i in idx
            ]
        writer.write_chunk(
            start,
            np.stack([r[0] for r in results]),
            rotations[start:stop],
            identities[start:stop],
            extra={
                "source_key": keys[start:stop],
                "crop_box": np.array([r[1] for r in results], dtype=np.int32),
                "crop_k": np.array(ks[start:stop], dtype=np.float32),
                "dataset_euler": dataset_euler[start:stop],
            },
        )
        if progress is not None:
            progress(stop - start)


def describe(result: PrepareResult) -> str:
    """Human summary of a prepare run (printed by the CLI)."""
    r = result.report
    per = json.dumps(r.per_subset, sort_keys=True)
    return (
        f"{r.summary()}\nper subset: {per}\nwrote {result.num_images} images "
        f"({result.split} split, crop preset {result.crop}; {result.missing_landmarks} with "
        f"missing landmarks) to {result.path}"
    )
