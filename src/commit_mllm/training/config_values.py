"""Config values from YAML text and ``key=value`` overrides, read by each field's type.

Unquoted scalars stay text until the dataclass field's type is known (``1e-5`` is a float
for a float field, ``on`` a string for a string field); :func:`from_dict` builds the typed
dataclasses, :func:`to_dict` turns them back into plain data.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


# ---- YAML scalars read by the field's type --------------------------------------------
class PlainScalar(str):
    """An unquoted YAML scalar, kept as its text until the type of its field is known."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(_core_schema(self))  # 0.001, not '0.001', in messages


_NULL = frozenset({"", "~", "null", "Null", "NULL"})


_TRUE = frozenset({"true", "yes", "on", "y"})


_FALSE = frozenset({"false", "no", "off", "n"})


_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)|0o[0-7]+|0x[0-9a-fA-F]+")


_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?")


_SPECIAL_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that keeps unquoted scalars as :class:`PlainScalar` text (keys as plain str).

    PyYAML follows YAML 1.1 (``1e-4`` is a string there, ``no`` / ``off`` are booleans);
    leaving the decision to the field's type reads every value as the user means it.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """A mapping whose plain-scalar keys are ordinary strings."""
        mapping = super().construct_mapping(node, deep=deep)
        return {str(k) if isinstance(k, PlainScalar) else k: v for k, v in mapping.items()}


def _construct_str(loader: ConfigLoader, node: yaml.ScalarNode) -> str:
    text = loader.construct_scalar(node)
    return PlainScalar(text) if node.style is None else text


# No implicit typing of plain scalars (the field's type decides), except the merge key.
ConfigLoader.yaml_implicit_resolvers = {}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
ConfigLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def load_yaml(text: str) -> Any:
    """Parse YAML text with every value typed as YAML 1.2's core schema types it.

    ``1e-4`` is a float, ``no`` / ``off`` are strings, ``true`` / ``false`` booleans and
    ``null`` / ``~`` / an empty value null. (Configs go through :func:`load_config`,
    which types each value by its field instead.)

    Raises:
        yaml.YAMLError: The text is not valid YAML.
    """
    return _core_schema(yaml.load(text, Loader=ConfigLoader))


def _core_schema(value: Any) -> Any:
    """Resolve :class:`PlainScalar` scalars (recursively) by YAML 1.2's core schema."""
    if isinstance(value, PlainScalar):
        text = str(value)
        if text in _NULL:
            return None
        if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
            return text.lower() == "true"
        if _INT.fullmatch(text):
            return int(text, 0) if text[:2] in ("0o", "0x") else int(text)
        if _FLOAT.fullmatch(text) or text.lower() in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS.get(text.lower()) or float(text)
        return text
    if isinstance(value, dict):
        return {k: _core_schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_core_schema(v) for v in value]
    return value


def _shown(value: Any) -> str:
    """``str 'x'`` / ``int 3``: a value and its type for an error message."""
    kind = "str" if isinstance(value, str) else type(value).__name__
    return f"{kind} {str(value)!r}" if isinstance(value, str) else f"{kind} {value!r}"


def _plain_scalar(text: str, tp: Any, key: str) -> Any:
    """Convert unquoted text to the scalar type ``tp`` (bool, int, float or str)."""
    low = text.lower()
    if tp is bool:
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if tp is int:
        if _INT.fullmatch(text):
            return int(text, 0) if text[:2] in ("0o", "0x") else int(text)
        raise ConfigError(f"{key}: expected an integer, got str {text!r}")
    if tp is float:
        if low in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[low]
        if _FLOAT.fullmatch(text):
            return float(text)
        raise ConfigError(f"{key}: expected a number, got str {text!r}")
    return text  # str


# ---- dict <-> dataclass ---------------------------------------------------------------
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> its resolved type annotation."""
    return typing.get_type_hints(cls)


def is_dataclass_type(tp: Any) -> bool:
    """Whether ``tp`` is a dataclass class (not an instance)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp``; raise ConfigError naming ``key`` on mismatch.

    Unquoted YAML text (:class:`PlainScalar`) is read by ``tp``: ``1e-4`` for a float, ``off``
    for a bool, ``none`` / ``null`` / ``~`` for an optional field.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        if value is None and optional:
            return None
        if (
            isinstance(value, PlainScalar)
            and optional
            and (value in _NULL or value in ("none", "None"))
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return _core_schema(value)
    if isinstance(value, PlainScalar) and tp in (bool, int, float, str):
        return _plain_scalar(str(value), tp, key)
    if isinstance(value, PlainScalar) and value in _NULL:
        value = None  # an empty value where a mapping or list belongs
    if is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}")
        return from_dict(tp, value, key)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}")
        args = typing.get_args(tp) or (Any, Any)
        return {
            _convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()
        }
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {_shown(value)}")
    return value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, strictly.

    Raises:
        ConfigError: An unknown key (with the closest valid key), a wrong type, or an
            invalid value, each naming the dotted key.
    """
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint} (allowed: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = prefix or cls.__name__
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain nested dicts (YAML-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ---- files and overrides ------------------------------------------------------------
def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict in place.

    A value is parsed as YAML (``[a, b]``, ``{r: 8}``, ``'quoted'``) with its unquoted
    scalars kept as text, typed later by their field (see the module docstring).

    Raises:
        ConfigError: An override without ``=`` or that descends into a non-mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=ConfigLoader) if raw != "" else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", e)
            raise ConfigError(f"override {item!r}: invalid value ({problem})") from None

        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data
