"""Evaluation protocols: which images a model sees and what their exact labels are.

A protocol is a list of :class:`View` s of an evaluation source. A view transforms a batch of
images on the device and composes the labels **exactly** with :mod:`clerf.geometry`
(``docs/conventions.md`` section 3):

* ``standard``: the images as stored.
* ``rotated``: each image rotated by ``phi`` degrees **clockwise on screen** about its centre,
  label ``rotate_inplane(R, phi) = R @ Rz(phi)``; one view per angle of the sweep (default
  +-15, +-30, +-60, +-90 and 180 deg). Corners that come from outside the image are 0 (black).
* ``flipped``: horizontal mirror (``hflip_rotation``) and vertical mirror (``vflip_rotation``).
* ``lowres``: HopeNet's low-resolution experiment: each image down-sampled by a factor
  (:data:`LOWRES_FACTORS`: 1, 2, 3, 4, 6; antialiased bilinear) and up-sampled back to its size
  (bilinear), labels unchanged; one view per factor (``down1`` is the image as stored).

Images are warped and labels composed by :mod:`clerf.augment` (the code that augments training
batches, its sign pinned by its tests and by the renderer-oracle test of this module); images
must be square (face crops are).
* ``full_range``: rotations drawn uniformly over SO(3) with a fixed seed and rendered on the fly
  by a generator (:class:`GeneratorSource`), or a stored full-range set; reported with geodesic
  error and MAEV only (Euler angles are ill-defined over the full group).

Sources give contiguous ranges of samples ``[start, stop)`` so that each process of a
distributed run reads its own contiguous block (fast for HDF5, no duplicates).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

from clerf.augment import GeometricParams, compose_rotation, warp_images
from clerf.config import EvaluateConfig, EvaluateProtocol
from clerf.errors import ConfigError
from clerf.geometry import check_rotation, random_rotation

__all__ = [
    "PROTOCOLS",
    "DEFAULT_ROTATED_ANGLES",
    "LOWRES_FACTORS",
    "View",
    "build_views",
    "EvalSource",
    "TensorSource",
    "GeneratorSource",
    "StoreSource",
]

#: protocol names accepted by ``--protocol``
PROTOCOLS: tuple[str, ...] = get_args(EvaluateProtocol)  # the config's choices
#: the default in-plane sweep (degrees, clockwise on screen)
DEFAULT_ROTATED_ANGLES: tuple[float, ...] = tuple(EvaluateConfig().rotated_angles)
#: the down-sampling factors of the ``lowres`` protocol (HopeNet's Fig. 5: 1, 2, 3, 4, 6)
LOWRES_FACTORS: tuple[int, ...] = (1, 2, 3, 4, 6)


@dataclass(frozen=True)
class View:
    """One transform of the evaluation images and the exact rule for their labels.

    Attributes:
        protocol: the protocol the view belongs to (:data:`PROTOCOLS`).
        name: unique within the protocol (``none``, ``rot+15``, ``hflip``, ``vflip``).
        angle: in-plane angle in degrees, clockwise on screen (``rotated`` only).
        flip: ``"h"`` or ``"v"`` (``flipped`` only).
        factor: down-sampling factor (``lowres`` only); the labels do not change.
    """

    protocol: str
    name: str
    angle: float | None = None
    flip: str | None = None
    factor: int | None = None

    @property
    def euler(self) -> bool:
        """Whether Euler MAE may be reported for this view (never for the full range)."""
        return self.protocol != "full_range"

    def params(self, n: int, device: torch.device | str = "cpu") -> GeometricParams:
        """This view as :class:`clerf.augment.GeometricParams` for ``n`` images."""
        p = GeometricParams.identity(n, device)
        if self.angle is not None:
            p.angle = torch.full((n,), float(self.angle), device=device)
        if self.flip == "h":
            p.hflip = torch.ones(n, dtype=torch.bool, device=device)
        if self.flip == "v":
            p.vflip = torch.ones(n, dtype=torch.bool, device=device)
        return p

    def apply(self, images: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
        """Transform ``(B, 3, S, S)`` float images and compose their ``(B, 3, 3)`` labels.

        The warp and the label rule are :mod:`clerf.augment`'s (one bilinear affine warp about the
        image centre, zero padding; labels by :func:`clerf.augment.compose_rotation`), the same
        code that augments training batches.
        """
        if self.factor is not None:
            return downsample_upsample(images, self.factor), rotations
        if self.angle is None and self.flip is None:
            return images, rotations
        params = self.params(images.shape[0], images.device)
        return warp_images(images, params), compose_rotation(rotations, params)

    def describe(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "name": self.name, "angle": self.angle,
                "flip": self.flip, "factor": self.factor}


def downsample_upsample(images: Tensor, factor: int) -> Tensor:
    """``(B, 3, S, S)`` float images down-sampled to ``round(S / factor)`` px (antialiased
    bilinear) and up-sampled back to ``S`` (bilinear); ``factor`` 1 returns them unchanged."""
    if factor == 1:
        return images
    s = images.shape[-1]
    small = max(1, round(s / factor))
    x = torch.nn.functional.interpolate(images, size=(small, small), mode="bilinear",
                                        antialias=True, align_corners=False)  # fmt: skip
    x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0)


def _angle_name(a: float) -> str:
    return f"rot{a:+g}"


def build_views(protocol: str, angles: Sequence[float] = DEFAULT_ROTATED_ANGLES) -> list[View]:
    """The views of a protocol; an unknown name is a :class:`ConfigError` listing the known."""
    if protocol == "standard":
        return [View("standard", "none")]
    if protocol == "rotated":
        if not angles:
            raise ConfigError("evaluate.rotated_angles: the rotated protocol needs >= 1 angle")
        names = [_angle_name(float(a)) for a in angles]
        if len(set(names)) != len(names):
            raise ConfigError(f"evaluate.rotated_angles: duplicate angles in {list(angles)}")
        return [View("rotated", n, angle=float(a)) for n, a in zip(names, angles, strict=True)]
    if protocol == "flipped":
        return [View("flipped", "hflip", flip="h"), View("flipped", "vflip", flip="v")]
    if protocol == "lowres":
        return [View("lowres", f"down{f}", factor=f) for f in LOWRES_FACTORS]
    if protocol == "full_range":
        return [View("full_range", "uniform")]
    raise ConfigError(f"unknown protocol '{protocol}' (known: {', '.join(PROTOCOLS)})")


# --------------------------------------------------------------------------- sources


class EvalSource(ABC):
    """Labelled images addressed by a contiguous index range."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Samples ``[start, stop)``: ``(n, 3, H, W)`` uint8 images and ``(n, 3, 3)`` labels."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for the report."""

    def dataset_euler(self) -> np.ndarray | None:
        """The dataset's own ``(pitch, yaw, roll)`` triple (degrees) of every sample, ``(n, 3)``,
        or None when the source has none (the ground truth of the published-comparable Euler
        MAE, docs/conventions.md section 7)."""
        return None


class TensorSource(EvalSource):
    """In-memory images ``(N, 3, H, W)`` uint8 and rotations ``(N, 3, 3)``."""

    def __init__(self, images: Tensor, rotations: Tensor, name: str = "tensors") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"TensorSource: images must be (N, 3, H, W) uint8, got "
                             f"{tuple(images.shape)} {images.dtype}")
        check_rotation(rotations, name="TensorSource rotations")
        if rotations.shape[0] != images.shape[0]:
            raise ValueError("TensorSource: images and rotations differ in length")
        self.images, self.rotations, self.name = images, rotations, name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.images[start:stop], self.rotations[start:stop]

    def describe(self) -> dict[str, Any]:
        return {"kind": "tensors", "name": self.name, "n": len(self)}


class GeneratorSource(EvalSource):
    """Uniform SO(3) rotations rendered on the fly by a pose-conditioned generator.

    Sample ``i`` is identity ``i`` at the ``i``-th rotation of ``random_rotation(n)`` drawn with
    a CPU ``torch.Generator`` seeded with ``seed``: the set is fixed by ``(generator, params,
    seed, n, resolution)``, whatever the batching. The label is the rotation the generator reports
    as rendered.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        resolution: int = 64,
        generator: str = "procedural",
        params: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from generators import build_generator

        if n <= 0:
            raise ConfigError(f"evaluate.full_range_n must be > 0, got {n}")
        self.n, self.seed, self.resolution = int(n), int(seed), int(resolution)
        self.generator_name, self.params = generator, dict(params or {})
        try:
            self.gen = build_generator(generator, seed=seed, device=device, **self.params)
        except ValueError as exc:
            raise ConfigError(f"evaluate.full_range_generator: {exc}") from exc
        g = torch.Generator().manual_seed(self.seed)
        self.rotations = random_rotation(self.n, generator=g, dtype=torch.float32)

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        ids = torch.arange(start, stop, dtype=torch.int64, device=self.gen.device)
        out = self.gen.render(ids, self.rotations[start:stop].to(self.gen.device),
                              self.resolution)
        return out.images, out.rotations

    def describe(self) -> dict[str, Any]:
        return {"kind": "generator", "generator": self.generator_name, "params": self.params,
                "seed": self.seed, "n": self.n, "resolution": self.resolution,
                "rotations": "uniform over SO(3) (Haar)"}


class StoreSource(EvalSource):
    """A labelled or triplet HDF5 store (:mod:`triplets.store`); every stored image is a sample.

    Sample ``i`` is stored image ``i``; reads are contiguous slices (fast; random fancy indexing
    into HDF5 is about 100x slower).
    """

    def __init__(self, path: str | Path, max_samples: int = 0) -> None:
        from triplets.store import open_store

        self.path = Path(path)
        self.store = open_store(self.path)  # DataError naming what is missing or wrong
        n = int(self.store.num_images)
        self.n = min(n, int(max_samples)) if max_samples > 0 else n

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        part = self.store.read_range(start, min(stop, self.n))
        return torch.from_numpy(part["images"]), torch.from_numpy(part["rotations"])

    def dataset_euler(self) -> np.ndarray | None:
        """The store's ``dataset_euler`` (written by ``clerf prepare``), or None."""
        f = self.store.file
        if "dataset_euler" not in f:
            return None
        return np.asarray(f["dataset_euler"][: self.n], dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        attrs = self.store.attrs
        keep = ("kind", "resolution", "num_images", "generator", "dataset", "source", "split",
                "crop_preset", "seed", "source_dataset", "crop_missing_landmarks",
                "count_missing_landmarks", "resize", "protocol_max_abs_angle_deg", "count_kept",
                "count_scanned", "count_beyond_99_deg")
        return {"kind": "store", "path": str(self.path), "n": self.n,
                "attrs": {k: _plain(attrs[k]) for k in keep if k in attrs}}


def _plain(v: Any) -> Any:
    """HDF5 attribute values as JSON-friendly Python values."""
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v if isinstance(v, (str, int, float, bool)) else str(v)
