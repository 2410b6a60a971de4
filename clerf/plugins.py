"""The one ``package.module:ClassName`` loader, for user plug-ins (generators, face detectors)."""

from __future__ import annotations

import importlib

from clerf.errors import ConfigError

__all__ = ["is_class_spec", "load_class"]


def is_class_spec(name: str) -> bool:
    """Whether ``name`` names a class by path (``package.module:ClassName``)."""
    mod, sep, cls = name.partition(":")
    return bool(sep and mod and cls)


def load_class(spec: str, base: type, what: str) -> type:
    """The class ``package.module:ClassName``, which must subclass ``base``.

    Raises:
        ConfigError: naming ``what`` (the flag or config key) when the module cannot be
            imported, the class is not there, or it is not a ``base``.
    """
    mod_name, _, cls_name = spec.partition(":")
    if not (mod_name and cls_name):
        raise ConfigError(f"{what} '{spec}': expected package.module:ClassName")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"{what} '{spec}': cannot import module '{mod_name}' ({exc})") from exc
    cls = getattr(mod, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what} '{spec}': '{cls_name}' is not a {base.__module__}."
                          f"{base.__qualname__} subclass")  # fmt: skip
    return cls
