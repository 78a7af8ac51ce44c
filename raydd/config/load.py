"""Loading: YAML (a key given twice is an error) and ``--set a.b=value`` overrides, parsed as
YAML scalars/lists, built into the schema's dataclasses with strict types; unknown keys raise
:class:`ConfigError` naming the dotted key. Also the flat dotted form a run directory compares.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError, brief
from .schema import Config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults), apply ``a.b=value`` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_problem(e)}{_where(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last) and reads
    ``1e-3`` as a float: PyYAML follows YAML 1.1, whose floats need a dot, so ``1e-3`` stays a string."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r}", node.value[i][0].start_mark)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.2's float syntax (the dot optional before an exponent); the stock resolvers come first, so
# ints, bools and dotted floats resolve as before and only 1e-3, 5E+2 and the like change.
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                       list("-+0123456789"))


def yaml_load(text: str):
    """YAML text as Python values with raydd's loader (floats like ``1e-3``, duplicate keys refused)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _problem(e: yaml.YAMLError) -> str:
    text = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    return text or " ".join(str(e).split())


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    cfg.validate()
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.ipc=10")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def section(cls: type, raw: Any, key: str = "") -> Any:
    """A config dataclass (e.g. :class:`EvalConfig`) from its dict form, with the loader's checks."""
    return _build(cls, raw, key)


def _build(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(raw).__name__} {brief(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{key}.{k}" if key else k
            raise ConfigError(f"unknown config key {where!r}; expected one of: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], f"{key}.{f.name}" if key else f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, f"{key}.{f.name}" if key else f.name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:   # `distill:` with its keys lost (indentation, comments): not silently the defaults
            raise ConfigError(f"{key}: expected a mapping (a config section), got null; drop {key} for its defaults")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(rest) == 1 else f"{key}: {brief(value)} matches none of {rest}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {brief(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {brief(value)}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {brief(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {brief(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {brief(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {brief(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def refuse_mismatch(old: dict[str, Any], new: dict[str, Any], what: str) -> None:
    """One-line error naming the first differing dotted keys of two flat dicts, if any differ."""
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        shown = ", ".join(f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in diffs[:4])
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise ConfigError(f"{what}: {shown}{more}; use a new --out or the original settings")
