"""Multimodal LLMs assembled from parts: encoders, projectors, a causal LM, LoRA.

Typical use::

    from commit_mllm.models import MLLMConfig, LLMConfig, VisionEncoderConfig, MultimodalLM

    cfg = MLLMConfig(
        llm=LLMConfig(name_or_path="path/to/llm", vocab_size=len(tokenizer)),
        vision=VisionEncoderConfig(name_or_path="path/to/clip"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = MultimodalLM(cfg)
    out = model(**batch)  # out.loss, out.logits [T, V], out.targets [T]
"""

from commit_mllm.models.encoders import AudioEncoder, VisionEncoder, whisper_output_lengths
from commit_mllm.models.lora import (
    LoRASettings,
    apply_lora,
    component_parameters,
    component_prefixes,
    freeze_module,
    unwrap_peft,
)
from commit_mllm.models.mllm import MLLMOutput, MultimodalLM
from commit_mllm.models.mllm_config import (
    AudioEncoderConfig,
    LLMConfig,
    MLLMConfig,
    VisionEncoderConfig,
)
from commit_mllm.models.projectors import (
    MLPProjector,
    ProjectorConfig,
    QFormerProjector,
    build_projector,
)

__all__ = [
    "AudioEncoder",
    "AudioEncoderConfig",
    "LLMConfig",
    "LoRASettings",
    "MLLMConfig",
    "MLLMOutput",
    "MLPProjector",
    "MultimodalLM",
    "ProjectorConfig",
    "QFormerProjector",
    "VisionEncoder",
    "VisionEncoderConfig",
    "apply_lora",
    "build_projector",
    "component_parameters",
    "component_prefixes",
    "freeze_module",
    "unwrap_peft",
    "whisper_output_lengths",
]
