"""Typed configs from YAML: nested dataclasses, dotted command-line overrides, errors that name the key.

    cfg = load_config(RunConfig, "recipes/tiny-cpu.yaml", ["train.steps=20", "model.tapa.alpha=0.2"])

Unknown keys and values of the wrong type are errors naming the dotted key and what was expected.
"""

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key):
    """Check (and where lossless, convert) value to the annotated type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a {' or '.join(_type_name(o) for o in options)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)[:1] or (typing.Any,)
        return [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls, data, prefix=""):
    """Build dataclass cls from a nested dict, checking every key and type."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; {cls.__name__} has: {', '.join(sorted(fields))}")
    values = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a dataclass's own validation in __post_init__
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def apply_overrides(data, overrides):
    """Apply 'a.b.c=value' strings to a nested dict; values are parsed as YAML (3e-4, true, [1, 2])."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote "
                              "strings, close brackets, e.g. key=[1, 2]") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _yaml_problem(err):
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or str(err).splitlines()[0]}{where}"


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data or {}


def load_config(cls, path=None, overrides=()):
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(config):
    return dataclasses.asdict(config)


def dump_yaml(config, path):
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
