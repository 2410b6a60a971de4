"""Backbones by name (``encoder.arch``): torchvision's ResNets and timm's convolutional models.

A backbone maps normalised images ``(B, 3, H, W)`` to pooled features ``(B, F)``. Two families
resolve a name, in this order:

* **registered names** (:func:`register_backbone`): ``resnet18``, ``resnet34``, ``resnet50``
  (torchvision, the backbones of every clerf model saved so far), and any a user registers from
  their own module (one function, one decorator: see ``docs/components.md``);
* **timm** (optional: ``pip install timm``): every other name ``timm.create_model`` knows, built
  with ``num_classes=0`` (pooled features, ``num_features`` wide), e.g. ``repvgg_a0`` (6DRepNet's
  family), ``resnet50d``, ``mobilenetv3_small_100``, ``efficientnet_b0``; ``timm/NAME`` forces
  timm where a registered name is the same (``timm/resnet50``). Transformers that need a fixed
  ``img_size`` are not supported.

``encoder.weights`` (what the backbone starts from): ``null`` (random, the default), a torchvision
weight name for the torchvision ResNets (``IMAGENET1K_V1``; needs internet), ``pretrained`` for a
timm model (timm's default tag; needs internet or a filled Hugging Face cache), or a path to a
saved state dict (``.safetensors``, or a ``.pth``/``.bin`` read without pickle) of that
architecture, loaded strictly (its classifier dropped): the offline route.

At export (:func:`deploy_copy`) re-parameterisable blocks (RepVGG's, MobileOne's) are fused into
plain convolutions, as 6DRepNet deploys them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clerf.errors import ConfigError, DataError

__all__ = ["BackboneBuilder", "register_backbone", "build_backbone", "backbone_features",
           "is_backbone", "registered_backbones", "deploy_copy", "unknown_backbone"]  # fmt: skip

#: ``builder(weights) -> (module, feature width)``; ``weights`` as ``encoder.weights``
BackboneBuilder = Callable[[str | None], tuple[nn.Module, int]]
_REGISTERED: dict[str, tuple[BackboneBuilder, int]] = {}
TIMM_PREFIX = "timm/"


def register_backbone(name: str, features: int) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: ``encoder.arch: name`` builds with this function; ``features`` is the width of
    its pooled output (known without building it)."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        old = _REGISTERED.get(name)
        if old is not None and old[0].__qualname__ != fn.__qualname__:
            raise TypeError(f"backbone '{name}' is already registered ({old[0].__module__})")
        _REGISTERED[name] = (fn, int(features))
        return fn

    return deco


def registered_backbones() -> tuple[str, ...]:
    return tuple(_REGISTERED)


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _timm_name(arch: str) -> str | None:
    """The timm model name ``arch`` stands for, or None."""
    if arch in _REGISTERED:
        return None
    name = arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else arch
    timm = _timm()
    if timm is None or not timm.is_model(name):
        return None
    return name


def is_backbone(arch: str) -> bool:
    """Whether ``encoder.arch: arch`` names a backbone (registered, or a timm model)."""
    return arch in _REGISTERED or _timm_name(arch) is not None


def unknown_backbone(arch: str, key: str = "encoder.arch") -> ConfigError:
    """The error for a name that is no backbone, naming ``key`` and what is known."""
    timm = _timm()
    extra = ("; any timm convolutional model by name (timm.list_models())" if timm is not None
             else "; timm models need `pip install timm`")  # fmt: skip
    return ConfigError(f"{key}: expected one of {', '.join(_REGISTERED)}{extra}, got '{arch}'")


def backbone_features(arch: str) -> int:
    """The pooled feature width of ``arch`` (timm: from its config, building it if need be)."""
    if arch in _REGISTERED:
        return _REGISTERED[arch][1]
    name = _timm_name(arch)
    if name is None:
        raise unknown_backbone(arch)
    return _timm_width(_build_timm(name, None))


def build_backbone(arch: str, weights: str | None) -> tuple[nn.Module, int]:
    """``(module, feature width)`` of ``encoder.arch`` starting from ``encoder.weights``."""
    if arch in _REGISTERED:
        return _REGISTERED[arch][0](weights)
    name = _timm_name(arch)
    if name is None:
        raise unknown_backbone(arch)
    net = _build_timm(name, weights)
    return net, _timm_width(net)


def _timm_width(net: nn.Module) -> int:
    """The width of a ``num_classes=0`` timm model's output: ``head_hidden_size`` where a model
    keeps a layer after the pooling (MobileNetV3's ``conv_head``), else ``num_features``."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def _build_timm(name: str, weights: str | None) -> nn.Module:
    timm = _timm()
    assert timm is not None
    if weights in (None, "pretrained"):
        try:
            return timm.create_model(name, pretrained=weights == "pretrained", num_classes=0)
        except (OSError, RuntimeError) as exc:  # no network, no cache
            raise DataError(f"encoder.weights: could not load timm's pretrained weights of "
                            f"{name} (needs internet or a filled Hugging Face cache): "
                            f"{' '.join(str(exc).split())[:300]}") from exc  # fmt: skip
        except TypeError as exc:  # e.g. a transformer that needs img_size
            raise ConfigError(f"encoder.arch: timm model '{name}' cannot be built as a "
                              f"backbone here ({exc})") from exc  # fmt: skip
    net = timm.create_model(name, pretrained=False, num_classes=0)
    load_timm_state(net, Path(weights), name)
    return net


def load_timm_state(net: nn.Module, path: Path, name: str) -> None:
    """Load a saved timm state dict (the whole classifier model's, or the backbone's) into a
    ``num_classes=0`` model, strictly: the classifier's keys are dropped, any other missing or
    unexpected key is a :class:`DataError` listing them."""
    from clerf.models.io import load_state_strict, load_weights_file

    if not path.is_file():
        raise DataError(f"encoder.weights: {path}: no such file (expected null, 'pretrained' or "
                        f"a saved state dict of {name})")  # fmt: skip
    if path.suffix == ".safetensors":
        state = load_weights_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusals and corrupt files come in many types
            raise DataError(f"encoder.weights: {path}: not a readable state dict "
                            f"({' '.join(str(exc).split())[:200]})") from exc  # fmt: skip
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    classifier = getattr(net, "pretrained_cfg", {}).get("classifier") or ""
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    keep = {k: v for k, v in state.items()
            if not any(h and (k == h or k.startswith(h + ".")) for h in heads)}  # fmt: skip
    load_state_strict(net, keep, source=str(path))


def _torchvision_resnet(arch: str) -> BackboneBuilder:
    def build(weights: str | None) -> tuple[nn.Module, int]:
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
        features = net.fc.in_features
        net.fc = nn.Identity()  # the classifier is replaced by clerf's heads
        return net, features

    build.__qualname__ = f"torchvision_{arch}"
    return build


for _arch, _features in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)):
    register_backbone(_arch, _features)(_torchvision_resnet(_arch))


def deploy_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with re-parameterisable blocks fused for inference (RepVGG,
    MobileOne: timm's ``reparameterize_model``); the module itself unchanged. Without such blocks
    (or without timm) the copy computes exactly what ``module`` does."""
    out = copy.deepcopy(module)
    timm = _timm()
    if timm is None:
        return out
    if not any(hasattr(m, "reparameterize") or hasattr(m, "switch_to_deploy")
               for m in out.modules()):  # fmt: skip
        return out
    from timm.utils.model import reparameterize_model

    return reparameterize_model(out.eval(), inplace=True)
