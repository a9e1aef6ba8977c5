"""Run configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

A run config has five sections::

    run:        output folder, seed, logging
    data:       a built-in task (easy-vqa, tones-aqa, tones-shapes) or LLaVA-style JSON/JSONL files
    model:      an MLLMConfig (hub ids or local folders, or configs) or a tiny preset
    train:      steps, batch, per-component learning rates, schedule, precision, eval, saves
    commit:     the method's settings (:class:`~commit_mllm.method.strategies.CoMMITConfig`)

Unknown keys and wrong types are errors that name the key (with the closest valid key)
and the file they came from.

Scalars are read as a user means them, by the type of the field they set: YAML files and
``key=value`` overrides keep unquoted scalars as text until the field's type is known, so
``train.lr=1e-4`` and ``2E-5`` are numbers, ``train.mixed_precision=no`` is the string
``"no"``, ``train.cpu=off`` is ``False`` and ``data.task=none`` is null. Where a field takes
any value (a Hugging Face config dict), YAML 1.2's core schema applies (``1e-4`` is a
float, ``no`` a string, ``null`` / ``~`` null). Quoted scalars are always strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..method.strategies import CoMMITConfig
from ..models.mllm_config import MLLMConfig
from ..tasks import TASKS
from .aliases import resolve_aliases
from .config_ranges import check_floats
from .config_values import (
    ConfigError,
    ConfigLoader,
    apply_overrides,
    from_dict,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "RunSection",
    "TrainSection",
    "check_local_files",
    "config_notes",
    "load_config",
    "resolve_num_threads",
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
        freeze_encoder: Freeze the encoder(s), LoRA adapters included: ``true`` drops a
            LoRA the model config puts on a tower (None = as the model config says).
        freeze_projector: Freeze the projector(s).
        freeze_llm: Freeze the LLM's base weights (its LoRA adapters still train).
        weight_decay: AdamW weight decay.
        optimizer: ``adamw``, ``sgd`` or ``ldog`` (layer-wise DoG, package
            ``dog-optimizer``: per-tensor step sizes, the rates become DoG's multipliers).
        schedule: ``cosine``, ``linear`` or ``constant``.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Floor of the decay.
        max_grad_norm: Gradient clipping (0 = off).
        mixed_precision: ``no``, ``bf16`` or ``fp16``.
        cpu: Force the CPU even when a GPU is present.
        num_threads: torch CPU threads per process: ``auto`` (the cores the machine's load
            leaves free at start-up, shared by the processes of this machine; at least 1),
            a number, or ``0`` for torch's own default (one thread per core). On a busy CPU
            more threads than free cores make every process spin-wait: a 10-step run took
            88.9 s with torch's default and 4.9 s with one thread per process
            (``benchmarks/threads.py``).
        fsdp: Shard parameters, gradients and optimizer state over the processes with torch
            FSDP (``use_orig_params``, full shard, one unit per transformer layer) instead of
            replicating them with DDP. Ignored with one process.
        cache_frozen_features: Run each frozen encoder tower once per media item: its output
            is kept, keyed by the item's content, and reused at later visits (training,
            kappa's lookaheads, evaluation); the projector still runs every step. Same
            results as without it (tested bitwise on the tiny config), fewer tower forwards.
            Refused (one line) when a tower trains (unfrozen, LoRA) or draws dropout in
            training mode, and with ``train.fsdp``. Off by default.
        feature_cache_max_mb: Cap on the cached outputs in MiB (held on the tower's device);
            past it new items are recomputed at each visit. The per-item cost is logged at
            start (DINOv2-S at 112 px: 64 x 384 float32 = 96 KiB an image).
        eval_every: Evaluate every E steps (0 = only at the end).
        eval_batch_size: Generation batch size.
        max_new_tokens: Generation length.
        save_every: Save a checkpoint every S steps (0 = only at the end).
        keep_last: Checkpoints kept.
        log_every: Write a metrics record every L steps.
        max_bad_steps: Non-finite losses or gradients in a row before the run aborts (each
            such step is skipped and counted).
        max_dead_steps: Steps in a row with every gradient exactly 0 (seen through the
            clipping norm, so not with ``max_grad_norm`` 0) or a loss unchanged from the
            step before (to 1e-7 relative) before the run fails as dead (0 = never).
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
    num_threads: int | str = "auto"
    fsdp: bool = False
    cache_frozen_features: bool = False
    feature_cache_max_mb: float = 2048.0
    eval_every: int = 0
    eval_batch_size: int = 32
    max_new_tokens: int = 8
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    max_bad_steps: int = 5
    max_dead_steps: int = 20


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
            ("train.optimizer", t.optimizer in ("adamw", "sgd", "ldog"), "adamw, sgd or ldog"),
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
            ("train.max_dead_steps", t.max_dead_steps >= 0, "an integer >= 0 (0 = never)"),
            (
                "train.num_threads",
                t.num_threads == "auto" or (isinstance(t.num_threads, int) and t.num_threads >= 0),
                "auto, 0 (torch's default) or an integer >= 1",
            ),
        ]
        for key, ok, allowed in checks:
            if not ok:
                section, _, name = key.rpartition(".")
                obj = getattr(self, section) if section else self
                raise ConfigError(f"{key} = {getattr(obj, name)!r} is invalid: use {allowed}")
        check_floats(self)
        if t.fsdp and t.mixed_precision == "fp16":
            raise ConfigError(
                "train.mixed_precision = 'fp16' is invalid with train.fsdp = true: use bf16 or no"
            )
        if t.fsdp and t.cache_frozen_features:
            raise ConfigError(
                "train.cache_frozen_features = true is invalid with train.fsdp = true (a rank "
                "that skips the tower on a cache hit would leave FSDP's gathers unmatched): "
                "use false"
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


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, ``./``, ``../`` or ``~``."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name)


def check_local_files(cfg: RunConfig) -> None:
    """Local model parts exist and hold what loading them needs (offline, no weights read).

    ``validate-config`` and the start of every run call it, so a missing folder or a
    processor folder without a processor fails at once, in one line naming the key. (Loading
    a config does not touch the file system: a config may name folders made later.)

    Raises:
        ConfigError: A local folder is missing, an encoder / LLM folder has no
            ``config.json``, or ``model.processor`` names a folder without
            ``preprocessor_config.json``; the message names the key.
    """
    if cfg.model.preset != "none":
        return  # the presets build or cache their own parts
    model = cfg.model
    parts = {p: getattr(model.mllm, p) for p in ("vision", "audio", "llm")}
    for part, conf in parts.items():
        name = getattr(conf, "name_or_path", None)
        if name is None:
            continue
        key = f"model.mllm.{part}.name_or_path"
        folder = Path(name).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ConfigError(
                    f"{key} = {name!r}: no config.json in that folder; give a folder written "
                    "by the model's save_pretrained, or a hub id"
                )
        elif _looks_local(name):
            raise ConfigError(f"{key} = {name!r}: folder not found")
    name = model.processor
    if name is None:
        return
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        raise ConfigError(
            f"model.processor = {name!r}: no preprocessor_config.json in that folder; give a "
            "folder written by the processor's save_pretrained or a hub id, or leave "
            "model.processor unset to build one from the encoder's config.json"
        )
    if not folder.exists() and _looks_local(name):
        raise ConfigError(f"model.processor = {name!r}: folder not found")


def config_notes(cfg: RunConfig) -> list[str]:
    """Lines worth knowing before a run starts (what will be built rather than loaded)."""
    notes = []
    if cfg.model.preset == "none" and cfg.model.processor is None:
        for part in ("vision", "audio"):
            conf = getattr(cfg.model.mllm, part)
            name = getattr(conf, "name_or_path", None)
            folder = Path(name).expanduser() if name else None
            if folder and folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
                notes.append(
                    f"model.mllm.{part}.name_or_path: {name} has no preprocessor_config.json;"
                    " a processor will be built from its config.json (or set model.processor)"
                )
    return notes


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
            data = yaml.load(path.read_text(), Loader=ConfigLoader) or {}
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


def resolve_num_threads(
    setting: int | str, local_processes: int | None = None
) -> tuple[int | None, str]:
    """The torch CPU thread count for ``train.num_threads`` on this machine, now.

    ``auto`` takes the cores the machine's 1-minute load average leaves free (never more
    than torch's default, at least 1) and shares them among the processes started on this
    machine (``LOCAL_WORLD_SIZE``), so a run on a busy machine does not spin-wait.

    Args:
        setting: ``auto``, ``0`` (torch's default) or a thread count.
        local_processes: Processes on this machine (default ``$LOCAL_WORLD_SIZE`` or 1).

    Returns:
        ``(threads, why)``: the count to pass to ``torch.set_num_threads`` (None: leave
        torch's default) and a short explanation for the log.
    """
    import torch

    if setting != "auto":
        count = int(setting)
        if count == 0:
            return None, f"{torch.get_num_threads()} (torch's default; train.num_threads=0)"
        return count, f"{count} (train.num_threads)"
    procs = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1.0, (cpus or 1) - load)
    count = max(1, min(torch.get_num_threads(), int(free // max(1, procs))))
    return count, (
        f"{count} per process (auto: {cpus} cores, load {load:.1f}, {procs} process(es) here; "
        "set train.num_threads to choose)"
    )
