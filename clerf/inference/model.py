"""A loaded pose model as inference needs it: rotations from images, its input contract, its crop.

:func:`load_pose_model` opens a saved :class:`clerf.models.pose_model.HeadPoseModel` directory
(strict loading, ``clerf.models.io``) and wraps it in :class:`PoseModel`, the one object that
``evaluate``, ``predict`` and ``export`` use:

* :meth:`PoseModel.predict_rotations`: images ``(B, 3, H, W)`` float RGB in [0, 1] (or uint8) on
  the model's device -> rotations ``(B, 3, 3)`` float32 (``docs/conventions.md``: rows = head
  axes in camera coordinates). Images of another size are resized to the model's input size with
  an antialiased bilinear resize (:func:`clerf.augment.to_float_images`, the training pipeline's).
* :attr:`PoseModel.input_size`, :attr:`mean`, :attr:`std`: the input contract (normalisation is
  applied inside the model; recorded in exported ONNX metadata).
* :attr:`PoseModel.crop_preset`, :attr:`resize_mode`: how ``predict`` must cut faces so that they
  look like the training crops (``clerf.data.crop``): read from the saved model's preprocessing
  record (``HeadPoseModel.crop``), or for models saved before it held them, by the legacy search of
  the training summary (:func:`_legacy_crop_protocol`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clerf.errors import DataError

__all__ = ["PoseModel", "load_pose_model", "wrap_head_pose_model", "DEFAULT_CROP_PRESET"]


class PoseModel:
    """A pose network plus its input contract (see the module docstring).

    Args:
        module: the network; ``rotation_fn(module, images)`` (default ``module(images)``) maps
            float images in [0, 1] at ``input_size`` to ``(B, 3, 3)`` rotations.
        input_size: square input side in pixels.
        mean, std: the normalisation the module applies inside (for the record).
        crop_preset: ``clerf.data.crop`` preset of the training crops (``none`` = whole images).
        resize_mode: ``clerf.data.crop.resize_square`` mode of the training crops.
        info: JSON-friendly description (saved config, training summary).
    """

    def __init__(
        self,
        module: nn.Module,
        input_size: int,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        crop_preset: str = "train_rule_k02",
        resize_mode: str = "center",
        info: dict[str, Any] | None = None,
        rotation_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ) -> None:
        self.module = module.eval()
        self.input_size = int(input_size)
        self.mean = list(mean) if mean is not None else [0.0, 0.0, 0.0]
        self.std = list(std) if std is not None else [1.0, 1.0, 1.0]
        self.crop_preset = crop_preset
        self.resize_mode = resize_mode
        self.info = dict(info or {})
        self._rotation_fn = rotation_fn or (lambda m, x: m(x))

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> PoseModel:
        self.module.to(device)
        return self

    def forward_rotations(self, images: Tensor) -> Tensor:
        """Differentiable/traceable core: float ``(B, 3, S, S)`` in [0, 1] -> ``(B, 3, 3)``."""
        return self._rotation_fn(self.module, images)

    def predict_rotations(self, images: Tensor) -> Tensor:
        """Rotations ``(B, 3, 3)`` float32 of images ``(B, 3, H, W)`` (float [0, 1] or uint8)."""
        from clerf.augment import to_float_images

        x = to_float_images(images.to(self.device), self.input_size).contiguous()
        with torch.inference_mode():
            R = self.forward_rotations(x)
        return R.float()

    def export_module(self) -> nn.Module:
        """An ``nn.Module`` computing :meth:`forward_rotations` (for ONNX export)."""
        return _RotationModule(self.module, self._rotation_fn)

    def describe(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                "crop_preset": self.crop_preset, "resize_mode": self.resize_mode, **self.info}


class _RotationModule(nn.Module):
    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.inner = module
        self._fn = fn

    def forward(self, images: Tensor) -> Tensor:
        return self._fn(self.inner, images)


def load_pose_model(path: str | Path | PoseModel, device: torch.device | str = "cpu"
                    ) -> PoseModel:
    """Load a saved ``HeadPoseModel`` directory (or a landmark-to-pose baseline fitted by
    ``clerf landmark-fit``: :mod:`clerf.inference.landmarks`) as a :class:`PoseModel`.

    A :class:`PoseModel` passes through (moved to ``device``), so Python callers can evaluate
    models that live in memory.

    Raises:
        DataError: the directory is missing, is not a saved pose model, or its weights do not
            match its config (strict loading lists the keys).
    """
    if isinstance(path, PoseModel):
        return path.to(device)
    if isinstance(path, nn.Module) and hasattr(path, "rotations"):  # an in-memory HeadPoseModel
        return wrap_head_pose_model(path).to(device)
    p = Path(path)
    if not p.exists():
        raise DataError(f"model not found: {p}")
    from clerf.inference.landmarks import is_landmark_model, load_landmark_model

    if is_landmark_model(p):  # the landmark-to-pose baseline (clerf landmark-fit)
        module, rec = load_landmark_model(p)
        info = {"path": str(p), "crop_source": "model",
                "head": {"type": "LandmarkPnP", "landmarks": rec.get("landmarks"),
                         "focal": rec["focal"], "fitted_on": rec.get("fitted_on")}}
        return PoseModel(module, input_size=rec["input_size"], crop_preset=rec["crop_preset"],
                         resize_mode="center", info=info).to(device)
    from clerf.models.pose_model import HeadPoseModel

    model = HeadPoseModel.from_pretrained(p, map_location="cpu")
    return wrap_head_pose_model(model, p).to(device)


#: crop preset used when a model does not record its own (the benchmark's test crop)
DEFAULT_CROP_PRESET = "hopenet_test"


def wrap_head_pose_model(model: Any, path: Path | None = None) -> PoseModel:
    """A :class:`PoseModel` around a ``HeadPoseModel`` (uses its ``rotations`` path).

    The crop preset and resize mode are the model's preprocessing record
    (``HeadPoseModel.crop``: ``crop_preset``, ``resize_mode``), which ``clerf finetune`` writes at
    save time from the training data. A model whose record names no preset gets
    ``hopenet_test`` (the benchmark's test crop). Models saved before the record held the crop
    go through :func:`_legacy_crop_protocol`. :meth:`PoseModel.describe` says which
    (``crop_source``).
    """
    crop = dict(getattr(model, "crop", None) or {})
    if "crop_preset" in crop:
        preset, source = crop["crop_preset"], "model"
        resize = crop.get("resize_mode") or "center"
        if preset is None:
            preset = DEFAULT_CROP_PRESET
            source = "default (the model's training data names no crop preset)"
    else:
        preset, resize, source = _legacy_crop_protocol(model)
    info = {"path": str(path) if path is not None else None,
            "head": dict(model.head.describe()), "crop_source": source}
    return PoseModel(
        model,
        input_size=model.input_size,
        mean=list(model.encoder.spec.mean),
        std=list(model.encoder.spec.std),
        crop_preset=preset,
        resize_mode=resize,
        info=info,
        rotation_fn=lambda m, x: m.rotations(x),
    )


# --------------------------------------------------------------------------- LEGACY route
# Models saved before ``clerf finetune`` wrote the crop protocol into the preprocessing record
# (``HeadPoseModel.crop``) carry it only somewhere inside their training summary. Kept so that
# those models still load with the crop they were trained on; new models never come here.


def _find_key(tree: Any, key: str, valid: Callable[[Any], bool]) -> Any:
    """First value of ``key`` in nested dicts (breadth-first) that passes ``valid``, or None."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node and valid(node[key]):
                return node[key]
            queue.extend(node.values())
    return None


def _legacy_crop_protocol(model: Any) -> tuple[str, str, str]:
    """LEGACY: ``(crop preset, resize mode, crop source)`` of a model without a crop record.

    Searches the preprocessing and training summary (breadth-first) for ``crop_preset`` and
    ``resize_mode``/``resize`` keys (the prepared store's attributes, copied by old
    ``clerf finetune``). A model trained on rendered stores (a ``generator`` key, no crop preset)
    gets ``none``; a model that records nothing gets ``hopenet_test`` and ``center``.
    """
    from clerf.data.crop import CROP_PRESETS, RESIZE_MODES

    meta = {"preprocessing": dict(model.preprocessing),
            "training": dict(getattr(model, "training_summary", {}) or {})}
    preset = _find_key(meta, "crop_preset", lambda v: v in CROP_PRESETS)
    source = "model"
    if preset is None and _find_key(meta["training"], "generator", lambda v: bool(v)):
        preset, source = "none", "model (trained on rendered images: whole heads, no crop)"
    if preset is None:
        preset, source = DEFAULT_CROP_PRESET, "default (the model records no crop preset)"
    resize = (_find_key(meta, "resize_mode", lambda v: v in RESIZE_MODES)
              or _find_key(meta, "resize", lambda v: v in RESIZE_MODES) or "center")
    return preset, resize, source
