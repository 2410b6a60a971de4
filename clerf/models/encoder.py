"""The pose encoder: a torchvision ResNet backbone and a projection head to an L2-normalised
embedding, with its preprocessing (normalisation) inside, saved and loaded strictly.

Input: images ``(B, 3, H, W)``, RGB, float in ``[0, 1]`` (or uint8 in ``[0, 255]``, converted),
normally ``H = W = input_size``; the normalisation ``(x - mean) / std`` (and the optional
``circle_mask``: everything outside a centred disk set to 0, hiding the empty corners that
in-plane rotation leaves) happens inside :meth:`Encoder.forward`, so a saved encoder carries
everything needed to use it.

* :meth:`Encoder.features`: backbone features before the projection, ``(B, F)`` (F = 512 for
  resnet18/34, 2048 for resnet50); pose heads (fine-tuning) sit on these.
* :meth:`Encoder.forward`: the embedding, ``(B, D)``, unit L2 norm; the contrastive loss uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clerf.config import EncoderConfig
from clerf.errors import ConfigError, DataError
from clerf.models.io import (
    WEIGHTS_NAME,
    load_state_strict,
    load_weights_file,
    read_model_config,
    save_model_dir,
)

__all__ = [
    "ARCHITECTURES", "ENCODER_KIND", "EncoderSpec", "Encoder", "build_encoder", "load_encoder",
    "resolve_encoder_dir",
]  # fmt: skip

#: supported backbones and their feature width
ARCHITECTURES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
ENCODER_KIND = "clerf.encoder"


#: the defaults of the ``encoder`` config section: the one source of the spec's defaults
_CONFIG = EncoderConfig()


@dataclass
class EncoderSpec:
    """Everything that rebuilds an :class:`Encoder`: ``clerf.config.EncoderConfig`` without the
    weights to start from, with the same defaults."""

    arch: str = _CONFIG.arch
    embedding_dim: int = _CONFIG.embedding_dim
    projection_hidden: int = _CONFIG.projection_hidden
    input_size: int = _CONFIG.input_size
    mean: list[float] = field(default_factory=lambda: list(_CONFIG.mean))
    std: list[float] = field(default_factory=lambda: list(_CONFIG.std))
    #: radius (fraction of the image size) of the centred disk kept by :meth:`Encoder.normalize`;
    #: 0 = no mask
    circle_mask: float = _CONFIG.circle_mask

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"encoder.arch: expected one of {', '.join(ARCHITECTURES)}, got '{self.arch}'"
            )
        if self.embedding_dim < 1:
            raise ConfigError(f"encoder.embedding_dim: expected >= 1, got {self.embedding_dim}")
        if self.projection_hidden < 0:
            raise ConfigError(
                f"encoder.projection_hidden: expected >= 0, got {self.projection_hidden}"
            )
        if self.input_size < 16:
            raise ConfigError(f"encoder.input_size: expected >= 16 pixels, got {self.input_size}")
        for name in ("mean", "std"):
            v = [float(x) for x in getattr(self, name)]
            if len(v) != 3:
                raise ConfigError(f"encoder.{name}: expected 3 numbers (RGB), got {v}")
            setattr(self, name, v)
        self.circle_mask = float(self.circle_mask)
        if not (self.circle_mask == 0.0 or 0.25 <= self.circle_mask <= 0.75):
            raise ConfigError(
                f"encoder.circle_mask: expected 0 (off) or a radius in [0.25, 0.75] of the image "
                f"size, got {self.circle_mask}"
            )
        if min(self.std) <= 0:
            raise ConfigError(f"encoder.std: expected positive numbers, got {self.std}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EncoderSpec:
        """From a config section (``cfg.encoder``) or a saved ``config.json`` dict."""
        keys = ("arch", "embedding_dim", "projection_hidden", "input_size", "mean", "std",
                "circle_mask")
        return cls(**{k: (list(cfg[k]) if k in ("mean", "std") else cfg[k])
                      for k in keys if k in cfg})  # fmt: skip


def _build_backbone(arch: str, weights: str | None) -> nn.Module:
    from torchvision.models import get_model, get_model_weights

    if weights is not None:
        enum = get_model_weights(arch)
        if weights not in enum.__members__:
            raise ConfigError(
                f"encoder.weights: '{weights}' is not a torchvision weight name for {arch} "
                f"(known: {', '.join(enum.__members__)}; or null for random initialisation)"
            )
        try:
            net = get_model(arch, weights=enum[weights])
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise DataError(
                f"encoder.weights: could not load torchvision weights {arch}.{weights} "
                f"(needs internet or a filled torch hub cache): {' '.join(str(exc).split())}"
            ) from exc
    else:
        net = get_model(arch, weights=None)
    net.fc = nn.Identity()  # the classifier is replaced by our projection head
    return net


class Encoder(nn.Module):
    """ResNet backbone + projection MLP -> L2-normalised embedding; see the module docstring.

    Args:
        spec: architecture and preprocessing (:class:`EncoderSpec`).
        weights: torchvision weight name for the backbone (``"IMAGENET1K_V1"``; downloads) or
            ``None`` for random initialisation (the default).

    Example:
        >>> enc = Encoder(EncoderSpec(arch="resnet18", embedding_dim=32, input_size=32))
        >>> z = enc(torch.rand(2, 3, 32, 32))
        >>> tuple(z.shape), bool(torch.allclose(z.norm(dim=1), torch.ones(2)))
        ((2, 32), True)
    """

    def __init__(self, spec: EncoderSpec | None = None, weights: str | None = None) -> None:
        super().__init__()
        self.spec = spec or EncoderSpec()
        self.weights_source = weights
        self.training_summary: dict[str, Any] = {}
        self.backbone = _build_backbone(self.spec.arch, weights)
        feat = ARCHITECTURES[self.spec.arch]
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
        return ARCHITECTURES[self.spec.arch]

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
