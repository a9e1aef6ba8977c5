"""The run's image processor and audio feature extractor: the one named, the encoder's, or built."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.mllm_config import MLLMConfig

logger = logging.getLogger(__name__)


def load_processors(
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
        return processor_from_config(kind, config, size)[0]
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
    return processor_from_config(kind, config, size)


def processor_from_config(kind: str, config: dict[str, Any], size: int | None) -> tuple[Any, str]:
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
