"""Components registered by name: each one's config is a dataclass that validates itself and
builds the component, so adding a head (or a backbone) is one file and one decorator.

A :class:`Registry` maps names (the YAML values, e.g. ``head.type: binned``) to config dataclasses.
The built-in components register when their modules are imported; the registry imports those
modules (named as strings: it sits below them) the first time a name is looked up, so a config
can be loaded before any model code is imported. A user's own component registers the same way
from their module::

    from dataclasses import dataclass
    from clerf.config import HEADS, HeadConfig

    @HEADS.register("my_head")
    @dataclass
    class MyHeadConfig(HeadConfig):
        type: str = "my_head"
        width: int = 64

        def validate(self, path: str = "head") -> None: ...
        def build(self, in_features: int): return MyHead(in_features, self.width)

and ``head.type: my_head`` then works in any config, model directory and command that imports
that module first (``docs/components.md``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from clerf.errors import ConfigError

__all__ = ["Registry", "check_choices", "need"]

T = TypeVar("T")


def need(ok: bool, key: str, what: str, value: Any) -> None:
    """The one config-check idiom: ``ConfigError("key: expected what, got value")`` unless ok."""
    if not ok:
        raise ConfigError(f"{key}: expected {what}, got {value!r}")


class Registry(Generic[T]):
    """Names -> config dataclasses of one kind of component.

    Args:
        kind: what the components are, for messages (``head``).
        key: the config key that names one (``head.type``).
        builtins: modules (dotted names) whose import registers the built-in components.
        field: the dataclass field that holds the name (``type``); registering sets its default.
    """

    def __init__(self, kind: str, key: str, builtins: Iterable[str] = (), field: str = "type"
                 ) -> None:  # fmt: skip
        self.kind, self.key, self.field = kind, key, field
        self._builtins = tuple(builtins)
        self._loaded = not self._builtins
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``name`` -> this config dataclass (its ``field`` must default to
        ``name``). Registering a taken name with another class is an error."""

        def deco(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{self.kind} '{name}': {cls.__qualname__} is not a dataclass")
            default = {f.name: f.default for f in dataclasses.fields(cls)}.get(self.field)
            if default != name:
                raise TypeError(f"{self.kind} '{name}': {cls.__qualname__}.{self.field} must "
                                f"default to '{name}', not {default!r}")  # fmt: skip
            old = self._classes.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise TypeError(f"{self.kind} '{name}' is already registered "
                                f"({old.__module__}.{old.__qualname__})")  # fmt: skip
            self._classes[name] = cls
            return cls

        return deco

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtins:
                importlib.import_module(mod)

    def names(self) -> tuple[str, ...]:
        """Registered names, built-ins first."""
        self._load_builtins()
        return tuple(self._classes)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._classes

    def config_class(self, name: Any, where: str = "") -> type[T]:
        """The config dataclass registered as ``name``; an unknown name is a
        :class:`ConfigError` naming the key (and ``where``: the file) and the known names."""
        self._load_builtins()
        cls = self._classes.get(str(name))
        if cls is None:
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}{self.key}: expected one of {', '.join(self._classes)}, "
                              f"got {name!r}")  # fmt: skip
        return cls

    def fields(self, name: Any) -> tuple[str, ...]:
        """The keys of the section of the component ``name``."""
        return tuple(f.name for f in dataclasses.fields(self.config_class(name)))  # type: ignore[arg-type]

    def from_dict(self, values: Mapping[str, Any], path: str, default: str,
                  ignore: Iterable[str] = ()) -> T:  # fmt: skip
        """A validated config instance of the component a plain section names (its ``field``,
        else ``default``), typed by OmegaConf. Keys in ``ignore`` that the component does not have
        are dropped (the flat sections of older saved models); any other unknown key is an error.
        """
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        name = values.get(self.field, default)
        cls = self.config_class(name)
        order = self.fields(name)
        known = set(order)
        unknown = sorted(set(values) - known - set(ignore), key=str)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}: not a key of the {self.kind} '{name}' "
                              f"(its keys: {', '.join(order)})")  # fmt: skip
        try:
            node = OmegaConf.merge(OmegaConf.structured(cls),
                                   {k: v for k, v in values.items() if k in known})
            obj = OmegaConf.to_object(node)
        except OmegaConfBaseException as exc:
            msg = str(exc).splitlines()[0].strip() if str(exc) else type(exc).__name__
            raise ConfigError(f"{path}.{getattr(exc, 'full_key', '') or ''}: {msg}") from exc
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate(path)
        return obj  # type: ignore[return-value]


def check_choices(obj: Any, path: str) -> None:
    """Each ``Literal[...]`` field of a config dataclass holds one of its values, and each item
    of a ``list[Literal[...]]`` field (OmegaConf checks this on merge; a config built in Python
    gets it here), else ``ConfigError`` naming the key."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints.get(f.name), getattr(obj, f.name)
        key = f"{path}.{f.name}"
        if typing.get_origin(hint) is list:
            (hint,) = typing.get_args(hint) or (None,)
            values = list(value)
        else:
            values = [value]
        if typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
            for v in values:
                need(v in choices, key, "one of " + ", ".join(map(str, choices)), v)
