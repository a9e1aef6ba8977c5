"""Component registry for native Hugging Face MLLM classes (transformers 5.x).

Each registered class maps to the parameter-name prefixes of its three *parts*:

* ``encoder``: the modality encoder (vision tower, audio tower);
* ``projector``: the connector (MLP projector, Q-Former + query tokens, patch merger);
* ``llm``: the language model and its output head.

``projector_side`` (METHOD.md, "Components") then folds the parts into components:
``encoder`` -> {encoder: encoder + projector, llm}; ``llm`` -> {encoder, llm: llm +
projector}; ``own`` -> {encoder, projector, llm}.

Prefixes are written for the bare model (``model.language_model``); the patterns produced
by :func:`component_patterns` are ``re:`` regexes that also accept the ``base_model.model.``
prefix peft adds, so LoRA parameters (``base_model.model.model.language_model.layers.0.
self_attn.q_proj.lora_A.default.weight``) land in the component of the module they adapt.

Example:
    >>> components = build_components(model, projector_side="encoder",
    ...                               lrs={"encoder": 2e-5, "llm": 1e-4})
    >>> print(components.table())
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..method.components import ComponentError, Components

__all__ = [
    "PARTS",
    "PEFT_PREFIX",
    "PROJECTOR_SIDES",
    "REGISTRY",
    "FeatureSpec",
    "MLLMSpec",
    "UnknownArchitectureError",
    "build_components",
    "component_patterns",
    "part_patterns",
    "register_mllm",
    "spec_for",
    "unwrap_model",
]

PARTS = ("encoder", "projector", "llm")
PROJECTOR_SIDES = ("encoder", "llm", "own")
PEFT_PREFIX = "base_model.model."


class UnknownArchitectureError(ComponentError):
    """The model's class has no entry in the registry and no components were declared."""


@dataclass(frozen=True)
class FeatureSpec:
    """How the cached-encoder adapter computes one modality's features.

    Attributes:
        key: Name of the features in ``mm_encoder_outputs`` (``"image"``, ``"video"``).
        method: Method of the (unwrapped) model that runs encoder + projector.
        trigger: Batch key whose presence means the modality is in the batch.
        inputs: Batch key -> keyword of ``method``.
        consumed: Batch keys only the encoder reads (left out of the decode call).
    """

    key: str
    method: str
    trigger: str
    inputs: Mapping[str, str]
    consumed: tuple[str, ...]


@dataclass(frozen=True)
class MLLMSpec:
    """Where a Hugging Face MLLM class keeps its parts, and how to adapt it.

    Attributes:
        name: The class name (``type(model).__name__``).
        encoder: Prefixes of the modality encoder's parameters.
        projector: Prefixes of the projector / connector.
        llm: Prefixes of the language model and its head.
        adapter: Cached-encoder adapter kind: ``"mm_encoder_outputs"`` (the forward accepts
            precomputed encoder outputs), ``"qwen2_audio"`` (features scattered into
            ``inputs_embeds``) or None (the meter runs a full forward per branch).
        features: Per modality, how ``encode`` computes its features.
        output_class: Name of the ``transformers`` output class that wraps cached features
            in ``mm_encoder_outputs`` (the forward reads attributes of it).
    """

    name: str
    encoder: tuple[str, ...]
    projector: tuple[str, ...]
    llm: tuple[str, ...]
    adapter: str | None = "mm_encoder_outputs"
    features: tuple[FeatureSpec, ...] = field(default_factory=tuple)
    output_class: str = "BaseModelOutputWithPooling"

    def parts(self) -> dict[str, tuple[str, ...]]:
        """Part name -> prefixes."""
        return {"encoder": self.encoder, "projector": self.projector, "llm": self.llm}


_IMAGE = FeatureSpec(
    "image",
    "get_image_features",
    "pixel_values",
    {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
    ("pixel_values",),
)
_IMAGE_NEXT = FeatureSpec(
    "image",
    "get_image_features",
    "pixel_values",
    {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
    ("pixel_values", "image_sizes"),
)
_IMAGE_ONLY = FeatureSpec(
    "image",
    "get_image_features",
    "pixel_values",
    {"pixel_values": "pixel_values"},
    ("pixel_values",),
)
# Qwen2-VL keeps image_grid_thw in the decode call: M-RoPE positions need it.
_QWEN_IMAGE = FeatureSpec(
    "image",
    "get_image_features",
    "pixel_values",
    {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
    ("pixel_values",),
)
_QWEN_VIDEO = FeatureSpec(
    "video",
    "get_video_features",
    "pixel_values_videos",
    {"pixel_values_videos": "pixel_values_videos", "video_grid_thw": "video_grid_thw"},
    ("pixel_values_videos",),
)
_AUDIO = FeatureSpec(
    "audio",
    "_audio_features",
    "input_features",
    {"input_features": "input_features", "feature_attention_mask": "feature_attention_mask"},
    ("input_features", "feature_attention_mask"),
)

_LLAVA_LM = ("model.language_model", "lm_head")

REGISTRY: dict[str, MLLMSpec] = {}


def register_mllm(spec: MLLMSpec, *, overwrite: bool = False) -> MLLMSpec:
    """Add (or replace) the component map of an MLLM class.

    Args:
        spec: The class's parts and adapter kind.
        overwrite: Replace an existing entry of the same name.

    Returns:
        The spec.

    Raises:
        ValueError: The class is registered already and ``overwrite`` is False.
    """
    if spec.name in REGISTRY and not overwrite:
        raise ValueError(f"{spec.name} is registered already; pass overwrite=True")
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    MLLMSpec(
        "LlavaForConditionalGeneration",
        ("model.vision_tower",),
        ("model.multi_modal_projector",),
        _LLAVA_LM,
        features=(_IMAGE,),
    ),
    MLLMSpec(
        "LlavaNextForConditionalGeneration",
        ("model.vision_tower",),
        # image_newline is appended to every image row inside get_image_features.
        ("model.multi_modal_projector", "model.image_newline"),
        _LLAVA_LM,
        features=(_IMAGE_NEXT,),
    ),
    MLLMSpec(
        "Qwen2VLForConditionalGeneration",
        ("re:model\\.visual\\.(?!merger\\.)",),
        ("model.visual.merger",),
        _LLAVA_LM,
        features=(_QWEN_IMAGE, _QWEN_VIDEO),
    ),
    MLLMSpec(
        "Qwen2_5_VLForConditionalGeneration",
        ("re:model\\.visual\\.(?!merger\\.)",),
        ("model.visual.merger",),
        _LLAVA_LM,
        features=(_QWEN_IMAGE, _QWEN_VIDEO),
    ),
    MLLMSpec(
        "Blip2ForConditionalGeneration",
        ("vision_model",),
        ("query_tokens", "qformer", "language_projection"),
        ("language_model",),
        features=(_IMAGE_ONLY,),
        output_class="BaseModelOutputWithVisionQformerOutputs",
    ),
    MLLMSpec(
        "InternVLForConditionalGeneration",
        ("model.vision_tower",),
        ("model.multi_modal_projector",),
        _LLAVA_LM,
        features=(_IMAGE_ONLY,),
    ),
    MLLMSpec(
        "Qwen2AudioForConditionalGeneration",
        ("model.audio_tower",),
        ("model.multi_modal_projector",),
        _LLAVA_LM,
        adapter="qwen2_audio",
        features=(_AUDIO,),
    ),
):
    register_mllm(_spec)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare ``transformers`` model under peft / DDP / torch.compile wrappers.

    LoRA layers injected by peft stay in the returned model (they live in its modules).
    """
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine"):
            model = model.module
        else:
            break
    return model


def spec_for(model: nn.Module | str) -> MLLMSpec | None:
    """The registry entry of a model (or class name), looking through peft wrapping."""
    name = model if isinstance(model, str) else type(unwrap_model(model)).__name__
    return REGISTRY.get(name)


def _tolerant(pattern: str) -> str:
    """A pattern that also matches under the ``base_model.model.`` prefix peft adds."""
    if pattern.startswith("re:"):
        body = pattern[3:]
        body = body[1:] if body.startswith("^") else body
        return f"re:^(?:{re.escape(PEFT_PREFIX)})?(?:{body})"
    prefix = re.escape(pattern.rstrip("."))
    return f"re:^(?:{re.escape(PEFT_PREFIX)})?{prefix}(?:\\.|$)"


def part_patterns(model: nn.Module | str) -> dict[str, list[str]]:
    """Part (encoder / projector / llm) -> peft-tolerant ``re:`` patterns of a registered class.

    Raises:
        UnknownArchitectureError: The class is not registered.
    """
    spec = spec_for(model)
    if spec is None:
        raise _unknown(model)
    return {part: [_tolerant(p) for p in prefixes] for part, prefixes in spec.parts().items()}


def component_patterns(
    model: nn.Module | str,
    projector_side: str = "encoder",
    components: Mapping[str, str | Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Component name -> patterns for :meth:`Components.from_model`.

    Args:
        model: The model (peft-wrapped or not) or its class name.
        projector_side: ``encoder``, ``llm`` or ``own`` (a third ``projector`` component).
        components: User declaration overriding the registry: component -> prefixes or
            ``re:`` regexes (plain prefixes are made peft-tolerant, regexes are kept).
            Required for unregistered classes.

    Returns:
        Ordered mapping component -> patterns.

    Raises:
        ValueError: Unknown ``projector_side``.
        UnknownArchitectureError: The class is not registered and ``components`` is None.
    """
    if projector_side not in PROJECTOR_SIDES:
        raise ValueError(f"projector_side must be one of {PROJECTOR_SIDES}, got {projector_side!r}")
    if components is not None:
        return {
            name: [p if p.startswith("re:") else _tolerant(p) for p in _as_list(pats)]
            for name, pats in components.items()
        }
    parts = part_patterns(model)
    if projector_side == "encoder":
        return {"encoder": parts["encoder"] + parts["projector"], "llm": parts["llm"]}
    if projector_side == "llm":
        return {"encoder": parts["encoder"], "llm": parts["projector"] + parts["llm"]}
    return {"encoder": parts["encoder"], "projector": parts["projector"], "llm": parts["llm"]}


def build_components(
    model: nn.Module,
    projector_side: str = "encoder",
    lrs: Mapping[str, float] | float | None = None,
    components: Mapping[str, str | Sequence[str]] | None = None,
    weight_decay: Mapping[str, float] | None = None,
) -> Components:
    """Split a (possibly peft-wrapped) HF MLLM's trainable parameters into components.

    Args:
        model: The model the Trainer will train (``PeftModel`` or bare).
        projector_side: See :func:`component_patterns`.
        lrs: Base learning rate per component, or one for all. A component left out (all
            of them when None) takes ``TrainingArguments.learning_rate`` when the Trainer
            builds the optimizer (until then its rate is NaN, shown as ``unset``).
        components: Optional user declaration (see :func:`component_patterns`).
        weight_decay: Optional weight decay per component (default:
            ``TrainingArguments.weight_decay``; biases and norm weights never decay).

    Returns:
        The components; frozen parts appear as components without trainable tensors.

    Raises:
        ComponentError: ``lrs`` or ``weight_decay`` names a component that does not exist.
    """
    patterns = component_patterns(model, projector_side, components)
    for what, given in (("lrs", lrs), ("weight_decay", weight_decay)):
        unknown = sorted(set(given) - set(patterns)) if isinstance(given, Mapping) else []
        if unknown:
            raise ComponentError(
                f"{what} names unknown component(s) {unknown}; components: {list(patterns)}"
            )
    if not isinstance(lrs, (int, float)):
        lrs = {name: (lrs or {}).get(name, math.nan) for name in patterns}
    return Components.from_model(model, patterns, lrs=lrs, weight_decay=weight_decay)


def _as_list(pats: str | Sequence[str]) -> list[str]:
    return [pats] if isinstance(pats, str) else list(pats)


def _unknown(model: nn.Module | str) -> UnknownArchitectureError:
    if isinstance(model, str):
        name, tops = model, []
    else:
        bare = unwrap_model(model)
        name = type(bare).__name__
        tops = sorted({n.split(".")[0] for n, _ in bare.named_parameters()})
        # Nested HF layouts keep the parts one level down (model.vision_tower, ...).
        if tops == ["lm_head", "model"] or tops == ["model"]:
            tops = sorted({".".join(n.split(".")[:2]) for n, _ in bare.named_parameters()})
    return UnknownArchitectureError(
        f"no component map for {name} (registered: {', '.join(sorted(REGISTRY))}). Declare the "
        f"components yourself, e.g. build_components(model, components={{'encoder': "
        f"['model.vision_tower', 'model.multi_modal_projector'], 'llm': "
        f"['model.language_model', 'lm_head']}}), or register the class with "
        f"commit_mllm.hf.register_mllm(MLLMSpec('{name}', encoder=(...), projector=(...), "
        f"llm=(...), adapter=None)). Top-level parameter prefixes of this model: {tops}"
    )
