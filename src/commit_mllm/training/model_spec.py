"""The model of a run, resolved from its run config in one step: :func:`resolve_model`.

:class:`ModelSpec` is everything :func:`~commit_mllm.training.assembly.assemble` builds the
model from: the complete :class:`~commit_mllm.models.MLLMConfig` (a preset's parts and local
folders filled in, the user's projectors, LoRA, dtypes and ``train.freeze_*`` applied, the
projector side), where the tokenizer and the processors come from, the collator's settings
and how the trainable parameters split into components. The run config is read here and
nowhere else on the way to the model; a preset only fills in the spec (configs for
``tiny-random``, cached local folders for ``tiny-pretrained`` and the real-parts presets of
:data:`commit_mllm.parts.PRESETS`), then the ordinary builders run.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models.mllm_config import AudioEncoderConfig, LLMConfig, MLLMConfig, VisionEncoderConfig
from ..tasks import (
    MODALITY,
    PRETRAIN_TASKS,
    VARIANTS,
    task_texts,
)
from .config import RunConfig, check_local_files

TINY_LLM = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 16,
}


TINY_WHISPER = {
    "model_type": "whisper",
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_layers": 1,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "num_mel_bins": 80,
    "max_source_positions": 100,
}


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer comes from: a folder or hub id, or the tiny BPE trained on texts.

    Attributes:
        name: Folder or hub id for ``AutoTokenizer.from_pretrained``; None: train the tiny
            byte-level BPE on ``texts``.
        texts: The texts the tiny tokenizer is trained on (``tiny-random``).
    """

    name: str | None = None
    texts: tuple[str, ...] = ()


@dataclass
class ComponentSpec:
    """How the trainable parameters split into components, and their base rates.

    Attributes:
        patterns: Component -> parameter-name prefixes (``components``); None: from the
            model's layout and ``projector_side``.
        projector_side: ``encoder``, ``llm`` or ``own`` (when ``patterns`` is None).
        lrs: Component -> base LR where one is set (``train.component_lrs``, then
            ``encoder_lr`` / ``projector_lr`` / ``llm_lr``).
        explicit: The components ``train.component_lrs`` names (each must exist).
        lr: The base LR of every other component (``train.lr``).
        weight_decay: Of every component (0 means 0, not AdamW's 0.01).
    """

    patterns: dict[str, list[str]] | None
    projector_side: str
    lrs: dict[str, float]
    explicit: tuple[str, ...]
    lr: float
    weight_decay: float


@dataclass
class ModelSpec:
    """Everything the model of a run is built from (see the module docstring).

    Attributes:
        mllm: The complete model config (``image_token_id``, ``audio_token_id`` and, with
            ``vocab_follows_tokenizer``, ``llm.vocab_size`` are set from the collator when
            it is built).
        modality: ``image``, ``audio`` or ``image+audio``.
        tokenizer: Where the tokenizer comes from.
        processors: Modality -> the processor's folder or hub id (``model.processor`` or a
            preset's encoder folder); None or absent: the encoder's own, or one built.
        image_size: ``model.image_size`` (None: the processor's own).
        max_length: The collator's token limit (``data.max_length``).
        blind: Train without the media (``data.blind``).
        vocab_follows_tokenizer: The LLM's vocabulary is sized to the tokenizer (presets).
        seed: Seeds the model's initialization.
        components: How its parameters split into components.
    """

    mllm: MLLMConfig
    modality: str
    tokenizer: TokenizerSource
    processors: dict[str, str | None] = field(default_factory=dict)
    image_size: int | None = None
    max_length: int = 512
    blind: bool = False
    vocab_follows_tokenizer: bool = False
    seed: int = 0
    components: ComponentSpec | None = None


def resolve_model(cfg: RunConfig) -> ModelSpec:
    """Turn the run config into the complete spec of its model (the one place it is read).

    Prepares what a preset needs (the tiny parts are pretrained into the cache on first use;
    real parts must be prepared), fills in its folders and applies the user's freezing, LoRA,
    dtypes, projectors and ``train.freeze_*``.

    Raises:
        ValueError: A missing local folder (naming the key), an unprepared real part, an
            image size that does not fit the encoder's patch, no tokenizer for a config-built
            LLM.
    """
    check_local_files(cfg)  # a missing local folder: one line naming the key, before loading
    modality = _modality(cfg)
    mllm, tokenizer, processors = _preset(cfg, modality)
    mllm.projector_side = cfg.projector_side
    _apply_freeze(mllm, cfg)
    return ModelSpec(
        mllm=mllm,
        modality=modality,
        tokenizer=tokenizer,
        processors=processors,
        image_size=cfg.model.image_size,
        max_length=cfg.data.max_length,
        blind=cfg.data.blind,
        vocab_follows_tokenizer=cfg.model.preset != "none",
        seed=cfg.run.seed,
        components=component_spec(cfg),
    )


def component_spec(cfg: RunConfig) -> ComponentSpec:
    """The components of a run: ``components`` or the layout, and each one's base LR."""
    t = cfg.train
    # encoder_lr is the rate of each encoder when there are two (components vision, audio).
    named = {"encoder": t.encoder_lr, "projector": t.projector_lr, "llm": t.llm_lr}
    named.update(vision=t.encoder_lr, audio=t.encoder_lr)
    lrs = {n: lr for n, lr in {**named, **t.component_lrs}.items() if lr is not None}
    return ComponentSpec(
        cfg.components, cfg.projector_side, lrs, tuple(t.component_lrs), t.lr, t.weight_decay
    )


def _modality(cfg: RunConfig) -> str:
    """``image``, ``audio`` or ``image+audio``: the task's, else the model config's encoders."""
    if cfg.data.task is not None:
        return MODALITY[cfg.data.task]
    mllm = cfg.model.mllm
    if mllm.vision is not None and mllm.audio is not None:
        return "image+audio"
    return "audio" if mllm.audio is not None else "image"


def tiny_random_mllm(modality: str, image_size: int = 64) -> MLLMConfig:
    """A tiny MLLM from configs (random weights): 2 layers, hidden 64.

    Args:
        modality: ``image`` (CLIP vision), ``audio`` (Whisper encoder) or ``image+audio``.
        image_size: Image side for the vision encoder.
    """
    cfg = MLLMConfig(llm=LLMConfig(config=dict(TINY_LLM)))
    if "image" in modality:
        cfg.vision = VisionEncoderConfig(config={**TINY_CLIP, "image_size": image_size})
    if "audio" in modality:
        cfg.audio = AudioEncoderConfig(config=dict(TINY_WHISPER))
    return cfg


def _tiny_pretrained_mllm(cfg: RunConfig, modality: str) -> tuple[MLLMConfig, Path, dict]:
    """The cached tiny pretrained parts: per encoder, the parts of its single-modality task.

    ``image+audio`` takes the LLM and vision parts from easy-vqa's folder and the audio
    encoder and projector from tones-aqa's (both share one tokenizer, checked). A must-learn
    variant (``data.task``) brings its own parts for its modality.
    """
    from ..parts import prepare_tiny_parts, tiny_mllm_config
    from ..parts.progress import stderr_say

    folders = {}
    for m, task in (("image", "easy-vqa"), ("audio", "tones-aqa")):
        if cfg.data.task in VARIANTS and MODALITY[cfg.data.task] == m:
            task = cfg.data.task
        if m in modality:
            folders[m] = prepare_tiny_parts(task, cfg.run.cache_dir, log=stderr_say)
    first = folders.get("image") or folders["audio"]
    base = tiny_mllm_config(first)
    if len(folders) == 2:
        tokenizers = [(f / "tokenizer" / "tokenizer.json").read_bytes() for f in folders.values()]
        if tokenizers[0] != tokenizers[1]:
            raise ValueError(f"tiny parts {list(folders.values())} use different tokenizers")
        audio = tiny_mllm_config(folders["audio"])
        base.audio, base.audio_projector = audio.audio, audio.audio_projector
    return base, first, {m: str(f / "encoder") for m, f in folders.items()}


def _real_mllm(cfg: RunConfig, modality: str) -> tuple[MLLMConfig, dict[str, str]]:
    """The user's model config with the prepared real parts' folders filled in.

    Returns the config and the folders by role (``vision``, ``audio``, ``llm``); a part that
    is not prepared is a one-line error naming the ``commit-mllm prepare`` command.
    """
    from ..parts import preset_folders

    roles = tuple(r for r, m in (("vision", "image"), ("audio", "audio")) if m in modality)
    folders = {
        k: str(v) for k, v in preset_folders(cfg.model.preset, roles, cfg.run.cache_dir).items()
    }
    size = cfg.model.image_size
    if "vision" in folders and size is not None:
        patch = int(json.loads((Path(folders["vision"]) / "config.json").read_text())["patch_size"])
        if size % patch:
            raise ValueError(
                f"model.image_size {size} is not a multiple of the vision encoder's "
                f"{patch}-pixel patch; use e.g. {8 * patch} or {16 * patch}"
            )
    base = copy.deepcopy(cfg.model.mllm)
    base.vision = (base.vision or VisionEncoderConfig()) if "vision" in folders else None
    base.audio = (base.audio or AudioEncoderConfig()) if "audio" in folders else None
    for role, folder in folders.items():
        part = getattr(base, role)
        part.name_or_path, part.config = folder, None
    return base, folders


def _preset(cfg: RunConfig, modality: str) -> tuple[MLLMConfig, TokenizerSource, dict]:
    """The MLLM config, where the tokenizer comes from and the processors by modality."""
    user = cfg.model.mllm
    if cfg.model.preset == "tiny-random":
        base = tiny_random_mllm(modality, cfg.model.image_size or 64)
        texts = list(task_texts("all"))
        if cfg.data.task is not None and cfg.data.task not in PRETRAIN_TASKS:
            texts += list(task_texts(cfg.data.task))
        tokenizer, processors = TokenizerSource(texts=tuple(texts)), {}
    elif cfg.model.preset == "tiny-pretrained":
        base, folder, processors = _tiny_pretrained_mllm(cfg, modality)
        tokenizer = TokenizerSource(str(folder / "tokenizer"))
    elif cfg.model.preset != "none":
        base, folders = _real_mllm(cfg, modality)
        tokenizer = TokenizerSource(cfg.model.tokenizer or folders["llm"])
        image = cfg.model.processor or folders.get("vision")
        return base, tokenizer, {"image": image, "audio": folders.get("audio")}
    else:
        base = copy.deepcopy(user)
        name = cfg.model.tokenizer or base.llm.name_or_path
        if name is None:
            raise ValueError(
                "model.tokenizer: give a tokenizer when the LLM is built from a config"
            )
        one = "image" if modality == "image+audio" else modality
        return base, TokenizerSource(name), {one: cfg.model.processor}
    # A preset fills the parts; the user's freezing, LoRA and projectors still apply.
    base.vision_projector, base.audio_projector = user.vision_projector, user.audio_projector
    for part in ("llm", "vision", "audio"):
        mine, theirs = getattr(base, part), getattr(user, part)
        if mine is not None and theirs is not None:
            mine.freeze, mine.lora, mine.dtype = theirs.freeze, theirs.lora, theirs.dtype
    return base, tokenizer, processors


def _apply_freeze(mcfg: MLLMConfig, cfg: RunConfig) -> None:
    """``train.freeze_*`` (and their framework aliases) over the model config's flags.

    ``train.freeze_encoder=true`` freezes the whole tower, adapters included: a LoRA the model
    config puts on it is dropped, as LLaMA-Factory's ``freeze_vision_tower`` keeps LoRA off the
    tower. Otherwise a "frozen" tower would still train through its adapters.
    ``train.freeze_llm`` only freezes the LLM's base weights (its LoRA is how it trains).
    """
    t = cfg.train
    if t.freeze_llm is not None:
        mcfg.llm.freeze = t.freeze_llm
    for part in (mcfg.vision, mcfg.audio):
        if part is not None and t.freeze_encoder is not None:
            part.freeze = t.freeze_encoder
            if t.freeze_encoder:
                part.lora = None
    if t.freeze_projector is not None:
        mcfg.vision_projector.freeze = mcfg.audio_projector.freeze = t.freeze_projector
