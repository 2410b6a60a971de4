"""What every real dataset loader shares: samples, the protocol filter, scan reports, a registry.

A loader **scans** its root (no hand-made file lists), reads every label, applies the protocol
filter (all three angles within +-``max_abs_angle`` deg, 99 by default) and checks that every
image it keeps can be decoded, so a conversion never starts on data that will fail half-way.
Bad files (missing ``.mat``, unreadable image, ``.mat`` without ``Pose_Para`` ...) raise a
:class:`~clerf.errors.DataError` naming the file, or with ``skip_bad=True`` are skipped, counted
and logged as a warning; nothing is skipped silently. The counts travel with the data
(:meth:`ScanReport.as_attrs`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args

import numpy as np
import torch

from clerf.config import VerifyMode
from clerf.errors import DataError
from clerf.geometry import PROTOCOL_MAX_ABS_ANGLE, rotation_from_euler

__all__ = [
    "PROTOCOL_MAX_ABS_ANGLE",
    "RealSample",
    "ScanReport",
    "RealDataset",
    "within_protocol",
    "rotations_of",
    "register_dataset",
    "dataset_class",
    "available_datasets",
    "open_dataset",
    "verify_image_file",
    "VERIFY_MODES",
]

log = logging.getLogger("clerf.data")



@dataclass(frozen=True)
class RealSample:
    """One labelled real image.

    Attributes:
        key: the sample's path inside its dataset without extension (``AFW_Flip/AFW_1_0``;
            ``BIWI/000123`` for an ``.npz`` row); unique, stable, used to seed its crop.
        subset: folder or part it came from (``AFW``, ``AFW_Flip``, ``AFLW2000``, ``BIWI``).
        euler: ``(pitch, yaw, roll)`` in **degrees**, 300W-LP semantics
            (``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``).
        image_path: the image file, or None when the image lives in an array (BIWI ``.npz``).
        pt2d: ``(2, N)`` landmarks in pixels, -1 = missing; None when there are none.
        row: index into the dataset's image array when ``image_path`` is None.
        box: ``(x_min, y_min, x_max, y_max)`` face box in pixels, for datasets that give a box
            instead of landmarks (Pointing'04); the crop presets expand it as a landmark box.
        identity: who is pictured (an integer), where the dataset says; None = unknown.
    """

    key: str
    subset: str
    euler: tuple[float, float, float]
    image_path: Path | None = None
    pt2d: np.ndarray | None = field(default=None, compare=False, repr=False)
    row: int | None = None
    box: tuple[float, float, float, float] | None = None
    identity: int | None = None


@dataclass
class ScanReport:
    """What a scan found: scanned, kept, rejected by the angle filter, skipped as bad."""

    dataset: str
    root: str
    max_abs_angle: float | None
    scanned: int = 0
    kept: int = 0
    rejected_angle: int = 0
    skipped_bad: int = 0
    #: scanned samples with an angle beyond the benchmark's +-99 deg, whether or not the filter
    #: removed them (BIWI is evaluated whole: they are kept there unless the filter is asked for)
    beyond_protocol: int = 0
    #: ``(file, reason)`` of every skipped bad file (``skip_bad=True``)
    bad: list[tuple[str, str]] = field(default_factory=list)
    #: keys of the samples removed by the angle filter
    rejected_keys: list[str] = field(default_factory=list)
    #: per subset: ``{"scanned": n, "kept": n, "rejected_angle": n, "skipped_bad": n}``
    per_subset: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, subset: str, what: str) -> None:
        d = self.per_subset.setdefault(
            subset, {"scanned": 0, "kept": 0, "rejected_angle": 0, "skipped_bad": 0}
        )
        d[what] += 1
        setattr(self, what, getattr(self, what) + 1)

    def summary(self) -> str:
        lim = "off" if self.max_abs_angle is None else f"|angles| <= {self.max_abs_angle:g} deg"
        text = (
            f"{self.dataset}: scanned {self.scanned}, kept {self.kept}, rejected by the protocol "
            f"filter ({lim}) {self.rejected_angle}, skipped as bad {self.skipped_bad}"
        )
        if self.max_abs_angle is None:
            text += (f"; {self.beyond_protocol} kept with an angle beyond "
                     f"+-{PROTOCOL_MAX_ABS_ANGLE:g} deg")
        return text

    def as_attrs(self) -> dict[str, Any]:
        """JSON-friendly counts to store with the data (HDF5 attributes)."""
        return {
            "source_dataset": self.dataset,
            "source_root": self.root,
            "protocol_max_abs_angle_deg": -1.0 if self.max_abs_angle is None
            else float(self.max_abs_angle),
            "count_scanned": int(self.scanned),
            "count_kept": int(self.kept),
            "count_rejected_angle": int(self.rejected_angle),
            "count_skipped_bad": int(self.skipped_bad),
            "count_beyond_99_deg": int(self.beyond_protocol),
            "counts_per_subset_json": json.dumps(self.per_subset, sort_keys=True),
            "rejected_keys_json": json.dumps(self.rejected_keys),
            "skipped_bad_json": json.dumps([list(b) for b in self.bad]),
        }


def within_protocol(euler: tuple[float, float, float], max_abs_angle: float | None) -> bool:
    """True when all three angles (deg) are finite and within ``+-max_abs_angle`` (inclusive)."""
    if max_abs_angle is None:
        return all(math.isfinite(a) for a in euler)
    return all(math.isfinite(a) and abs(a) <= max_abs_angle for a in euler)


def rotations_of(samples: list[RealSample], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, 3, 3)`` labels as matrices via :func:`clerf.geometry.rotation_from_euler` (float64)."""
    if not samples:
        return torch.zeros(0, 3, 3, dtype=dtype)
    e = torch.tensor([s.euler for s in samples], dtype=torch.float64)
    return rotation_from_euler(e[:, 0], e[:, 1], e[:, 2]).to(dtype)


#: the ``verify_images`` choices (:data:`clerf.config.VerifyMode`)
VERIFY_MODES: tuple[str, ...] = get_args(VerifyMode)


def verify_image_file(path: Path, full: bool = True) -> None:
    """Check that ``path`` is a readable image.

    ``full``: decode it (JPEG in PIL draft mode at 1/8 scale, which still reads the whole
    entropy-coded stream, about 60% of a full decode). Otherwise parse the header only and, for
    a JPEG, look for the end-of-image marker ``FF D9`` in its last 64 bytes (a truncated file
    lacks it); when it is not there (a truncated file, or a valid one with trailing bytes after
    the marker, which PIL and the peers read) the file is decoded to decide: what the decoder
    accepts is accepted.

    Raises:
        DataError: missing or undecodable image, naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            if not full:
                if img.format != "JPEG":
                    return
                with open(path, "rb") as fh:
                    fh.seek(max(0, path.stat().st_size - 64))
                    if b"\xff\xd9" in fh.read():
                        return
                # no marker at the end: truncated, or trailing bytes after it; decode to decide
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        msg = " ".join(str(exc).replace(f"'{path}'", "").replace(str(path), "").split())
        raise DataError(f"{path}: unreadable image ({msg})") from None


class RealDataset(ABC):
    """A real dataset on disk. Construct, then :meth:`scan`; then read :attr:`samples`.

    Args:
        root: the dataset's directory (or file, for BIWI's ``.npz``).
        max_abs_angle: protocol filter in degrees; None disables it (counts still logged).
        skip_bad: skip bad files with a counted warning instead of raising.
        verify_images: check every kept image during the scan: ``full`` decodes it (JPEG in
            draft mode), ``header`` (default) parses its header and checks that a JPEG ends with
            its end-of-image marker, decoding it when not (catches missing, foreign and truncated
            files at ~1/30 of a decode), ``none`` skips the check. With ``skip_bad``, ``header``
            decodes every image (as ``full``), so that a file corrupted mid-stream is skipped
            and counted like any other bad file.
    """

    #: registry name
    name: ClassVar[str] = ""
    #: the split a prepared store of this dataset is by default (``train`` or ``test``)
    default_split: ClassVar[str] = "test"
    #: crop preset per split
    default_crop: ClassVar[dict[str, str]] = {"train": "hopenet_train", "test": "hopenet_test"}

    def __init__(
        self,
        root: str | Path,
        max_abs_angle: float | None = PROTOCOL_MAX_ABS_ANGLE,
        skip_bad: bool = False,
        verify_images: str = "header",
    ) -> None:
        self.root = Path(root)
        self.max_abs_angle = max_abs_angle
        self.skip_bad = bool(skip_bad)
        if verify_images not in VERIFY_MODES:
            raise DataError(f"verify_images must be one of {VERIFY_MODES}, got {verify_images!r}")
        self.verify_images = verify_images
        self.samples: list[RealSample] = []
        self.report = ScanReport(self.name, str(self.root), max_abs_angle)

    # -- subclass API
    @abstractmethod
    def _scan(self) -> None:
        """Fill :attr:`samples` and :attr:`report` using :meth:`_bad` and :meth:`_consider`."""

    def load_image(self, sample: RealSample) -> np.ndarray:
        """The whole (uncropped) image of ``sample``: ``(H, W, 3)`` uint8 RGB."""
        from clerf.data.mat import read_rgb_image

        if sample.image_path is None:
            raise DataError(f"{self.name}: sample {sample.key} has no image file")
        return read_rgb_image(sample.image_path)

    def params(self) -> dict[str, Any]:
        """Loader options that change the samples (stored with the data)."""
        return {}

    # -- shared machinery
    def scan(self) -> ScanReport:
        """Scan the root, filter, verify; log and return the report."""
        self.samples = []
        self.report = ScanReport(self.name, str(self.root), self.max_abs_angle)
        self._scan()
        log.info(self.report.summary())
        if self.report.skipped_bad:
            reasons = Counter(r for _, r in self.report.bad)
            log.warning(
                "%s: skipped %d bad file(s) (--skip-bad): %s",
                self.name, self.report.skipped_bad,
                "; ".join(f"{n} x {r}" for r, n in reasons.most_common()),
            )
        return self.report

    def _bad(self, subset: str, error: DataError, file: Path | str) -> None:
        """Raise ``error``, or with ``skip_bad`` count it and go on."""
        if not self.skip_bad:
            raise error
        reason = str(error)
        prefix = f"{file}: "
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
        self.report.bad.append((str(file), reason))
        self.report.count(subset, "skipped_bad")
        log.warning("skipping %s: %s", file, reason)

    def _consider(self, sample: RealSample) -> None:
        """Count a labelled sample, apply the protocol filter, verify its image, keep it."""
        if not all(math.isfinite(a) for a in sample.euler):
            where = sample.image_path or f"{self.root} ({sample.key})"
            self._bad(sample.subset, DataError(f"{where}: non-finite angles {sample.euler}"), where)
            return
        self.report.count(sample.subset, "scanned")
        if not within_protocol(sample.euler, PROTOCOL_MAX_ABS_ANGLE):
            self.report.beyond_protocol += 1
        if not within_protocol(sample.euler, self.max_abs_angle):
            self.report.rejected_keys.append(sample.key)
            self.report.count(sample.subset, "rejected_angle")
            return
        if self.verify_images != "none" and sample.image_path is not None:
            # With skip_bad every kept image is decoded now: a JPEG corrupted mid-stream passes
            # the header check and would otherwise stop pass 2 instead of being skipped.
            full = self.verify_images == "full" or self.skip_bad
            try:
                verify_image_file(sample.image_path, full=full)
            except DataError as exc:
                # scanned was counted above; a bad image is reported as bad, not scanned+kept
                self.report.per_subset[sample.subset]["scanned"] -= 1
                self.report.scanned -= 1
                self._bad(sample.subset, exc, sample.image_path)
                return
        self.samples.append(sample)
        self.report.count(sample.subset, "kept")

    def _scan_pairs(self, directory: Path, subset: str, key_prefix: str, glob: str) -> None:
        """Scan ``directory`` for ``<stem>.jpg`` + ``<stem>.mat`` pairs matching ``glob``.

        Sorted by file name. An image without its ``.mat`` or a ``.mat`` without its image is
        a bad sample, as is a ``.mat`` that cannot be read or lacks ``Pose_Para``/``pt2d``.
        """
        from clerf.data.mat import read_pose_mat

        images = {p.stem: p for p in directory.glob(glob + ".jpg") if p.is_file()}
        mats = {p.stem: p for p in directory.glob(glob + ".mat") if p.is_file()}
        for stem in sorted(set(images) | set(mats)):
            key = f"{key_prefix}{stem}"
            if stem not in mats:
                err = DataError(f"{images[stem]}: label file {stem}.mat is missing")
                self._bad(subset, err, images[stem])
                continue
            if stem not in images:
                err = DataError(f"{mats[stem]}: image {stem}.jpg is missing")
                self._bad(subset, err, mats[stem])
                continue
            try:
                labels = read_pose_mat(mats[stem])
            except DataError as exc:
                self._bad(subset, exc, mats[stem])
                continue
            self._consider(
                RealSample(key, subset, labels.euler, image_path=images[stem], pt2d=labels.pt2d)
            )

    def __len__(self) -> int:
        return len(self.samples)


_REGISTRY: dict[str, type[RealDataset]] = {}


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_dataset(*names: str):
    """Class decorator: make a loader available under ``names`` (case, ``-`` and ``_`` ignored)."""

    def deco(cls: type[RealDataset]) -> type[RealDataset]:
        cls.name = names[0]
        for n in names:
            _REGISTRY[_norm(n)] = cls
        return cls

    return deco


_BUILTINS = ("clerf.data.aflw2000", "clerf.data.biwi", "clerf.data.pointing04",
             "clerf.data.w300lp")


def _load_builtins() -> None:
    # Built-in loaders register themselves on import; named by path so base imports none of them.
    for mod in _BUILTINS:
        importlib.import_module(mod)


def available_datasets() -> list[str]:
    _load_builtins()
    return sorted({cls.name for cls in _REGISTRY.values()})


def dataset_class(name: str) -> type[RealDataset]:
    """The loader class called ``name``; unknown names are a ``DataError`` listing the known."""
    _load_builtins()
    cls = _REGISTRY.get(_norm(name))
    if cls is None:
        raise DataError(
            f"unknown dataset '{name}' (known: {', '.join(available_datasets())})"
        )
    return cls


def open_dataset(name: str, root: str | Path, **options: Any) -> RealDataset:
    """Build and scan a loader: ``open_dataset("aflw2000", "/data/AFLW2000")``."""
    ds = dataset_class(name)(root, **options)
    ds.scan()
    return ds
