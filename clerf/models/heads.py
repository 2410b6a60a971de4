"""Pose heads: HopeNet's binned multi-loss Euler head and the 6D rotation head.

Every head maps encoder features ``(B, F)`` to a dict of raw outputs, turns those outputs into
rotation matrices ``(B, 3, 3)`` (``docs/conventions.md``: rows = head axes in camera
coordinates) and computes its training loss against rotation labels. Labels are always rotation
matrices; a binned head derives its Euler targets with :func:`clerf.geometry.euler_from_rotation`,
so augmentation composes labels exactly and the heads never see an approximate angle.

* :class:`BinnedEulerHead` (HopeNet, docs/conventions.md section 5): per angle a linear layer
  over bins,
  loss per angle = cross-entropy over bins + ``alpha`` x MSE (deg^2) of the softmax expectation.
* :class:`Rotation6DHead` (6DRepNet / CLERF): an MLP to 6 numbers, Gram-Schmidt to a rotation,
  geodesic loss in **radians**.
* :class:`CombinedHead`: both at once, summed weighted losses.
* :class:`SphereGridHead`: classification of the head's up and nose directions over a fixed
  grid of points on the sphere (soft targets), decoded by a local soft-argmax and
  Gram-Schmidt: a multimodal output that keeps learning where a regression averages.

Euler order inside this module is always ``(pitch, yaw, roll)`` along the angle axis, the order of
:class:`clerf.geometry.EulerAngles`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clerf.config import HEADS, HeadBinsConfig, HeadConfig, head_config
from clerf.errors import ConfigError
from clerf.geometry import (
    HOPENET_BINS,
    BinSpec,
    angle_to_bin,
    decode_bins,
    decode_bins_circular,
    euler_from_rotation,
    fibonacci_sphere,
    geodesic_distance,
    rotation_from_6d,
    rotation_from_axes,
    rotation_from_euler,
    wrap_degrees,
)
from clerf.registry import need

__all__ = [
    "ANGLE_NAMES",
    "DECODE_MODES",
    "PoseHead",
    "BinnedHeadConfig",
    "Rotation6DHeadConfig",
    "CombinedHeadConfig",
    "SphereHeadConfig",
    "BinnedEulerHead",
    "Rotation6DHead",
    "CombinedHead",
    "SphereGridHead",
    "binned_loss",
    "weighted_mean",
    "decode_bins_circular",
    "geodesic_loss",
    "chordal_loss",
    "ROTATION_LOSSES",
    "euler_targets",
    "build_head",
]

#: order of the angle axis in binned logits and Euler targets
ANGLE_NAMES: tuple[str, str, str] = ("pitch", "yaw", "roll")
#: how a binned head turns bin probabilities into an angle (``auto``: circular for 360 deg bins)
Decode = Literal["auto", "expectation", "circular"]
DECODE_MODES: tuple[str, ...] = get_args(Decode)
#: the 6D head's loss
RotationLoss = Literal["geodesic", "chordal"]
ROTATION_LOSSES: tuple[str, ...] = get_args(RotationLoss)


# --------------------------------------------------------------------------- functional parts


def euler_targets(rotations: Tensor, spec: BinSpec | None = None) -> Tensor:
    """Euler labels ``(B, 3)`` in degrees, ordered (pitch, yaw, roll), from ``(B, 3, 3)``.

    With a ``spec`` spanning a full circle, angles are wrapped by 360 into
    ``[spec.start, spec.start + 360)``: ``euler_from_rotation`` returns pitch and roll in
    ``(-180, 180]``, and +180 must land in the first bin of a ``[-180, 180)`` head, not outside it.
    """
    e = torch.stack(euler_from_rotation(rotations), dim=-1)
    if spec is not None and spec.full_circle:
        e = spec.wrap(e)
    return e


def weighted_mean(x: Tensor, weight: Tensor | None) -> Tensor:
    """``x.mean()``, or the mean of ``x`` under per-sample weights ``(B,)`` (a 0/1 mask keeps
    the rows it marks) with no host read: ``sum(w x) / max(sum(w), 1)``, 0 when every weight is 0.
    Rows of weight 0 never reach the sum, so a NaN there (a label the mask left out) is harmless.
    """
    if weight is None:
        return x.mean()
    w = weight.to(x.dtype)
    return torch.where(w > 0, x * w, 0.0).sum() / w.sum().clamp_min(1.0)


def binned_loss(
    logits: Tensor,
    target_deg: Tensor,
    spec: BinSpec = HOPENET_BINS,
    alpha: float = 2.0,
    circular: bool = False,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """HopeNet's multi-loss, summed over the three angles, averaged over the batch.

    For each angle: ``cross_entropy(logits, bin(target)) + alpha * mean((decoded - target)^2)``,
    where ``decoded`` is the softmax expectation over bin centres in degrees (or the circular mean
    with ``circular=True``, whose error is wrapped by 360). HopeNet backpropagates the sum of the
    three per-angle losses; so does this.

    Args:
        logits: ``(B, 3, K)`` bin logits ordered (pitch, yaw, roll).
        target_deg: ``(B, 3)`` labels in degrees, same order.
        spec: the bins; a label outside ``[spec.start, spec.stop)`` raises ``ValueError`` (filter
            such samples before calling: see :meth:`BinnedEulerHead.in_range`).
        alpha: weight of the regression term (deg^2).
        weight: optional per-sample weights ``(B,)``, e.g. the in-range mask of
            :meth:`BinnedEulerHead.in_range`: every term is then a :func:`weighted_mean`, labels
            of weight 0 may lie outside the bins (their bin index is clamped and never counts),
            and nothing is read back to the host (the fine-tune's path: no range check, no
            boolean indexing).

    Returns:
        ``(loss, parts)`` with ``parts`` holding detached per-angle ``ce_<angle>``,
        ``mse_<angle>`` (deg^2) and ``mae_<angle>`` (deg).
    """
    if logits.ndim != 3 or logits.shape[1] != 3 or logits.shape[2] != spec.num_bins:
        raise ValueError(f"binned_loss: logits must be (B, 3, {spec.num_bins}), "
                         f"got {tuple(logits.shape)}")
    if target_deg.shape != logits.shape[:2]:
        raise ValueError(f"binned_loss: targets must be {tuple(logits.shape[:2])}, "
                         f"got {tuple(target_deg.shape)}")
    total = logits.new_zeros(())
    parts: dict[str, Tensor] = {}
    # one range check (one host read) for the three angles; the error names the angle. With
    # weights the caller has masked what lies outside: no check, no read.
    inside = weight is not None or bool(spec.contains(target_deg.detach().double()).all())
    for k, name in enumerate(ANGLE_NAMES):
        idx = angle_to_bin(target_deg[:, k].contiguous(), spec, name=f"{name} label",
                           check=not inside)  # fmt: skip
        if weight is None:
            ce = F.cross_entropy(logits[:, k], idx)
        else:
            ce = weighted_mean(F.cross_entropy(logits[:, k], idx, reduction="none"), weight)
        if circular:
            decoded = decode_bins_circular(logits[:, k], spec)
            diff = wrap_degrees(decoded - target_deg[:, k].to(decoded))
        else:
            decoded = decode_bins(logits[:, k], spec)
            diff = decoded - target_deg[:, k].to(decoded)
        mse = weighted_mean(diff * diff, weight)
        total = total + ce + alpha * mse
        parts[f"ce_{name}"] = ce.detach()
        parts[f"mse_{name}"] = mse.detach()
        parts[f"mae_{name}"] = weighted_mean(diff.detach().abs(), weight)
    return total, parts


def chordal_loss(R_pred: Tensor, R_true: Tensor) -> Tensor:
    """Mean squared Frobenius distance ``||R_pred - R_true||_F^2`` of ``(B, 3, 3)`` rotations.

    Equals ``4 (1 - cos theta)`` for a geodesic error theta: smooth everywhere, with the largest
    gradient near 90 deg and a vanishing one only at 0 (where the geodesic loss keeps a constant
    slope) and at 180 deg (where the geodesic loss's direction is undefined).
    """
    return (R_pred - R_true.to(R_pred)).square().sum(dim=(-2, -1)).mean()




def geodesic_loss(R_pred: Tensor, R_true: Tensor) -> Tensor:
    """Mean geodesic distance between ``(B, 3, 3)`` rotations, in **radians** (6DRepNet's loss).

    Uses :func:`clerf.geometry.geodesic_distance` (atan2 form: finite gradient at 0 and 180 deg).
    """
    return torch.deg2rad(geodesic_distance(R_pred, R_true.to(R_pred))).mean()


def _float32(module: nn.Module, features: Tensor) -> Tensor:
    """``module(features)`` in float32 even under mixed precision (autocast off, the features
    cast up): the head's last layers are small, and their logits and 6D vectors feed softmax
    expectations in degrees, Gram-Schmidt and the losses, which lose about half a degree when
    the layers themselves run in bf16 (casting their output afterwards is too late)."""
    if torch.is_autocast_enabled(features.device.type):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return module(features.float())
    return module(features)


# --------------------------------------------------------------------------- head configs


def _checked(cfg: HeadConfig) -> None:
    """A head built in Python checks its arguments with its config's own checks (one set of
    checks for both routes), as a ``ValueError``."""
    try:
        cfg.validate("head")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _bin_spec(bins: Any) -> BinSpec:
    return BinSpec(start=float(bins.start), width=float(bins.width), num_bins=int(bins.num_bins))


@HEADS.register("binned")
@dataclass
class BinnedHeadConfig(HeadConfig):
    """``head.type: binned``: HopeNet's multi-loss Euler bins (:class:`BinnedEulerHead`)."""

    type: str = "binned"
    bins: HeadBinsConfig = field(default_factory=HeadBinsConfig)
    #: weight of the MSE (deg^2) of the softmax expectation next to the cross-entropy (HopeNet's
    #: best AFLW2000 result used 2; its best BIWI result used 1)
    alpha: float = 2.0
    #: ``auto`` (circular mean when the bins span 360 deg), ``expectation``, ``circular``
    decode: Decode = "auto"

    def validate(self, path: str = "head") -> None:
        super().validate(path)
        ok = math.isfinite(float(self.alpha)) and self.alpha >= 0
        need(ok, f"{path}.alpha", "a finite number >= 0", self.alpha)

    def build(self, in_features: int) -> BinnedEulerHead:
        return BinnedEulerHead(in_features, _bin_spec(self.bins), self.alpha, self.decode)


@HEADS.register("rotation6d")
@dataclass
class Rotation6DHeadConfig(HeadConfig):
    """``head.type: rotation6d``: 6D + Gram-Schmidt (:class:`Rotation6DHead`)."""

    type: str = "rotation6d"
    #: hidden width of the MLP; 0 = a single linear layer (6DRepNet's head)
    hidden: int = 256
    #: ``geodesic`` (6DRepNet: the angle, radians) or ``chordal`` (squared Frobenius distance of
    #: the matrices; smooth at 180 deg, where full-range training starts)
    loss: RotationLoss = "geodesic"

    def validate(self, path: str = "head") -> None:
        super().validate(path)
        need(self.hidden >= 0, f"{path}.hidden", "an integer >= 0", self.hidden)

    def build(self, in_features: int) -> Rotation6DHead:
        return Rotation6DHead(in_features, self.hidden, self.loss)


@HEADS.register("both")
@dataclass
class CombinedHeadConfig(BinnedHeadConfig):
    """``head.type: both``: a binned and a 6D head on the same features (:class:`CombinedHead`);
    the keys of both, and the weights of their losses."""

    type: str = "both"
    hidden: int = Rotation6DHeadConfig.hidden
    loss: RotationLoss = Rotation6DHeadConfig.loss
    binned_weight: float = 1.0
    rotation6d_weight: float = 1.0
    #: which head gives the predicted rotation: ``auto`` (= rotation6d), ``rotation6d``, ``binned``
    predict_from: Literal["auto", "rotation6d", "binned"] = "auto"

    def validate(self, path: str = "head") -> None:
        super().validate(path)
        need(self.hidden >= 0, f"{path}.hidden", "an integer >= 0", self.hidden)
        for key in ("binned_weight", "rotation6d_weight"):
            need(getattr(self, key) >= 0, f"{path}.{key}", "a number >= 0", getattr(self, key))

    def build(self, in_features: int) -> CombinedHead:
        return CombinedHead(
            BinnedHeadConfig(bins=self.bins, alpha=self.alpha, decode=self.decode)
            .build(in_features),
            Rotation6DHeadConfig(hidden=self.hidden, loss=self.loss).build(in_features),
            self.binned_weight, self.rotation6d_weight,
            "rotation6d" if self.predict_from == "auto" else self.predict_from,
        )  # fmt: skip


@HEADS.register("sphere")
@dataclass
class SphereHeadConfig(HeadConfig):
    """``head.type: sphere``: up and nose directions over a grid on the sphere
    (:class:`SphereGridHead`)."""

    type: str = "sphere"
    hidden: int = 256
    #: grid directions per axis and the soft-target kernel width (deg)
    sphere_points: int = 512
    sphere_sigma_deg: float = 8.0

    def validate(self, path: str = "head") -> None:
        super().validate(path)
        need(self.hidden >= 0, f"{path}.hidden", "an integer >= 0", self.hidden)
        need(self.sphere_points >= 12, f"{path}.sphere_points", "an integer >= 12",
             self.sphere_points)  # fmt: skip
        need(0.5 <= self.sphere_sigma_deg <= 90, f"{path}.sphere_sigma_deg",
             "a number in [0.5, 90]", self.sphere_sigma_deg)  # fmt: skip

    def build(self, in_features: int) -> SphereGridHead:
        return SphereGridHead(in_features, self.hidden, self.sphere_points,
                              self.sphere_sigma_deg)  # fmt: skip


# --------------------------------------------------------------------------- heads


class PoseHead(nn.Module, ABC):
    """Features ``(B, in_features)`` -> raw outputs -> rotations and a loss.

    Subclasses keep output keys distinct (``logits``, ``sixd``) so :class:`CombinedHead` can merge
    their dicts.
    """

    in_features: int

    @abstractmethod
    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """Raw outputs of a batch of features."""

    @abstractmethod
    def rotation(self, outputs: dict[str, Tensor]) -> Tensor:
        """Predicted rotation matrices ``(B, 3, 3)`` from :meth:`forward`'s outputs."""

    @abstractmethod
    def loss(
        self, outputs: dict[str, Tensor], rotations: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(scalar loss, detached named parts)`` against label rotations ``(B, 3, 3)``.

        Bounded heads (:attr:`bounded`) also take ``weight``: per-sample weights ``(B,)`` (the
        :meth:`in_range` mask) under which every term is a :func:`weighted_mean`."""

    #: whether some labels are outside what the head can learn (binned Euler ranges): only
    #: then does the fine-tune check :meth:`in_range` (a host read per step)
    bounded: bool = False

    def in_range(self, rotations: Tensor) -> Tensor:
        """Boolean ``(B,)``: which labels this head can be trained on (all, unless binned)."""
        return torch.ones(rotations.shape[:-2], dtype=torch.bool, device=rotations.device)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The names of the parts :meth:`loss` returns, the same at every step (the training
        logs reduce one fixed key set over processes). Default: ``geodesic_deg``."""
        return ("geodesic_deg",)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (saved with the model)."""
        return {"type": type(self).__name__, "in_features": self.in_features}


class BinnedEulerHead(PoseHead):
    """HopeNet's binned multi-loss head (docs/conventions.md section 5).

    One linear layer per angle over ``spec.num_bins`` bins; the three layers are stored as one
    ``nn.Linear(in_features, 3 * K)`` whose output is viewed as ``(B, 3, K)`` (pitch, yaw, roll):
    mathematically the same as three separate layers, one matmul instead of three.

    Decoding: the softmax expectation over bin **centres** (HopeNet's code uses left edges, a
    half-bin bias). ``decode="auto"`` picks the circular mean when the bins span 360 deg
    (:data:`clerf.geometry.FULL_RANGE_BINS`), the expectation otherwise.

    Full-range caveats (``[-180, 180)`` bins): in clerf's convention yaw only spans [-90, 90], so
    the yaw bins beyond +-90 are never targets; pitch and roll wrap at +-180, where a plain
    expectation is biased toward 0 (mass split between the end bins averages to the middle) and
    the circular mean is not; near |yaw| = 90 (gimbal lock) pitch and roll are individually
    ill-defined, so the Euler targets jump while the rotation barely moves. Full-range models
    should prefer :class:`Rotation6DHead`; the binned full-range variant exists for experiments.

    Example:
        >>> head = BinnedEulerHead(16)
        >>> out = head(torch.randn(4, 16))
        >>> out["logits"].shape, head.rotation(out).shape
        (torch.Size([4, 3, 66]), torch.Size([4, 3, 3]))
    """

    bounded = True

    def __init__(
        self,
        in_features: int,
        spec: BinSpec = HOPENET_BINS,
        alpha: float = BinnedHeadConfig.alpha,
        decode: str = BinnedHeadConfig.decode,
    ) -> None:
        super().__init__()
        _checked(BinnedHeadConfig(alpha=alpha, decode=decode))
        self.in_features = int(in_features)
        self.spec = spec
        self.alpha = float(alpha)
        self.decode_mode = decode
        self.circular = decode == "circular" or (decode == "auto" and spec.full_circle)
        self.fc = nn.Linear(self.in_features, 3 * spec.num_bins)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        # float32 under mixed precision: the decode and the losses need the precision
        return {"logits": _float32(self.fc, features).unflatten(-1, (3, self.spec.num_bins))}

    def decode(self, logits: Tensor) -> Tensor:
        """Angles ``(B, 3)`` in degrees (pitch, yaw, roll) from logits ``(B, 3, K)``."""
        if self.circular:
            return decode_bins_circular(logits, self.spec)
        return decode_bins(logits, self.spec)

    def rotation(self, outputs: dict[str, Tensor]) -> Tensor:
        e = self.decode(outputs["logits"])
        return rotation_from_euler(e[..., 0], e[..., 1], e[..., 2])

    def targets(self, rotations: Tensor) -> Tensor:
        """Euler labels ``(B, 3)`` deg of label rotations, wrapped for full-circle bins."""
        return euler_targets(rotations, self.spec)

    def in_range(self, rotations: Tensor) -> Tensor:
        e = self.targets(rotations).double()
        return self.spec.contains(e).all(dim=-1)

    def loss(
        self, outputs: dict[str, Tensor], rotations: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return binned_loss(
            outputs["logits"], self.targets(rotations), self.spec, self.alpha, self.circular,
            weight=weight,
        )

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return tuple(f"{p}_{a}" for a in ANGLE_NAMES for p in ("ce", "mse", "mae"))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "bins": {"start": self.spec.start, "width": self.spec.width,
                     "num_bins": self.spec.num_bins},
            "alpha": self.alpha,
            "decode": "circular" if self.circular else "expectation",
        }


class Rotation6DHead(PoseHead):
    """An MLP to the 6D representation, Gram-Schmidt to a rotation, geodesic loss (radians).

    ``hidden = 0`` makes it a single linear layer (6DRepNet's head); otherwise
    ``Linear -> ReLU -> Linear`` (CLERF's MLP).
    """

    def __init__(self, in_features: int, hidden: int = Rotation6DHeadConfig.hidden,
                 loss: str = Rotation6DHeadConfig.loss) -> None:  # fmt: skip
        super().__init__()
        _checked(Rotation6DHeadConfig(hidden=hidden, loss=loss))
        self.loss_name = loss
        self.in_features = int(in_features)
        self.hidden = int(hidden)
        if hidden == 0:
            self.mlp = nn.Sequential(nn.Linear(self.in_features, 6))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(self.in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 6)
            )
        # Start near the identity rotation (the first two columns e_x, e_y) instead of at a
        # random one: a fair, symmetric starting point that keeps Gram-Schmidt well conditioned.
        with torch.no_grad():
            self.mlp[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        # float32 under mixed precision: Gram-Schmidt in bf16 would cost about half a degree
        return {"sixd": _float32(self.mlp, features)}

    def rotation(self, outputs: dict[str, Tensor]) -> Tensor:
        return rotation_from_6d(outputs["sixd"])

    def loss(
        self, outputs: dict[str, Tensor], rotations: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        R = self.rotation(outputs)
        if weight is not None:  # a CombinedHead's in-range mask: per-sample terms, no host read
            geo = torch.deg2rad(geodesic_distance(R, rotations.to(R)))
            if self.loss_name == "chordal":
                per = (R - rotations.to(R)).square().sum(dim=(-2, -1))
                loss = weighted_mean(per, weight)
            else:
                loss = weighted_mean(geo, weight)
            return loss, {"geodesic_deg": torch.rad2deg(weighted_mean(geo.detach(), weight))}
        if self.loss_name == "chordal":
            with torch.no_grad():
                geo = geodesic_loss(R, rotations)
            return chordal_loss(R, rotations), {"geodesic_deg": torch.rad2deg(geo)}
        loss = geodesic_loss(R, rotations)
        return loss, {"geodesic_deg": torch.rad2deg(loss.detach())}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hidden": self.hidden, "loss": self.loss_name}


class CombinedHead(PoseHead):
    """A binned Euler head and a 6D head on the same features; loss = weighted sum.

    ``predict_from`` picks which head's rotation :meth:`rotation` returns (``rotation6d`` by
    default: it covers the full rotation group without Euler singularities).
    """

    bounded = True

    def __init__(
        self,
        binned: BinnedEulerHead,
        rotation6d: Rotation6DHead,
        binned_weight: float = CombinedHeadConfig.binned_weight,
        rotation6d_weight: float = CombinedHeadConfig.rotation6d_weight,
        predict_from: str = "rotation6d",
    ) -> None:
        super().__init__()
        if binned.in_features != rotation6d.in_features:
            raise ValueError("CombinedHead: both heads must take the same number of features")
        if predict_from not in ("binned", "rotation6d"):
            raise ValueError(f"predict_from must be 'binned' or 'rotation6d', got {predict_from!r}")
        self.in_features = binned.in_features
        self.binned = binned
        self.rotation6d = rotation6d
        self.binned_weight = float(binned_weight)
        self.rotation6d_weight = float(rotation6d_weight)
        self.predict_from = predict_from

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {**self.binned(features), **self.rotation6d(features)}

    def rotation(self, outputs: dict[str, Tensor]) -> Tensor:
        head = self.binned if self.predict_from == "binned" else self.rotation6d
        return head.rotation(outputs)

    def in_range(self, rotations: Tensor) -> Tensor:
        return self.binned.in_range(rotations)

    def loss(
        self, outputs: dict[str, Tensor], rotations: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        lb, pb = self.binned.loss(outputs, rotations, weight=weight)
        lr, pr = self.rotation6d.loss(outputs, rotations, weight=weight)
        parts = {**pb, **pr, "loss_binned": lb.detach(), "loss_rotation6d": lr.detach()}
        return self.binned_weight * lb + self.rotation6d_weight * lr, parts

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return (*self.binned.loss_keys, *self.rotation6d.loss_keys, "loss_binned",
                "loss_rotation6d")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "binned": self.binned.describe(),
            "rotation6d": self.rotation6d.describe(),
            "weights": {"binned": self.binned_weight, "rotation6d": self.rotation6d_weight},
            "predict_from": self.predict_from,
        }


class SphereGridHead(PoseHead):
    """Up and nose directions (rows 1 and 2 of ``R``) classified over ``points`` directions on
    the sphere (:func:`clerf.geometry.fibonacci_sphere`).

    Loss: for each axis, cross-entropy against soft targets ``softmax((cos d - 1) / s^2)``
    where ``d`` is the angle between a grid point and the true axis and ``s`` =
    ``sigma_deg`` (a von Mises-Fisher kernel), so neighbouring points share the label.
    Decoding: the probability-weighted mean of the grid points within ``window_deg`` (3 kernel
    widths, at least 2.5 grid spacings) of the most probable one, normalised; the two
    directions become a rotation by Gram-Schmidt that keeps the nose
    (:func:`clerf.geometry.rotation_from_axes`). Unlike a regression, an uncertain
    image gives two peaks instead of their average, which keeps full-range training moving.
    """

    def __init__(self, in_features: int, hidden: int = SphereHeadConfig.hidden,
                 points: int = SphereHeadConfig.sphere_points,
                 sigma_deg: float = SphereHeadConfig.sphere_sigma_deg) -> None:  # fmt: skip
        super().__init__()
        _checked(SphereHeadConfig(hidden=hidden, sphere_points=points, sphere_sigma_deg=sigma_deg))
        self.in_features, self.hidden = int(in_features), int(hidden)
        self.points, self.sigma_deg = int(points), float(sigma_deg)
        # decode window: 3 kernel widths, and at least 2.5 grid spacings
        spacing = math.degrees(math.sqrt(4 * math.pi / self.points))
        self.window_deg = max(3.0 * self.sigma_deg, 2.5 * spacing)
        out = 2 * self.points
        if hidden == 0:
            self.mlp = nn.Sequential(nn.Linear(self.in_features, out))
        else:
            self.mlp = nn.Sequential(nn.Linear(self.in_features, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, out))  # fmt: skip
        self.register_buffer("grid", fibonacci_sphere(self.points), persistent=False)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        # float32 under mixed precision (the decode and the loss need the precision)
        logits = _float32(self.mlp, features).unflatten(-1, (2, self.points))
        return {"sphere_logits": logits}

    def _decode(self, logits: Tensor) -> Tensor:
        grid = self.grid.to(logits)
        p = logits.softmax(-1)
        best = grid[p.argmax(-1)]  # (..., 3)
        near = (best @ grid.T) >= math.cos(math.radians(self.window_deg))
        v = ((p * near)[..., None] * grid).sum(-2)
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def rotation(self, outputs: dict[str, Tensor]) -> Tensor:
        lg = outputs["sphere_logits"]
        return rotation_from_axes(self._decode(lg[:, 0]), self._decode(lg[:, 1]))

    def loss(
        self, outputs: dict[str, Tensor], rotations: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        lg = outputs["sphere_logits"]
        grid = self.grid.to(lg)
        s2 = math.radians(self.sigma_deg) ** 2
        axes = rotations.to(lg)[:, 1:3]  # (B, 2, 3): up, nose
        target = ((axes @ grid.T - 1.0) / s2).softmax(-1)
        loss = -(target * lg.log_softmax(-1)).sum(-1).mean() * 2.0
        with torch.no_grad():
            geo = torch.deg2rad(geodesic_distance(self.rotation(outputs), rotations.to(lg)))
        return loss, {"geodesic_deg": torch.rad2deg(geo.mean())}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hidden": self.hidden, "points": self.points,
                "sigma_deg": self.sigma_deg, "window_deg": self.window_deg}  # fmt: skip


def build_head(cfg: Any, in_features: int) -> PoseHead:
    """The head a ``head`` section describes (a registered head config, a DictConfig or a plain
    mapping with its keys; :data:`clerf.config.HEADS`) on ``in_features`` encoder features.

    Raises:
        ConfigError: unknown type, unknown key or bad value (naming ``head.<key>``).
    """
    return head_config(cfg).build(in_features)
