"""Experiment configs: one YAML per experiment, loaded into typed dataclasses.

Why typed: a typo in a key or a value of the wrong type must stop a job before it spends an hour of
compute, with a message that names the key and the file it came from. Every entry point accepts
overrides as ``key.sub=value`` (the value is parsed as YAML, so ``3``, ``1e-3``, ``true`` and
``[a, b]`` mean what they look like).

Each folder owns the dataclass of its own section (``shards.stream.StreamConfig``, ...);
``rounds.experiment`` composes them. This package owns the generic loading and checking and imports
nothing of the project, nor torch (tests/test_layers.py checks both), so every layer can use ``require`` in its
own dataclasses and reading a YAML starts in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, missing or has a bad value; the message names key and source."""


def require(condition: bool, key: str, reason: str) -> None:
    """Validation helper for ``__post_init__``: the loader prefixes the section path to ``key``."""
    if not condition:
        raise ConfigError(f"{key}: {reason}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{name}: unknown key (known in {where}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as exc:   # ValueError: sections of folders that cannot import ConfigError
        raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None


def to_dict(config: Any) -> dict:
    """Plain dict of a config (for writing the resolved config of a run)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings to a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, cls: type[T], overrides: list[str] | None = None) -> T:
    """Load a YAML config (or the defaults when ``path`` is None) with command-line overrides."""
    source = str(path) if path is not None else "defaults"
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
    try:
        data = apply_overrides(data, list(overrides or []))
        return from_dict(cls, data)
    except ConfigError as exc:
        suffix = " (or its command-line overrides)" if overrides else ""
        raise ConfigError(f"{source}{suffix}: {exc}") from None


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from other arguments (options never contain a bare '=')."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides
