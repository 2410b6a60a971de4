"""``HeadPoseModel``: the model users get, an encoder's backbone + a pose head + its config.

Input: face crops ``(B, 3, H, W)`` RGB, uint8 in [0, 255] or float in [0, 1], framed like the
training crops (the ``clerf prepare`` protocol). :meth:`HeadPoseModel.predict` resizes them to the
model's ``input_size`` (antialiased) and normalises them with the model's ``mean``/``std``: the
preprocessing travels in the saved ``config.json``, never in the caller's head.

Output: rotation matrices ``(B, 3, 3)`` (``docs/conventions.md``: rows = head axes in camera
coordinates, x right, y up, z toward the viewer) and Euler angles in **degrees** derived from them
with :func:`clerf.geometry.euler_from_rotation` (``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``, yaw in
[-90, 90]), so the two always agree.

Saved form (:mod:`clerf.models.io`): ``DIR/config.json`` (kind ``clerf.head_pose_model``, the
encoder spec, the head config, preprocessing, training summary, versions) and
``DIR/model.safetensors``; :meth:`HeadPoseModel.from_pretrained` rebuilds and loads **strictly**.

The encoder's contrastive projection head is discarded (as in linear evaluation of MoCo/SimCLR):
pose heads sit on the backbone features (:meth:`clerf.models.encoder.Encoder.features`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from clerf.config import head_config
from clerf.errors import ConfigError, DataError
from clerf.geometry import EulerAngles, euler_from_rotation
from clerf.models.encoder import Encoder, EncoderSpec
from clerf.models.heads import PoseHead
from clerf.models.io import (
    WEIGHTS_NAME,
    load_state_strict,
    load_weights_file,
    read_model_config,
    save_model_dir,
)

__all__ = ["HeadPoseModel", "PosePrediction", "MODEL_KIND", "CROP_KEYS", "load_head_pose_model",
           "head_pose_model_dir"]

MODEL_KIND = "clerf.head_pose_model"

#: the crop protocol's keys in the preprocessing record (:attr:`HeadPoseModel.crop`):
#: ``crop_preset`` (a ``clerf.data.crop`` preset name, or None when the training data named
#: none), ``resize_mode`` (``clerf.data.crop.resize_square``), ``crop_source`` (where they came
#: from, in words)
CROP_KEYS = ("crop_preset", "resize_mode", "crop_source")


class PosePrediction(NamedTuple):
    """What :meth:`HeadPoseModel.predict` returns.

    Attributes:
        rotations: ``(B, 3, 3)`` float32 rotation matrices (CPU or the model's device).
        euler: :class:`clerf.geometry.EulerAngles` of ``(B,)`` tensors in degrees,
            ``euler_from_rotation(rotations)``.
    """

    rotations: Tensor
    euler: EulerAngles

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly lists: ``rotation`` (3x3 each), ``pitch``/``yaw``/``roll`` (deg)."""
        return {
            "rotation": self.rotations.tolist(),
            "pitch": self.euler.pitch.tolist(),
            "yaw": self.euler.yaw.tolist(),
            "roll": self.euler.roll.tolist(),
        }


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (JSON-friendly)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class HeadPoseModel(nn.Module):
    """Encoder backbone + pose head; see the module docstring.

    Args:
        encoder: the :class:`~clerf.models.encoder.Encoder` (fresh or pretrained); its
            projection head is replaced by ``nn.Identity`` (unused by pose heads).
        head: a ``head`` config section (a registered head config such as
            :class:`clerf.models.heads.BinnedHeadConfig`, a dict or a DictConfig; missing keys
            take that head's defaults), or None for the default head.
        legacy: also accept the flat ``head`` sections of models saved by earlier clerf versions
            (keys the head type does not have are dropped; :meth:`from_pretrained` sets it).

    Example:
        >>> from clerf.models.encoder import Encoder, EncoderSpec
        >>> m = HeadPoseModel(Encoder(EncoderSpec(input_size=32)), {"type": "rotation6d"})
        >>> p = m.predict(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8))
        >>> tuple(p.rotations.shape), tuple(p.euler.yaw.shape)
        ((2, 3, 3), (2,))
    """

    def __init__(self, encoder: Encoder, head: Any = None, legacy: bool = False) -> None:
        super().__init__()
        cfg = head_config(head, legacy=legacy)
        #: the head's config as saved with the model (every key of its type)
        self.head_config: dict[str, Any] = asdict(cfg)
        self.encoder = encoder
        # Only features() is used; an unused projection would also trip DDP (unused parameters).
        self.encoder.projection = nn.Identity()
        try:
            self.head: PoseHead = cfg.build(encoder.feature_dim)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.training_summary: dict[str, Any] = {}
        #: how the training images were cut from photos, so that ``predict`` cuts faces alike:
        #: the :data:`CROP_KEYS`, written by ``clerf finetune`` at save time and saved in the
        #: preprocessing record; empty when unknown (a model built in code, or one saved before
        #: the record held it: inference then searches the training summary, its legacy route)
        self.crop: dict[str, Any] = {}
        self._encoder_frozen = False

    # ----------------------------------------------------------------------- properties

    @property
    def input_size(self) -> int:
        return int(self.encoder.spec.input_size)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What :meth:`predict` does to its input (also saved in ``config.json``), and the crop
        protocol of the training images (:attr:`crop`, when recorded)."""
        spec = self.encoder.spec
        return {
            "input_size": int(spec.input_size),
            "mean": list(spec.mean),
            "std": list(spec.std),
            # after normalising: zero outside the centred disk of this radius (fraction of the
            # side; 0 = none)
            "circle_mask": float(spec.circle_mask),
            "resize": "antialiased bilinear to input_size x input_size (kornia resize)",
            "input_format": "RGB face crops (B, 3, H, W), uint8 [0, 255] or float [0, 1], "
            "framed like the training crops",
            **{k: self.crop[k] for k in CROP_KEYS if k in self.crop},
        }

    # ----------------------------------------------------------------------- freezing

    @property
    def encoder_frozen(self) -> bool:
        return self._encoder_frozen

    def set_encoder_frozen(self, frozen: bool, keep_frozen: tuple[str, ...] = ()) -> None:
        """Freeze (linear probe) or unfreeze the encoder.

        Frozen: encoder parameters get ``requires_grad=False``, the encoder runs in ``eval()``
        mode (BatchNorm statistics stay fixed) and its features are computed without a graph.
        Unfreezing re-enables gradients except for parameter names starting with one of
        ``keep_frozen`` (encoder-relative, e.g. ``backbone.conv1``: frozen for the whole run).
        """
        self._encoder_frozen = bool(frozen)
        for name, p in self.encoder.named_parameters():
            permanent = any(name.startswith(pre) for pre in keep_frozen)
            p.requires_grad_(not frozen and not permanent)
        self.train(self.training)

    def train(self, mode: bool = True) -> HeadPoseModel:
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self

    # ----------------------------------------------------------------------- forward

    def features(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, F)`` of images already at ``input_size`` (uint8 or [0, 1])."""
        if self._encoder_frozen:
            with torch.no_grad():
                return self.encoder.features(images)
        return self.encoder.features(images)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Raw head outputs (``logits`` ``(B, 3, K)`` and/or ``sixd`` ``(B, 6)``) of images
        ``(B, 3, input_size, input_size)``, uint8 or float in [0, 1]. Used in training."""
        return self.head(self.features(images))

    def rotations(self, images: Tensor) -> Tensor:
        """Rotation matrices ``(B, 3, 3)`` of images at ``input_size`` (no resizing, keeps the
        graph and the current train/eval mode; the export- and evaluation-friendly path)."""
        return self.head.rotation(self(images))

    def loss(self, outputs: dict[str, Tensor], rotations: Tensor,
             weight: Tensor | None = None) -> tuple[Tensor, dict]:  # fmt: skip
        """The head's training loss against label rotations ``(B, 3, 3)``.

        Outputs are cast to float32 first: under mixed precision the network runs in fp16/bf16,
        but a softmax expectation in degrees and its squared error need float32. ``weight``:
        per-sample weights ``(B,)`` for a bounded head (its in-range mask; see
        ``PoseHead.loss``).
        """
        outs = {k: v.float() for k, v in outputs.items()}
        if weight is None:
            return self.head.loss(outs, rotations.float())
        return self.head.loss(outs, rotations.float(), weight=weight)

    def prepare_images(self, images: Tensor) -> Tensor:
        """Check and resize face crops to float ``(B, 3, input_size, input_size)`` in [0, 1]."""
        from clerf.augment import to_float_images

        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "predict: expected RGB face crops (B, 3, H, W) or (3, H, W), got shape "
                f"{tuple(images.shape)}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"predict: expected uint8 or float images, got {images.dtype}")
        if images.is_floating_point() and images.numel() and (
            float(images.min()) < -1e-3 or float(images.max()) > 1.0 + 1e-3
        ):
            raise ValueError(
                "predict: float images must be in [0, 1] (got values in "
                f"[{float(images.min()):.3g}, {float(images.max()):.3g}]); pass uint8 for 0..255"
            )
        return to_float_images(images, self.input_size)

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 64) -> PosePrediction:
        """Rotations and Euler angles (degrees) of a batch of face crops; see the module docs.

        Args:
            images: ``(B, 3, H, W)`` or ``(3, H, W)``, uint8 [0, 255] or float [0, 1], RGB, any
                ``H, W`` (resized to ``input_size``; square crops keep the aspect ratio).
            batch_size: images per forward pass.

        Returns:
            :class:`PosePrediction` with ``rotations (B, 3, 3)`` and ``euler`` (each ``(B,)``),
            on the model's device. The model's train/eval mode is restored afterwards.
        """
        if batch_size < 1:
            raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
        if images.ndim == 3:
            images = images[None]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            outs = [self.rotations(self.prepare_images(images[i:i + batch_size].to(device))).float()
                    for i in range(0, images.shape[0], batch_size)]  # fmt: skip
            R = torch.cat(outs) if outs else torch.empty(0, 3, 3, device=device)
        finally:
            self.train(was_training)
        return PosePrediction(R, euler_from_rotation(R))

    # ----------------------------------------------------------------------- save / load

    def config_dict(self) -> dict[str, Any]:
        return {
            "encoder": asdict(self.encoder.spec),
            "head": self.head_config,
            "head_description": self.head.describe(),
            "preprocessing": self.preprocessing,
            "output": "rotations (B, 3, 3): rows = head axes (right, up, nose) in camera "
            "coordinates (x right, y up, z toward the viewer); euler degrees from "
            "euler_from_rotation, R = Rz(roll) @ Ry(yaw) @ Rx(pitch)",
            "training": self.training_summary,
        }

    def save_pretrained(
        self, directory: str | Path, training: Mapping[str, Any] | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (atomically)."""
        if training is not None:
            self.training_summary = _plain(dict(training))
        return save_model_dir(directory, self, MODEL_KIND, self.config_dict())

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> HeadPoseModel:
        """Rebuild a saved model and load its weights strictly.

        ``path`` is a directory written by :meth:`save_pretrained` or a ``clerf finetune``
        output directory (which holds ``model/``).

        Raises:
            DataError: missing/corrupt files, wrong kind, or weights that do not match the
                rebuilt model (the message lists the keys); never a silent random fallback.
        """
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: no such model directory")
        if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
            p = p / "model"
        meta = read_model_config(p, MODEL_KIND)
        try:
            spec = EncoderSpec.from_config(meta["encoder"])
            model = cls(Encoder(spec, weights=None), meta["head"], legacy=True)
        except (KeyError, TypeError, ConfigError) as exc:
            raise DataError(f"{p / 'config.json'}: invalid model config ({exc})") from exc
        load_state_strict(model, load_weights_file(p / WEIGHTS_NAME), source=str(p / WEIGHTS_NAME))
        model.training_summary = dict(meta.get("training") or {})
        pre = meta.get("preprocessing") or {}
        model.crop = {k: pre[k] for k in CROP_KEYS if isinstance(pre, dict) and k in pre}
        return model.to(map_location).eval()


def head_pose_model_dir(src: str | Path) -> Path | None:
    """The saved ``HeadPoseModel`` directory of ``src`` (a ``clerf finetune`` output or its
    ``model/``), or None when ``src`` is not one (e.g. an encoder or a pretrain output)."""
    p = Path(src)
    for d in (p, p / "model"):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                kind = json.loads(cfg.read_text()).get("kind")
            except (OSError, ValueError):
                return None
            return d if kind == MODEL_KIND else None
    return None


def load_head_pose_model(path: str | Path, map_location: str | torch.device = "cpu"
                         ) -> HeadPoseModel:  # fmt: skip
    """Load a saved :class:`HeadPoseModel` (strict), in ``eval()`` mode."""
    return HeadPoseModel.from_pretrained(path, map_location=map_location)
