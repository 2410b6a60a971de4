"""The pose encoder: a backbone (:mod:`clerf.models.backbones`: torchvision ResNets, timm) and a
projection head to an L2-normalised embedding, with its preprocessing (normalisation) inside,
saved and loaded strictly.

Input: images ``(B, 3, H, W)``, RGB, float in ``[0, 1]`` (or uint8 in ``[0, 255]``, converted),
normally ``H = W = input_size``; the normalisation ``(x - mean) / std`` (and the optional
``circle_mask``: everything outside a centred disk set to 0, hiding the empty corners that
in-plane rotation leaves) happens inside :meth:`Encoder.forward`, so a saved encoder carries
everything needed to use it.

* :meth:`Encoder.features`: backbone features before the projection, ``(B, F)`` (F = 512 for
  resnet18/34, 2048 for resnet50; timm models: their pooled width); pose heads (fine-tuning)
  sit on these.
* :meth:`Encoder.forward`: the embedding, ``(B, D)``, unit L2 norm; the contrastive loss uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clerf.config import EncoderSpec
from clerf.errors import ConfigError, DataError
from clerf.models.backbones import build_backbone
from clerf.models.io import (
    WEIGHTS_NAME,
    load_state_strict,
    load_weights_file,
    read_model_config,
    save_model_dir,
)

__all__ = [
    "ENCODER_KIND", "EncoderSpec", "Encoder", "build_encoder", "load_encoder",
    "resolve_encoder_dir",
]  # fmt: skip

ENCODER_KIND = "clerf.encoder"


class Encoder(nn.Module):
    """ResNet backbone + projection MLP -> L2-normalised embedding; see the module docstring.

    Args:
        spec: architecture and preprocessing (:class:`EncoderSpec`).
        weights: what the backbone starts from (``encoder.weights``: a torchvision weight name,
            ``"pretrained"`` for timm, a saved state dict's path; :mod:`clerf.models.backbones`)
            or ``None`` for random initialisation (the default).

    Example:
        >>> enc = Encoder(EncoderSpec(arch="resnet18", embedding_dim=32, input_size=32))
        >>> z = enc(torch.rand(2, 3, 32, 32))
        >>> tuple(z.shape), bool(torch.allclose(z.norm(dim=1), torch.ones(2)))
        ((2, 32), True)
    """

    def __init__(self, spec: EncoderSpec | None = None, weights: str | None = None) -> None:
        super().__init__()
        # the spec alone (an ``encoder`` section also names the weights it starts from)
        self.spec = EncoderSpec.from_config(asdict(spec)) if spec is not None else EncoderSpec()
        self.weights_source = weights
        self.training_summary: dict[str, Any] = {}
        self.backbone, feat = build_backbone(self.spec.arch, weights)
        self._feature_dim = int(feat)
        hidden = self.spec.projection_hidden
        if hidden:
            self.projection = nn.Sequential(
                nn.Linear(feat, hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, self.spec.embedding_dim),
            )  # fmt: skip
        else:
            self.projection = nn.Sequential(nn.Linear(feat, self.spec.embedding_dim))
        # Non-persistent: the normalisation lives in config.json, not in the weights.
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), False)

    @property
    def feature_dim(self) -> int:
        """Width ``F`` of :meth:`features`."""
        return self._feature_dim

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] (float) or [0, 255] (uint8) -> normalised float."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"encoder: expected images of shape (B, 3, H, W), got {tuple(images.shape)}"
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.spec.circle_mask:
            x = x * self._disk(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return x

    def _disk(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(h, w)`` 0/1 mask of the centred disk of radius ``circle_mask * min(h, w)``."""
        yy = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
        xx = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
        r = self.spec.circle_mask * min(h, w)
        return ((yy[:, None] ** 2 + xx[None, :] ** 2) <= r * r).to(dtype)

    def features(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, F)`` (after global average pooling, before projection)."""
        return self.backbone(self.normalize(images))

    def project(self, features: Tensor) -> Tensor:
        """Unit-norm embedding ``(B, D)`` of backbone features ``(B, F)``."""
        return F.normalize(self.projection(features), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """Unit-norm embedding ``(B, D)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.project(self.features(images))

    # ----------------------------------------------------------------------- save / load

    def config_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.spec),
            "feature_dim": self.feature_dim,
            "input_format": "RGB float in [0, 1] (or uint8), (B, 3, input_size, input_size); "
            "normalised inside with mean/std",
            "output": "L2-normalised embedding (B, embedding_dim); features(): (B, feature_dim)",
            "init_weights": self.weights_source,
            "training": self.training_summary,
        }

    def save_pretrained(self, directory: str | Path, training: Mapping[str, Any] | None = None
                        ) -> Path:  # fmt: skip
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (atomically)."""
        if training is not None:
            self.training_summary = dict(training)
        return save_model_dir(directory, self, ENCODER_KIND, self.config_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu"
                        ) -> Encoder:  # fmt: skip
        """Rebuild a saved encoder and load its weights strictly.

        ``path`` is a directory written by :meth:`save_pretrained`, or a pretrain output
        directory containing ``encoder/``. Never downloads anything: the backbone is built
        randomly and then every weight is overwritten from the file.

        Raises:
            DataError: missing/corrupt files, wrong kind, or weights that do not match
                (the message lists the keys).
        """
        d = resolve_encoder_dir(path)
        meta = read_model_config(d, ENCODER_KIND)
        try:
            spec = EncoderSpec.from_config(meta)
        except (ConfigError, TypeError) as exc:
            raise DataError(f"{d / 'config.json'}: invalid encoder config ({exc})") from exc
        enc = cls(spec, weights=None)
        state = load_weights_file(d / WEIGHTS_NAME)
        load_state_strict(enc, state, source=str(d / WEIGHTS_NAME))
        enc.weights_source = meta.get("init_weights")
        enc.training_summary = dict(meta.get("training") or {})
        return enc.to(map_location)


def resolve_encoder_dir(path: str | Path) -> Path:
    """``path`` itself if it holds ``config.json``, else ``path/encoder`` (a pretrain output)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such encoder directory")
    if (p / "config.json").is_file() and (p / WEIGHTS_NAME).is_file():
        return p
    if (p / "encoder" / "config.json").is_file():
        return p / "encoder"
    return p  # read_model_config names what is missing


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> Encoder:
    """Load a pretrained encoder (strict); ``clerf.load_encoder`` is this function."""
    return Encoder.from_pretrained(path, map_location=map_location)


def build_encoder(cfg: Mapping[str, Any]) -> Encoder:
    """A fresh :class:`Encoder` from a config's ``encoder`` section (``weights`` included)."""
    return Encoder(EncoderSpec.from_config(cfg), weights=cfg.get("weights", None))
