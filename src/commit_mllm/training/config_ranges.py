"""Float settings: every one finite and inside its range (:data:`FLOAT_RANGES`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config_values import ConfigError, field_types, is_dataclass_type


# ---- float settings: finite and in range ------------------------------------------------
@dataclass(frozen=True)
class FloatRange:
    """The values a float setting allows (always finite); None = unbounded on that side.

    Attributes:
        low: Smallest allowed value.
        high: Largest allowed value.
        low_open: ``low`` itself is excluded.
        high_open: ``high`` itself is excluded.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, x: float) -> bool:
        """Whether ``x`` is finite and inside the range."""
        if not math.isfinite(x):
            return False
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return self.high is None or (x < self.high or (not self.high_open and x == self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a finite number in {lo}{self.low:g}, {self.high:g}{hi}"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"


_RATE = FloatRange(0.0)


_POSITIVE = FloatRange(0.0, low_open=True)


_AT_LEAST_1 = FloatRange(1.0)


_FRACTION = FloatRange(0.0, 1.0, low_open=True)


_DROPOUT = FloatRange(0.0, 1.0, high_open=True)


# Every float setting of RunConfig, by dotted key ('*' = any key of a mapping). A test walks
# the dataclasses and requires an entry for each float field, so none escapes validation.
FLOAT_RANGES: dict[str, FloatRange] = {
    "train.lr": _RATE,
    "train.encoder_lr": _RATE,
    "train.projector_lr": _RATE,
    "train.llm_lr": _RATE,
    "train.component_lrs.*": _RATE,
    "train.weight_decay": _RATE,
    "train.min_lr_ratio": FloatRange(0.0, 1.0),
    "train.max_grad_norm": FloatRange(0.0),  # 0 = no clipping
    "train.feature_cache_max_mb": _POSITIVE,
    "model.mllm.llm.lora.alpha": _POSITIVE,
    "model.mllm.vision.lora.alpha": _POSITIVE,
    "model.mllm.audio.lora.alpha": _POSITIVE,
    "model.mllm.llm.lora.dropout": _DROPOUT,
    "model.mllm.vision.lora.dropout": _DROPOUT,
    "model.mllm.audio.lora.dropout": _DROPOUT,
    "model.mllm.vision_projector.dropout": _DROPOUT,
    "model.mllm.audio_projector.dropout": _DROPOUT,
    "commit.rows": _FRACTION,  # as a fraction; an int is a row count
    "commit.kappa_target": _POSITIVE,
    "commit.component_targets.*": _POSITIVE,
    "commit.bias_threshold": FloatRange(0.0),
    "commit.oscillation_threshold": FloatRange(0.0),
    "commit.flip_threshold": FloatRange(0.0, 1.0),
    "commit.collapse_log_kappa": _POSITIVE,
    "commit.gamma": FloatRange(0.0),
    "commit.max_factor": _AT_LEAST_1,
    "commit.factor_caps.*": _AT_LEAST_1,
    "commit.alpha": FloatRange(0.0),
    "commit.tau": FloatRange(1.0, low_open=True),
    "commit.ogm_rho": FloatRange(0.0),
    "commit.replay.*.*": _POSITIVE,
    "commit.progress_gain": FloatRange(0.0),
    "commit.progress_cut_gain": FloatRange(0.0),
    "commit.progress_horizon": _AT_LEAST_1,
    "commit.progress_confidence": FloatRange(0.0),
    "commit.progress_max_cut": _AT_LEAST_1,
    "commit.progress_max_raise": _AT_LEAST_1,
    "commit.progress_guard": _POSITIVE,
    "commit.progress_rows": _FRACTION,
    "commit.linesearch_alphas.*": _POSITIVE,
    "commit.linesearch_gain": FloatRange(0.0, 1.0),
    "commit.linesearch_cut_gain": FloatRange(0.0, 1.0),
    "commit.linesearch_max_cut": _AT_LEAST_1,
    "commit.linesearch_max_raise": _AT_LEAST_1,
    "commit.linesearch_smoothing": _AT_LEAST_1,
}


def _takes_float(tp: Any) -> bool:
    """``float``, or a union with it (``float | None``, ``int | float | None``)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return tp is float or (union and float in typing.get_args(tp))


def _dataclass_in(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if is_dataclass_type(arg):
            return arg
    return None


def _mapping_value(tp: Any) -> Any:
    """The value type of ``dict[K, V]`` (also inside ``| None``), else None."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) in (dict, Mapping):
            return typing.get_args(arg)[1]
    return None


def _sequence_value(tp: Any) -> Any:
    """The item type of ``tuple[V, ...]`` / ``list[V]`` (also inside ``| None``), else None."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) in (tuple, list):
            return typing.get_args(arg)[0]
    return None


def float_settings(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every float setting under a config dataclass (``*``: a mapping's key).

    Walks nested dataclasses (also optional ones) and mappings, so a float field added
    anywhere in a config (``float_settings(RunConfig)``) is listed; :data:`FLOAT_RANGES`
    must hold each of them.
    """
    keys = []
    for f in dataclasses.fields(cls):
        keys += _float_keys(field_types(cls)[f.name], f"{prefix}{f.name}")
    return keys


def _float_keys(tp: Any, key: str) -> list[str]:
    if _takes_float(tp):
        return [key]
    nested = _dataclass_in(tp)
    if nested is not None:
        return float_settings(nested, key + ".")
    value = _mapping_value(tp) or _sequence_value(tp)
    return _float_keys(value, key + ".*") if value is not None else []


def check_floats(obj: Any, prefix: str = "", pattern: str = "") -> None:
    """Every float value in a config is finite and inside its :data:`FLOAT_RANGES` range."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        _check_float_value(getattr(obj, f.name), hints[f.name], prefix + f.name, pattern + f.name)


def _check_float_value(value: Any, tp: Any, key: str, pattern: str) -> None:
    if isinstance(value, float) and _takes_float(tp):
        allowed = FLOAT_RANGES.get(pattern, FloatRange())
        if not allowed.allows(value):
            raise ConfigError(f"{key} = {value!r} is invalid: use {allowed}")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_floats(value, key + ".", pattern + ".")
    elif isinstance(value, Mapping) and _mapping_value(tp) is not None:
        for k, v in value.items():
            _check_float_value(v, _mapping_value(tp), f"{key}.{k}", pattern + ".*")
    elif isinstance(value, (tuple, list)) and _sequence_value(tp) is not None:
        for i, v in enumerate(value):
            _check_float_value(v, _sequence_value(tp), f"{key}.{i}", pattern + ".*")
