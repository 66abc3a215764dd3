"""YAML experiment configs loaded strictly into dataclasses, with `key.sub=value` overrides.

An unknown or mistyped key is an error naming the key and where it came from (the file, or the override on the
command line): a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class RunConfigError(ValueError):
    """A config file or override that does not fit the experiment's dataclass."""


def load(path: str, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Reads YAML at `path` into `cls`, applying `key.sub=value` overrides (values parsed as YAML)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise RunConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RunConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} must look like key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RunConfigError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
        given[key] = item
    return from_dict(cls, data, where=_Where(path, given))


class _Where:
    """Where a key's value came from: the override that set it (or one of its parents), else the file."""

    def __init__(self, path: str, overrides: dict[str, str] | None = None):
        self.path, self.overrides = path, overrides or {}

    def __call__(self, key: str) -> str:
        for k, item in self.overrides.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"override {item!r}"
        return self.path

    def __str__(self) -> str:
        return self.path


def from_dict(cls: type[T], data: dict[str, Any], where: str | _Where = "config", prefix: str = "") -> T:
    where = where if isinstance(where, _Where) else _Where(where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        raise RunConfigError(f"{where(key)}: unknown key {key!r} (known keys here: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, where, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        section = prefix.rstrip(".")
        msg = str(e) if not section or str(e).startswith(section) else f"{section}: {e}"
        raise RunConfigError(f"{where(section) if section else where}: {msg}") from None


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _coerce(tp, value, where: _Where, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, key)
            except RunConfigError as e:
                errors.append(str(e))
        raise RunConfigError(errors[0] if errors else f"{where(key)}: {key!r} has an invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RunConfigError(f"{where(key)}: {key!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, where, key + ".")
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, list):
            raise RunConfigError(f"{where(key)}: {key!r} must be a list, got {value!r}")
        items = [_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RunConfigError(f"{where(key)}: {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise RunConfigError(f"{where(key)}: {key!r} must be {tp.__name__}, got {value!r}")
    if typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
        raise RunConfigError(f"{where(key)}: {key!r} must be one of {typing.get_args(tp)}, got {value!r}")
    return value
