"""Tiny pretrained parts for the built-in tasks: tokenizer, causal LM and feature encoder.

Instruction tuning (and CoMMIT's balance between encoder and LLM) only makes sense from
*pretrained* parts. :func:`prepare_tiny_parts` builds them offline in about a minute on 2 CPU
cores, deterministically, and caches the result:

``<cache>/<task>-<key>/``
    ``tokenizer/``  the tiny byte-level BPE of :func:`~commit_mllm.data.train_tiny_tokenizer`
    on ``task_texts("all")`` (one tokenizer serves both tasks).
    ``llm/``        a tiny ``LlamaForCausalLM`` pretrained as a causal LM on the task's
    question + answer *text* only (:mod:`commit_mllm.parts.llm_pretraining`).
    ``encoder/``    easy-vqa: a tiny ``CLIPVisionModel`` (+ its ``CLIPImageProcessor``);
    tones-aqa: a tiny ``WhisperEncoder`` (+ its ``WhisperFeatureExtractor``), both trained
    on a *pretext* task over synthetic media (:mod:`commit_mllm.parts.encoder_pretraining`).
    ``manifest.json`` settings, seeds, versions, timings, pretext and probe metrics and a
    content hash of the weights.

The cache key hashes the settings and the package / torch / transformers versions; a folder
is written under a temporary name and renamed when complete
(:mod:`commit_mllm.parts.cache`), so a reader never sees a half-written folder and a
complete one is reused in milliseconds. Each phase prints what it does, how long it usually
takes and a progress bar (:mod:`commit_mllm.parts.progress`).

Load the parts into a :class:`~commit_mllm.models.MultimodalLM` with :func:`tiny_mllm_config`
and :func:`load_media_processor`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from commit_mllm.parts.cache import (
    building,
    content_hash,
    library_versions,
    publish,
    resolve_cache_dir,
)
from commit_mllm.parts.encoder_pretraining import (
    clip_processor_class,
    pretrain_audio,
    pretrain_vision,
)
from commit_mllm.parts.llm_pretraining import pretrain_llm
from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.settings import PretrainSettings, cache_key
from commit_mllm.parts.tokenizer import build_tiny_tokenizer, token_ids

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "load_media_processor",
    "prepare_tiny_parts",
    "tiny_mllm_config",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- entry point
def prepare_tiny_parts(
    task: str,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    force: bool = False,
    steps_scale: float = 1.0,
    log: Say | None = print,
    settings: PretrainSettings | None = None,
) -> Path:
    """Pretrain (or load from cache) a tiny tokenizer, LLM and encoder for a built-in task.

    Args:
        task: ``"easy-vqa"`` (CLIP vision encoder) or ``"tones-aqa"`` (Whisper encoder).
        cache_dir: Parent folder of the cache; default
            :func:`~commit_mllm.parts.cache.default_cache_dir`.
        seed: Seed of initialisation and synthetic data.
        force: Retrain even when a complete cached folder exists (then replace it).
        steps_scale: Multiplies every step count and probe size (tests: ~0.01).
        log: Line printer for progress: each phase's announcement (what, how long it
            usually takes), a progress bar and its duration (``None`` = silent, no bars).
        settings: Full settings; overrides ``task``/``seed``/``steps_scale`` when given.

    Returns:
        The folder with ``tokenizer/``, ``llm/``, ``encoder/`` and ``manifest.json``.
    """
    from commit_mllm.tasks import PRETRAIN_TASKS

    settings = settings or PretrainSettings(task=task, seed=seed, steps_scale=steps_scale)
    if settings.task not in PRETRAIN_TASKS:
        raise ValueError(f"unknown task {settings.task!r}; available: {', '.join(PRETRAIN_TASKS)}")
    key = cache_key(settings)
    final = resolve_cache_dir(cache_dir) / f"{settings.task}-{key}"
    if not force and (final / MANIFEST).is_file():
        if log is not None:
            log(f"[prepare] using cached tiny parts {final}")
        return final
    if log is not None:
        usually = "~45 s (easy-vqa) / ~75 s (tones-aqa) on an idle 2-core machine"
        log(f"[prepare] building the tiny {settings.task} parts once into {final} ({usually})")
    with building(final) as tmp:
        _build_parts(tmp, settings, key, log)
        publish(tmp, final, MANIFEST, replace=force)
    if log is not None:
        log(f"[prepare] tiny parts ready in {final}")
    return final


def _build_parts(folder: Path, s: PretrainSettings, key: str, say: Say | None) -> None:
    """Trains every part into ``folder`` and writes the manifest last."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        t0 = time.perf_counter()
        with phase(say, f"{s.task}: training the tiny tokenizer", "~1 s"):
            tok = build_tiny_tokenizer(folder / "tokenizer")
        t_tok = time.perf_counter()
        llm_metrics = pretrain_llm(tok, s, folder / "llm", say)
        t_llm = time.perf_counter()
        if s.modality == "vision":
            enc_metrics = pretrain_vision(s, folder / "encoder", say)
        else:
            enc_metrics = pretrain_audio(s, folder / "encoder", say)
        t_enc = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    ids = token_ids(tok)
    manifest = {
        "format": FORMAT_VERSION,
        "task": s.task,
        "modality": s.modality,
        "seed": s.seed,
        "steps_scale": s.steps_scale,
        "cache_key": key,
        "settings": asdict(s),
        "versions": library_versions(),
        "tokenizer": ids,
        "timings_s": {
            "tokenizer": round(t_tok - t0, 3),
            "llm": round(t_llm - t_tok, 3),
            "encoder": round(t_enc - t_llm, 3),
            "total": round(t_enc - t0, 3),
        },
        "metrics": {"llm": llm_metrics, "encoder": enc_metrics},
        "mllm_config": _mllm_config_dict(s, ids),
        "content_hash": content_hash(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------- MLLM config
def _mllm_config_dict(s: PretrainSettings, ids: dict[str, int]) -> dict[str, Any]:
    """The :class:`~commit_mllm.models.MLLMConfig` fields (relative paths) that fit the parts."""
    cfg: dict[str, Any] = {
        "llm": {"name_or_path": "llm"},
        "vision_projector": {"type": "mlp"},
        "audio_projector": {"type": "mlp"},
    }
    if s.modality == "vision":
        # The pretext trained the last layer's patch tokens: use them (LLaVA's -2 would
        # drop half of a 2-layer encoder); the CLS token carries no pretext target.
        cfg["vision"] = {"name_or_path": "encoder", "feature_layer": -1, "drop_cls": True}
        cfg["image_token_id"] = ids["image_token_id"]
    else:
        cfg["audio"] = {"name_or_path": "encoder"}
        # 2 encoder tokens merged per LLM token: 1-2 s clips -> 25-50 LLM tokens.
        cfg["audio_projector"] = {"type": "mlp", "stride": 2}
        cfg["audio_token_id"] = ids["audio_token_id"]
    return cfg


def tiny_mllm_config(
    folder: str | os.PathLike[str], projector: dict[str, Any] | None = None, **overrides: Any
) -> Any:
    """The :class:`~commit_mllm.models.MLLMConfig` that assembles the cached parts.

    Args:
        folder: A folder returned by :func:`prepare_tiny_parts`.
        projector: Fields of the (fresh) projector; default an MLP (stride 2 for audio).
        **overrides: Extra ``MLLMConfig`` fields (e.g. ``projector_side="own"``).

    Returns:
        An ``MLLMConfig`` with absolute paths to ``llm/`` and ``encoder/``.
    """
    from commit_mllm.models import MLLMConfig

    folder = Path(folder)
    data = json.loads((folder / MANIFEST).read_text())["mllm_config"]
    data["llm"]["name_or_path"] = str(folder / "llm")
    for m in ("vision", "audio"):
        if m in data:
            data[m]["name_or_path"] = str(folder / "encoder")
            if projector is not None:
                data[f"{m}_projector"] = dict(projector)
    data.update(overrides)
    return MLLMConfig(**data)


def load_media_processor(folder: str | os.PathLike[str]) -> Any:
    """The image processor (easy-vqa) or Whisper feature extractor (tones-aqa) of the parts.

    Args:
        folder: A folder returned by :func:`prepare_tiny_parts`.

    Returns:
        ``CLIPImageProcessor`` or ``WhisperFeatureExtractor`` loaded from ``encoder/``.
    """
    from transformers import WhisperFeatureExtractor

    folder = Path(folder)
    modality = json.loads((folder / MANIFEST).read_text())["modality"]
    cls = clip_processor_class() if modality == "vision" else WhisperFeatureExtractor
    return cls.from_pretrained(str(folder / "encoder"), local_files_only=True)
