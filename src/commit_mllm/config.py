"""Run configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

A run config has five sections::

    run:        output folder, seed, logging
    data:       a built-in task (easy-vqa, tones-aqa, tones-shapes) or LLaVA-style JSON/JSONL files
    model:      an MLLMConfig (hub ids or local folders, or configs) or a tiny preset
    train:      steps, batch, per-component learning rates, schedule, precision, eval, saves
    commit:     the method's settings (:class:`~commit_mllm.strategies.CoMMITConfig`)

Unknown keys and wrong types are errors that name the key (with the closest valid key)
and the file they came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .aliases import resolve_aliases
from .models.mllm import MLLMConfig
from .strategies import CoMMITConfig
from .tasks import TASKS

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "RunSection",
    "TrainSection",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]

PRESETS = (
    "none",
    "tiny-random",
    "tiny-pretrained",
    "dinov2-smollm2",
    "whisper-smollm2",
    "whisper-gemma3",
    "real",
)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


@dataclass
class RunSection:
    """Where and how a run writes.

    Attributes:
        output_dir: The run folder (metrics.jsonl, eval.jsonl, checkpoints/, plots/).
        seed: Seed of model init, data order and dropout.
        tensorboard: Write TensorBoard event files.
        wandb: Log to Weights & Biases too (when installed).
        progress: Show a progress bar.
        cache_dir: Cache of prepared parts, tiny and real (default: $COMMIT_MLLM_CACHE or
            ~/.cache/commit-mllm).
    """

    output_dir: str = "runs/run"
    seed: int = 0
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    cache_dir: str | None = None


@dataclass
class DataConfig:
    """Training and evaluation data.

    Attributes:
        task: A built-in task (``easy-vqa`` or ``tones-aqa``), or None to use files.
        train_file: LLaVA-style JSON/JSONL training file, or with ``format`` the dataset's
            own folder.
        eval_file: LLaVA-style JSON/JSONL evaluation file (or a dataset folder).
        format: Read a paper dataset in its published layout directly (``textvqa``,
            ``iconqa``, ``aokvqa``, ``aokvqa-da``, ``clothoaqa``, ``macs``, ``sdd``).
        train_split: Split read with ``format`` for training.
        eval_split: Split read with ``format`` for evaluation.
        media_root: Folder that relative image/audio paths are resolved against.
        max_train_samples: Cap on training samples (None = all).
        max_eval_samples: Cap on evaluation samples.
        question_types: Keep only these question types (built-in tasks).
        max_length: Maximum token length of a training sample.
        num_workers: DataLoader worker processes.
        on_bad_sample: ``error`` (stop, naming the row) or ``skip`` (drop the row, count it and
            list it in ``skipped_samples.jsonl`` of the run folder).
        eval_seed: Seed of the held-out draw of a built-in task (which questions
            ``max_eval_samples`` picks, and the synthesized clips of tones-aqa); None = the
            run's seed. Fix it to compare runs of several seeds on the same questions.
        eval_size: Size of the synthesized test split of tones-aqa / tones-shapes (None =
            the task's default, 400 / 300).
        blind: Text-only baseline: images and clips are replaced by zeros in training and
            evaluation, so the run measures the language prior (the same model trained
            without the modality).
    """

    task: str | None = "easy-vqa"
    train_file: str | None = None
    eval_file: str | None = None
    format: str | None = None
    train_split: str = "train"
    eval_split: str = "val"
    media_root: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = 256
    question_types: list[str] | None = None
    max_length: int = 128
    num_workers: int = 0
    on_bad_sample: str = "error"
    eval_seed: int | None = None
    eval_size: int | None = None
    blind: bool = False


@dataclass
class ModelConfig:
    """The model: an :class:`~commit_mllm.models.MLLMConfig` plus how to build its inputs.

    Attributes:
        preset: ``tiny-random`` (tiny random parts from configs, for tests),
            ``tiny-pretrained`` (tiny parts pretrained once and cached, for the demo), a
            real-parts preset (``dinov2-smollm2``, ``whisper-smollm2``, ``whisper-gemma3``,
            or ``real`` = DINOv2 / Whisper by the task's modality + SmolLM2; prepared once
            with ``commit-mllm prepare``, see docs/real_parts.md) or ``none`` (use
            ``mllm``). A preset fills in the parts' folders; ``mllm``'s other settings
            (freezing, LoRA, feature layer, projectors) still apply.
        mllm: The model's parts (hub ids / local folders / configs), LoRA and freezing.
        tokenizer: Tokenizer hub id or folder (default: the LLM's ``name_or_path``).
        processor: Image processor / feature extractor hub id or folder (default: the
            encoder's ``name_or_path``).
        image_size: Image side: the tiny presets' encoders are built for it (default 64);
            with a pretrained image processor it replaces the processor's own size (a
            DINOv2 side must be a multiple of 14). ``None`` = the preset's / processor's.
    """

    preset: str = "none"
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    tokenizer: str | None = None
    processor: str | None = None
    image_size: int | None = None


@dataclass
class TrainSection:
    """Optimization settings.

    Attributes:
        steps: Optimizer steps.
        batch_size: Samples per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        lr: Default base learning rate of every component.
        encoder_lr: Base LR of the encoder component, or of each encoder (components
            ``vision`` and ``audio``) when there are two (None = ``lr``).
        projector_lr: Base LR of the projector component (``projector_side: own``).
        llm_lr: Base LR of the LLM component (None = ``lr``).
        component_lrs: Base LR by component name (any components; overrides the above).
        freeze_encoder: Freeze the encoder(s) (None = as the model config says).
        freeze_projector: Freeze the projector(s).
        freeze_llm: Freeze the LLM's base weights (its LoRA adapters still train).
        weight_decay: AdamW weight decay.
        optimizer: ``adamw`` or ``sgd``.
        schedule: ``cosine``, ``linear`` or ``constant``.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Floor of the decay.
        max_grad_norm: Gradient clipping (0 = off).
        mixed_precision: ``no``, ``bf16`` or ``fp16``.
        cpu: Force the CPU even when a GPU is present.
        num_threads: torch CPU threads per process (None = torch's default); on a shared
            CPU one thread per process is often several times faster.
        fsdp: Shard parameters, gradients and optimizer state over the processes with torch
            FSDP (``use_orig_params``, full shard, one unit per transformer layer) instead of
            replicating them with DDP. Ignored with one process.
        eval_every: Evaluate every E steps (0 = only at the end).
        eval_batch_size: Generation batch size.
        max_new_tokens: Generation length.
        save_every: Save a checkpoint every S steps (0 = only at the end).
        keep_last: Checkpoints kept.
        log_every: Write a metrics record every L steps.
        max_bad_steps: Non-finite losses or gradients in a row before the run aborts (each
            such step is skipped and counted).
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    encoder_lr: float | None = None
    projector_lr: float | None = None
    llm_lr: float | None = None
    component_lrs: dict[str, float] = field(default_factory=dict)
    freeze_encoder: bool | None = None
    freeze_projector: bool | None = None
    freeze_llm: bool | None = None
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    cpu: bool = False
    num_threads: int | None = None
    fsdp: bool = False
    eval_every: int = 0
    eval_batch_size: int = 32
    max_new_tokens: int = 8
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    max_bad_steps: int = 5


@dataclass
class RunConfig:
    """A whole run: every section (see the module docstring)."""

    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    commit: CoMMITConfig = field(default_factory=CoMMITConfig)
    projector_side: str = "encoder"
    components: dict[str, list[str]] | None = None

    def validate(self) -> None:
        """Cross-field checks; errors name the key and what is allowed."""
        t, d = self.train, self.data
        checks = [
            ("train.steps", t.steps >= 1, "an integer >= 1"),
            ("train.batch_size", t.batch_size >= 1, "an integer >= 1"),
            ("train.grad_accum", t.grad_accum >= 1, "an integer >= 1"),
            ("train.optimizer", t.optimizer in ("adamw", "sgd"), "adamw or sgd"),
            (
                "train.schedule",
                t.schedule in ("cosine", "linear", "constant"),
                "cosine, linear, constant",
            ),
            (
                "train.mixed_precision",
                t.mixed_precision in ("no", "bf16", "fp16"),
                "no, bf16, fp16",
            ),
            ("train.warmup_steps", 0 <= t.warmup_steps <= t.steps, "an integer in [0, steps]"),
            ("model.preset", self.model.preset in PRESETS, ", ".join(PRESETS)),
            (
                "projector_side",
                self.projector_side in ("encoder", "llm", "own"),
                "encoder, llm, own",
            ),
            ("data.max_length", d.max_length >= 8, "an integer >= 8"),
            ("data.on_bad_sample", d.on_bad_sample in ("error", "skip"), "error or skip"),
            ("train.max_bad_steps", t.max_bad_steps >= 1, "an integer >= 1"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                section, _, name = key.rpartition(".")
                obj = getattr(self, section) if section else self
                raise ConfigError(f"{key} = {getattr(obj, name)!r} is invalid: use {allowed}")
        _check_rates(t)
        if t.fsdp and t.mixed_precision == "fp16":
            raise ConfigError(
                "train.mixed_precision = 'fp16' is invalid with train.fsdp = true: use bf16 or no"
            )
        if t.fsdp and self.commit.lagging_only:
            raise ConfigError(
                "commit.lagging_only = true is invalid with train.fsdp = true (FSDP parameters "
                "are flattened shards; autograd cannot single one component out): use false"
            )
        if d.task is None and d.train_file is None:
            raise ConfigError(f"data: set data.task ({', '.join(TASKS)}) or data.train_file")
        if d.task is not None and d.task not in TASKS:
            raise ConfigError(f"data.task = {d.task!r} is invalid: use {', '.join(TASKS)} or null")
        if self.model.preset == "none" and (
            self.model.mllm.vision is None and self.model.mllm.audio is None
        ):
            raise ConfigError("model.mllm needs a vision or an audio encoder (or set model.preset)")


def _check_rates(t: TrainSection) -> None:
    """Every learning rate a component can get is a finite number >= 0 (NaN, inf refused)."""
    rates = {f"train.{k}": getattr(t, k) for k in ("lr", "encoder_lr", "projector_lr", "llm_lr")}
    rates.update({f"train.component_lrs.{k}": v for k, v in t.component_lrs.items()})
    for key, rate in rates.items():
        if rate is not None and not (math.isfinite(rate) and rate >= 0):
            raise ConfigError(f"{key} = {rate!r} is invalid: use a finite number >= 0")


# ---- dict <-> dataclass ---------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp``; raise ConfigError naming ``key`` on mismatch."""
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
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp) or (Any, Any)
        return {
            _convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()
        }
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, strictly.

    Raises:
        ConfigError: An unknown key (with the closest valid key), a wrong type, or an
            invalid value, each naming the dotted key.
    """
    hints = _hints(cls)
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
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict in place.

    Raises:
        ConfigError: An override without ``=`` or that descends into a non-mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config, apply dotted overrides, build and validate it.

    Args:
        path: YAML file (None = defaults).
        overrides: ``key=value`` strings.

    Raises:
        ConfigError: Unreadable YAML (with line), unknown keys, wrong types, bad values;
            the message starts with the file name.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        apply_overrides(data, overrides)
        if isinstance(data.get("train"), Mapping):
            # vit_lr, mm_projector_lr, freeze_vision_tower ... -> the canonical keys.
            data["train"] = resolve_aliases(data["train"], "train")
        cfg = from_dict(RunConfig, data)
        cfg.validate()
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg
