"""Build everything a run needs from its config: tokenizer, processor, model, data, components.

The same code path serves hub ids, local folders and the presets: a preset only fills in
the :class:`~commit_mllm.models.MLLMConfig` (configs for ``tiny-random``, cached local
folders for ``tiny-pretrained`` and the real-parts presets of
:data:`commit_mllm.parts.PRESETS`), then the ordinary builders run.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import Collator, load_llava, train_tiny_tokenizer
from ..method.components import Components
from ..models import MultimodalLM, component_prefixes
from ..models.mllm_config import AudioEncoderConfig, LLMConfig, MLLMConfig, VisionEncoderConfig
from ..tasks import (
    MODALITY,
    PRETRAIN_TASKS,
    VARIANTS,
    base_task,
    load_task,
    task_question_types,
    task_texts,
)
from .config import RunConfig, check_local_files

__all__ = ["Assembly", "assemble", "build_components", "tiny_random_mllm"]

logger = logging.getLogger(__name__)

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


@dataclass
class Assembly:
    """What a run is made of.

    Attributes:
        model: The multimodal model.
        tokenizer: Its tokenizer.
        collator: Turns samples into batches (training and generation).
        train_set: Training samples (indexable).
        eval_set: Evaluation samples, or None.
        components: Trainable parameters split into components, with base LRs.
        question_types: Question types of the built-in task (empty for files).
    """

    model: MultimodalLM
    tokenizer: Any
    collator: Collator
    train_set: Sequence[dict]
    eval_set: Sequence[dict] | None
    components: Components
    question_types: tuple[str, ...] = ()


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


def _preset(cfg: RunConfig, modality: str) -> tuple[MLLMConfig, Any, dict[str, str | None]]:
    """The MLLM config, tokenizer and processor folders by modality (presets fill them in)."""
    from transformers import AutoTokenizer

    user = cfg.model.mllm
    if cfg.model.preset == "tiny-random":
        base = tiny_random_mllm(modality, cfg.model.image_size or 64)
        texts = list(task_texts("all"))
        if cfg.data.task is not None and cfg.data.task not in PRETRAIN_TASKS:
            texts += list(task_texts(cfg.data.task))
        tokenizer, processors = train_tiny_tokenizer(texts), {}
    elif cfg.model.preset == "tiny-pretrained":
        base, folder, processors = _tiny_pretrained_mllm(cfg, modality)
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    elif cfg.model.preset != "none":
        base, folders = _real_mllm(cfg, modality)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or folders["llm"])
        image = cfg.model.processor or folders.get("vision")
        return base, tokenizer, {"image": image, "audio": folders.get("audio")}
    else:
        base = copy.deepcopy(user)
        name = cfg.model.tokenizer or base.llm.name_or_path
        if name is None:
            raise ValueError(
                "model.tokenizer: give a tokenizer when the LLM is built from a config"
            )
        tokenizer = AutoTokenizer.from_pretrained(name)
        one = "image" if modality == "image+audio" else modality
        return base, tokenizer, {one: cfg.model.processor}
    # A preset fills the parts; the user's freezing, LoRA and projectors still apply.
    base.vision_projector, base.audio_projector = user.vision_projector, user.audio_projector
    for part in ("llm", "vision", "audio"):
        mine, theirs = getattr(base, part), getattr(user, part)
        if mine is not None and theirs is not None:
            mine.freeze, mine.lora, mine.dtype = theirs.freeze, theirs.lora, theirs.dtype
    return base, tokenizer, processors


def _processors(
    mcfg: MLLMConfig,
    modality: str,
    names: dict[str, str | None],
    size: int | None,
    log: Callable[[str], None] = logger.info,
) -> tuple[Any, Any]:
    """The image processor and / or feature extractor of the run.

    Each from ``names[modality]`` (``model.processor``: a folder or hub id), else from its
    encoder's own folder or hub id, else a default one (the tiny random preset). An encoder
    folder saved without a processor (no ``preprocessor_config.json``, as a model's
    ``save_pretrained`` leaves it) gets one built from its model config, with one line in
    the log saying so.
    """
    image = audio = None
    if "image" in modality:
        image = _processor(mcfg.vision, names.get("image"), "image", size, log)
    if "audio" in modality:
        audio = _processor(mcfg.audio, names.get("audio"), "audio", size, log)
    return image, audio


def _processor(part: Any, chosen: str | None, kind: str, size: int | None, log: Callable) -> Any:
    """One modality's processor: ``model.processor``, else the encoder's, else built."""
    if chosen is not None:  # model.processor: the user's choice must load as it is
        try:
            return _load_processor(chosen, kind, size)
        except OSError as e:
            raise ValueError(
                f"model.processor = {chosen!r}: no {_PROCESSOR_KIND[kind]} there "
                f"({str(e).splitlines()[0]}); give a folder holding preprocessor_config.json "
                "(a processor's save_pretrained) or a hub id, or leave model.processor unset "
                "to build one from the encoder's config"
            ) from None
    name = part.name_or_path if part is not None else None
    if name is None:  # built from a config (tiny-random): the default processor
        config = dict(part.config or {}) if part is not None else {}
        return _processor_from_config(kind, config, size)[0]
    local = Path(name).is_dir()
    if not local or (Path(name) / "preprocessor_config.json").is_file():
        try:
            return _load_processor(name, kind, size)
        except (OSError, ValueError):
            if local:
                raise
            # A hub repo without a processor: built from its model config below.
    processor, what = _processor_from_model_config(name, kind, size)
    log(
        f"processor: {name} has no preprocessor_config.json; using {what} built from its "
        "config.json (set model.processor to use another)"
    )
    return processor


_PROCESSOR_KIND = {"image": "image processor", "audio": "feature extractor"}


def _load_processor(name: str, kind: str, size: int | None = None) -> Any:
    """``from_pretrained`` of an image processor (PIL backend) or a feature extractor.

    ``size`` (``model.image_size``) replaces an image processor's own size.
    """
    from transformers import AutoImageProcessor, WhisperFeatureExtractor

    if kind == "audio":
        return WhisperFeatureExtractor.from_pretrained(name)
    try:
        # The PIL processor: torchvision (the default backend) is often not installed.
        processor = AutoImageProcessor.from_pretrained(name, backend="pil")
    except (TypeError, ValueError):
        processor = AutoImageProcessor.from_pretrained(name)
    if size is not None:  # model.image_size replaces the processor's own size
        processor.size = {"height": size, "width": size}
        if getattr(processor, "do_center_crop", False):
            processor.crop_size = {"height": size, "width": size}
    return processor


def _processor_from_model_config(name: str, kind: str, size: int | None) -> tuple[Any, str]:
    """The processor the model config at ``name`` (folder or hub id) implies.

    Raises:
        ValueError: ``name`` has no readable model config either.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{name}: neither preprocessor_config.json nor a readable config.json "
            f"({str(e).splitlines()[0]}); set model.processor to a processor folder or hub id"
        ) from None
    return _processor_from_config(kind, config, size)


def _processor_from_config(kind: str, config: dict[str, Any], size: int | None) -> tuple[Any, str]:
    """The processor a model config implies: its image side and its family's normalization.

    Args:
        kind: ``image`` or ``audio``.
        config: The encoder's model config as a dict (``model_type`` and its sizes); a full
            CLIP / SigLIP config's ``vision_config`` is used.
        size: ``model.image_size``: replaces the config's image side (None: the config's,
            else 64).

    Returns:
        ``(processor, description)``.
    """
    import transformers

    if kind == "audio":
        mels = int(config.get("num_mel_bins", 80))
        fe = transformers.WhisperFeatureExtractor(feature_size=mels)
        return fe, f"a WhisperFeatureExtractor ({mels} mel bins, 16 kHz)"
    model_type = str(config.get("model_type", "clip_vision_model"))
    vision = config.get("vision_config") if model_type in ("clip", "siglip") else config
    side = int(size or (vision or {}).get("image_size") or 64)

    def pil(name: str) -> Any:  # the PIL class: torchvision is often not installed
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)

    if model_type.startswith("siglip"):
        cls, kw = pil("SiglipImageProcessor"), {"size": {"height": side, "width": side}}
    elif model_type == "vit":
        cls, kw = pil("ViTImageProcessor"), {"size": {"height": side, "width": side}}
    else:  # CLIP: resize the short side, centre-crop
        kw = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
        cls = pil("CLIPImageProcessor")
    processor = cls(**kw)
    return processor, f"a {type(processor).__name__} ({side} px, its family's mean/std)"


def _apply_freeze(mcfg: MLLMConfig, cfg: RunConfig) -> None:
    """``train.freeze_*`` (and their framework aliases) over the model config's flags."""
    t = cfg.train
    if t.freeze_llm is not None:
        mcfg.llm.freeze = t.freeze_llm
    for part in (mcfg.vision, mcfg.audio):
        if part is not None and t.freeze_encoder is not None:
            part.freeze = t.freeze_encoder
    if t.freeze_projector is not None:
        mcfg.vision_projector.freeze = mcfg.audio_projector.freeze = t.freeze_projector


def _datasets(cfg: RunConfig) -> tuple[Sequence[dict], Sequence[dict] | None, tuple[str, ...]]:
    d = cfg.data
    if d.task is not None:
        kw = {"question_types": d.question_types}
        train = load_task(d.task, "train", cfg.run.seed, d.max_train_samples, **kw)
        if d.eval_size is not None:
            if base_task(d.task) == "easy-vqa":
                raise ValueError(
                    f"data.eval_size: {d.task}'s test split is fixed; use data.max_eval_samples"
                )
            kw["size"] = d.eval_size
        seed = cfg.run.seed if d.eval_seed is None else d.eval_seed
        test = load_task(d.task, "test", seed, d.max_eval_samples, **kw)
        return train, test, tuple(task_question_types(d.task))
    if d.format is not None:
        from ..formats import load_format

        train = load_format(d.format, d.train_file, d.train_split, d.media_root)
        src = d.eval_file or d.train_file
        test = load_format(d.format, src, d.eval_split, d.media_root)
    else:
        train = load_llava(d.train_file, media_root=d.media_root)
        test = load_llava(d.eval_file, media_root=d.media_root) if d.eval_file else None
    if d.max_train_samples is not None:
        train = [train[i] for i in range(min(len(train), d.max_train_samples))]
    if test is not None and d.max_eval_samples is not None:
        test = [test[i] for i in range(min(len(test), d.max_eval_samples))]
    return train, test, ()


def build_components(model: torch.nn.Module, cfg: RunConfig) -> Components:
    """Split the model's trainable parameters into components with their base LRs.

    Prefixes come from ``cfg.components`` or from the model's layout and
    ``cfg.projector_side``; LRs from ``train.component_lrs``, then ``encoder_lr`` /
    ``projector_lr`` / ``llm_lr``, then ``train.lr``.
    """
    patterns = cfg.components or component_prefixes(model, cfg.projector_side)
    t = cfg.train
    # encoder_lr is the rate of each encoder when there are two (components vision, audio).
    named = {"encoder": t.encoder_lr, "projector": t.projector_lr, "llm": t.llm_lr}
    named.update(vision=t.encoder_lr, audio=t.encoder_lr)
    lrs = {}
    for name in patterns:
        lr = t.component_lrs.get(name, named.get(name))
        lrs[name] = t.lr if lr is None else lr
    unknown = sorted(set(t.component_lrs) - set(patterns))
    if unknown:
        raise ValueError(
            f"train.component_lrs names unknown components {unknown}; components: {list(patterns)}"
        )
    return Components.from_model(
        model,
        patterns,
        lrs,
        {n: t.weight_decay for n in patterns},  # 0 means 0, not AdamW's 0.01
    )


def assemble(
    cfg: RunConfig, log: Callable[[str], None] = logger.info, *, with_data: bool = True
) -> Assembly:
    """Build tokenizer, processors, collator, model (seeded), datasets and components.

    Args:
        cfg: The run config.
        log: Where one-line notes go (data sizes, a processor built from a config, layers
            not built).
        with_data: Read the training and evaluation sets (False: empty, for evaluating a
            file of one's own).
    """
    check_local_files(cfg)  # a missing local folder: one line naming the key, before loading
    modality = _modality(cfg)
    mcfg, tokenizer, processors = _preset(cfg, modality)
    image_processor, feature_extractor = _processors(
        mcfg, modality, processors, cfg.model.image_size, log
    )
    collator = Collator(
        tokenizer,
        image_processor,
        feature_extractor,
        max_length=cfg.data.max_length,
        blind=cfg.data.blind,
    )
    mcfg.image_token_id = collator.image_token_id
    mcfg.audio_token_id = collator.audio_token_id
    mcfg.projector_side = cfg.projector_side
    _apply_freeze(mcfg, cfg)
    if cfg.model.preset != "none" or collator.placeholder_info.needs_resize:
        mcfg.llm.vocab_size = len(tokenizer)
    torch.manual_seed(cfg.run.seed)
    model = MultimodalLM(mcfg)
    note = getattr(model.vision_encoder, "load_note", None)
    if note:
        log(note)
    if not with_data:
        return Assembly(model, tokenizer, collator, [], None, build_components(model, cfg))
    train, test, qtypes = _datasets(cfg)
    log(f"data: {len(train)} train samples, {len(test) if test is not None else 0} eval samples")
    components = build_components(model, cfg)
    return Assembly(model, tokenizer, collator, train, test, components, qtypes)
