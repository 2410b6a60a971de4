"""Experiment configuration: the typed schema, YAML loading, dotted overrides, provenance.

One YAML file per experiment under ``configs/``; every key is checked against the typed schema
below (OmegaConf structured configs). An unknown key or a wrong type is a
:class:`~clerf.errors.ConfigError` naming the key, the file and what was expected.
Overrides on the command line use dotted keys: ``train.lr=1e-4``.

Each stage owns one section. Add a section as a dataclass here, with defaults that make sense on
a 2-core CPU machine, and document it in the README's configuration table.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clerf import CONVENTIONS_VERSION, __version__
from clerf.errors import ConfigError

# --------------------------------------------------------------------------- schema sections


@dataclass
class GeneratorConfig:
    """Which pose-conditioned renderer makes the images (``generators/``)."""

    #: registry name (``procedural``, ``eg3d``, ``panohead``) or ``package.module:ClassName``
    name: str = "procedural"
    #: images are rendered at this size (pixels, square)
    resolution: int = 64
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
    device: str = "auto"
    #: generator-specific parameters, validated by the generator itself
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """The whole experiment. Sections are filled in by the stages that read them."""

    name: str = "experiment"
    seed: int = 0
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


# --------------------------------------------------------------------------- loading


def _describe(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0].strip() if str(exc) else exc.__class__.__name__
    if key:
        return f"{source}: key '{key}': {msg}"
    return f"{source}: {msg}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, source)) from exc


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Parse ``key.sub=value`` strings; a malformed one is a :class:`ConfigError`."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)"
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "command-line override")) from exc


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type = ExperimentConfig,
) -> DictConfig:
    """Load a YAML config (or the defaults when ``path`` is None), validate it, apply overrides.

    Returns a read-only, typed ``DictConfig`` (attribute access, ``OmegaConf.to_yaml`` works).

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, unknown key, wrong type.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from exc
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
        cfg = _merge(cfg, loaded, str(p))
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "command-line override")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, str(path or "config"))) from exc
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_resolved(cfg: DictConfig, directory: str | Path, filename: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs; returns the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / filename
    out.write_text(to_yaml(cfg))
    return out


def provenance(cfg: DictConfig | None = None, **extra: Any) -> dict[str, Any]:
    """What made an artefact: clerf and conventions versions, seed, resolved config, time.

    Values are JSON-friendly; stores write them as attributes, checkpoints as JSON.
    """
    info: dict[str, Any] = {
        "clerf_version": __version__,
        "conventions_version": CONVENTIONS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg is not None:
        info["seed"] = int(cfg.seed) if "seed" in cfg else None
        info["config_yaml"] = to_yaml(cfg)
        info["config_json"] = json.dumps(to_dict(cfg), sort_keys=True)
    info.update(extra)
    return info
