"""Typed YAML configs: dataclasses + strict validation + ``key.sub=value`` command-line overrides.

A recipe config is a tree of dataclasses. Loading checks every key and value against the type hints
before anything runs, so a typo (``lora.rnak: 8``) or a wrong type (``train.steps: ten``) stops
with an error that names the key, the file and the allowed values, instead of being silently
ignored halfway through a training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is invalid. The message names the offending key."""


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(hint))}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against ``hint`` and convert it (nested dataclasses, int -> float)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: invalid value {value!r}; allowed: {_type_name(hint)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(hint)[:1] or (Any,)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = get_args(hint) or (Any, Any)
        return {_convert(k, key_hint, where): _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    # bool is a subclass of int in Python; a YAML `true` must not pass as a step count.
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a programming error, not a user one


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values.

    Each dataclass may define ``validate(self)`` for cross-field checks; it runs after construction.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
    return obj


def to_dict(obj: Any) -> Any:
    """Turn a config tree back into plain data (for logging and for results files)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw config mapping (values parsed as YAML scalars).

    ``variants.2.train.steps=50`` indexes into lists. Unknown keys are caught afterwards by
    :func:`from_dict`, so a misspelt override fails as loudly as a misspelt YAML key.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node: Any = data
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {dotted!r}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])!r} is not a mapping")
    return data


def load_config(cls: type[T], path: str | Path, overrides: typing.Sequence[str] = ()) -> T:
    """Read a YAML file, apply overrides and validate it into ``cls``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return from_dict(cls, apply_overrides(data, overrides), where=path.name)
