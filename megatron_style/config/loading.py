"""Reading a run's config: YAML/JSON files and `key.sub=value` overrides into the dataclasses,
with every value's type checked and unknown keys rejected, then validated (fields.py ranges,
checks.py rules)."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from megatron_style.config.errors import ConfigError, check
from megatron_style.config.model import ModelConfig
from megatron_style.config.pretrain import PretrainConfig


def model_config(preset: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """Build a validated ModelConfig from a preset name plus explicit field overrides."""
    data: dict[str, Any] = {}
    if preset is not None:
        data["preset"] = preset
    data.update(overrides)
    cfg = from_dict(ModelConfig, data, "model")
    cfg.validate("model")
    return cfg


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        check(value in typing.get_args(tp), key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        check(isinstance(value, (list, tuple)), key, f"expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, data: dict[str, Any], key: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrongly typed values."""
    expand = getattr(cls, "expand", None)  # e.g. ModelConfig: a preset's sizes
    if expand is not None:
        data = expand(data, key or "model")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; {cls.__name__} accepts "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{key}.{k}" if key else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML: numbers, true/false, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    k, v = text.split("=", 1)
    k = k.strip().lstrip("-")
    if not k:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        value = v
    return k.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_overrides_file(path: str) -> list[str]:
    """The overrides of an OVERRIDES_FILE (cluster/pretrain.sh, cluster/launch_deepspeed.sh):
    one per line, taken as it is (no quoting, no expansion, so a value may hold spaces), the
    line's surrounding whitespace and a Windows line end removed; blank lines and lines that
    start with # skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"OVERRIDES_FILE {path!r} cannot be read (relative to {os.getcwd()}): "
                          f"{e}") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid YAML/JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PretrainConfig:
    """Read a recipe, apply `key=value` overrides, build and validate the whole config."""
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(PretrainConfig, data)
    cfg.validate()
    return cfg


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False)
