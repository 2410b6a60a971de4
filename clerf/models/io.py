"""Saving and loading clerf models: safetensors weights + a JSON config, loaded STRICTLY.

A saved model is a directory::

    DIR/config.json        {"kind": "...", "format_version": 1, ...the model's own config...,
                            "clerf_version", "conventions_version", "training": {...}}
    DIR/model.safetensors  the state dict (no pickle)

Loading rebuilds the module from ``config.json`` and loads the weights with
:func:`load_state_strict`: every key must match in name and shape. A mismatch is a
:class:`~clerf.errors.DataError` listing the missing, unexpected and mis-shaped keys; there is no
silent fallback to random weights (the habit DINO's ``load_pretrained_weights`` has). Only the
well-known wrapper prefixes ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) are stripped.

Torch pickle files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are read with ``weights_only=True``.
Writes go to a temporary directory that is renamed at the end, so a failed save never leaves a
half-written model that looks complete.

Shared by :class:`clerf.models.encoder.Encoder` and the fine-tune stage's ``HeadPoseModel``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clerf.errors import DataError
from clerf.versions import CONVENTIONS_VERSION, __version__

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "save_model_dir",
    "read_model_config",
    "load_weights_file",
    "load_state_strict",
    "strip_prefixes",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def save_model_dir(
    directory: str | Path, module: nn.Module, kind: str, config: Mapping[str, Any]
) -> Path:
    """Write ``module``'s weights and ``config`` (plus kind, versions) to ``directory``.

    The directory is replaced atomically (written beside it, then renamed). Returns its path.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    meta = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        **dict(config),
        "clerf_version": __version__,
        "conventions_version": CONVENTIONS_VERSION,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"kind": kind})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_model_config(directory: str | Path, kind: str) -> dict[str, Any]:
    """Read and check ``directory/config.json`` (exists, JSON, the expected ``kind``)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a saved {kind} directory (expected {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME} inside)")  # fmt: skip
    path = d / CONFIG_NAME
    if not path.is_file():
        raise DataError(f"{d}: missing {CONFIG_NAME} (not a saved {kind})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    if meta.get("kind") != kind:
        raise DataError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r}")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {meta.get('format_version')} is newer than this clerf "
            f"understands ({FORMAT_VERSION}); upgrade clerf"
        )
    return meta


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: weights file not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{p}: not a readable safetensors file ({exc})") from exc
    if p.suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/unpickling errors come in many types
            raise DataError(f"{p}: cannot be read as torch weights with weights_only=True "
                            f"({' '.join(str(exc).split())[:200]})") from exc  # fmt: skip
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                          Mapping):  # fmt: skip
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise DataError(f"{p}: expected a state dict of tensors")
        return dict(obj)
    raise DataError(
        f"{p}: unknown weights format '{p.suffix}' (expected .safetensors or "
        f"{', '.join(_TORCH_SUFFIXES)})"
    )


def strip_prefixes(
    state: Mapping[str, Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
) -> dict[str, Tensor]:
    """Remove wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from compile) from keys."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for pre in prefixes:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    return out


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``; every key must match in name, shape and dtype kind.

    Raises:
        DataError: naming ``source`` and listing missing, unexpected and mis-shaped keys
            (the first few of each, with counts). ``module`` is left unchanged then.
    """
    state = strip_prefixes(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch (file vs model)", shapes)):  # fmt: skip
            if keys:
                shown = ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise DataError(f"{source}: weights do not match the model; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
