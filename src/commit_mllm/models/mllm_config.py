"""The configuration of a :class:`~commit_mllm.models.mllm.MultimodalLM`: its parts, plain data.

:class:`MLLMConfig` holds one config per part (vision encoder, audio encoder, the LLM) and
per projector, with LoRA and freezing per part; it round-trips through JSON
(``mllm_config.json`` beside the weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from commit_mllm.models.lora import LoRASettings
from commit_mllm.models.projectors import ProjectorConfig

MODALITIES = ("vision", "audio")


@dataclass
class PartConfig:
    """Fields shared by every pretrained part (encoder or LLM).

    Attributes:
        name_or_path: Hub id or local folder, loaded with ``from_pretrained``.
        config: Alternatively a ``transformers`` config dict (with ``model_type``); the part
            is then built with random weights.
        dtype: Parameter dtype name (``"float32"``, ``"bfloat16"``, ...); ``None`` = default.
        freeze: Freeze every base weight of the part (LoRA adapters, if any, still train).
        lora: LoRA settings (or ``None`` for no LoRA: full fine-tuning unless frozen).
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    dtype: str | None = None
    freeze: bool = False
    lora: LoRASettings | None = None

    def __post_init__(self) -> None:
        self.lora = LoRASettings.from_any(self.lora)


@dataclass
class VisionEncoderConfig(PartConfig):
    """Vision encoder settings (CLIP / SigLIP / ViT); see :class:`VisionEncoder`.

    Attributes:
        feature_layer: Hidden-state index whose patch features are used (LLaVA: -2).
        drop_cls: Drop the CLS token.
        prune_layers: Do not build layers after ``feature_layer``.
    """

    feature_layer: int = -2
    drop_cls: bool = True
    prune_layers: bool = True


@dataclass
class AudioEncoderConfig(PartConfig):
    """Whisper encoder settings; see :class:`AudioEncoder`.

    Attributes:
        max_source_positions: Shrink the positional table (window = twice this in frames).
        mask_padding: Mask padded frames as attention keys.
    """

    max_source_positions: int | None = None
    mask_padding: bool = True


@dataclass
class LLMConfig(PartConfig):
    """Causal LM settings (any ``AutoModelForCausalLM``).

    Attributes:
        vocab_size: Resize the token embeddings to this size (the tokenizer's length).
        attn_implementation: ``"sdpa"``, ``"eager"``, ... (``None`` = transformers default).
    """

    vocab_size: int | None = None
    attn_implementation: str | None = None


@dataclass
class MLLMConfig:
    """Typed configuration of a :class:`MultimodalLM`.

    Attributes:
        llm: The language model.
        vision: Vision encoder (``None`` = no vision pathway).
        audio: Audio encoder (``None`` = no audio pathway).
        vision_projector: Projector after the vision encoder.
        audio_projector: Projector after the audio encoder.
        image_token_id: Placeholder id replaced by the image tokens.
        audio_token_id: Placeholder id replaced by the audio tokens.
        projector_side: Where :meth:`MultimodalLM.encode` stops: ``"encoder"`` (projector
            inside ``encode``), ``"llm"`` or ``"own"`` (``encode`` returns raw encoder
            outputs; ``decode`` runs the projector, so the encoder cache stays valid when
            only the projector moves).
        ignore_index: Label value of unsupervised positions.
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionEncoderConfig | None = None
    audio: AudioEncoderConfig | None = None
    vision_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    audio_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int | None = None
    audio_token_id: int | None = None
    projector_side: str = "encoder"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        # Accept nested dicts (from JSON / YAML) as well as dataclass instances.
        for name, cls in (
            ("llm", LLMConfig),
            ("vision", VisionEncoderConfig),
            ("audio", AudioEncoderConfig),
            ("vision_projector", ProjectorConfig),
            ("audio_projector", ProjectorConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, cls(**value))
        if self.projector_side not in ("encoder", "llm", "own"):
            raise ValueError(f"projector_side must be encoder|llm|own: {self.projector_side!r}")

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable nested dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MLLMConfig:
        """Builds a config from :meth:`to_dict` output (unknown keys are rejected)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown MLLMConfig keys: {sorted(unknown)}")
        return cls(**dict(data))
