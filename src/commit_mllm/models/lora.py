"""LoRA (via peft), freezing and component splitting for assembled MLLMs.

LoRA is applied *inside* each part with :func:`peft.get_peft_model`, and the returned
``PeftModel`` replaces the part's Hugging Face model in place. Parameter names therefore
keep their part's prefix, e.g. ``llm.base_model.model.model.layers.0.self_attn.q_proj.
lora_A.default.weight``, so splitting trainable parameters into components by name prefix
(:func:`component_prefixes`) keeps working with and without LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

__all__ = [
    "LoRASettings",
    "apply_lora",
    "component_parameters",
    "component_prefixes",
    "freeze_module",
    "unwrap_peft",
]


@dataclass
class LoRASettings:
    """LoRA hyper-parameters for one part (LLM or encoder).

    Attributes:
        r: Rank of the low-rank update.
        alpha: LoRA scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: Dropout on the LoRA branch input.
        target_modules: Module name suffixes to adapt (e.g. ``["q_proj", "v_proj"]``) or
            ``"all-linear"`` (every linear layer except the output head).
        modules_to_save: Extra modules trained in full next to LoRA (e.g.
            ``["embed_tokens", "lm_head"]`` when new tokens were added to the vocabulary).
        bias: peft bias mode (``"none"``, ``"all"``, ``"lora_only"``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    bias: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_any(cls, value: LoRASettings | dict[str, Any] | None) -> LoRASettings | None:
        """Builds settings from an instance, a dict or ``None`` (no LoRA)."""
        if value is None or isinstance(value, LoRASettings):
            return value
        return cls(**value)


def unwrap_peft(module: nn.Module) -> nn.Module:
    """Returns the underlying model of a ``PeftModel`` (LoRA layers stay injected).

    Args:
        module: A module, possibly a ``peft.PeftModel``.

    Returns:
        The wrapped base model if ``module`` is a ``PeftModel``, else ``module`` itself.
    """
    get_base = getattr(module, "get_base_model", None)
    if callable(get_base) and hasattr(module, "peft_config"):
        return get_base()
    return module


def apply_lora(module: nn.Module, settings: LoRASettings) -> nn.Module:
    """Wraps a Hugging Face model with LoRA adapters; only adapter (and saved) params train.

    Args:
        module: A ``transformers`` model (LLM or encoder).
        settings: LoRA hyper-parameters.

    Returns:
        The ``peft.PeftModel``; assign it back to the attribute that held ``module`` so the
        parameter names stay under the same prefix.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save,
        bias=settings.bias,
    )
    return get_peft_model(module, config)


def freeze_module(module: nn.Module) -> None:
    """Sets ``requires_grad=False`` on every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad_(False)


def component_prefixes(model: nn.Module, projector_side: str = "encoder") -> dict[str, list[str]]:
    """Maps component names to the parameter-name prefixes they own.

    One modality: ``{"encoder": [...], "llm": ["llm."]}``; with ``projector_side="own"``
    a third component ``"projector"``. Vision and audio together: ``{"vision": [...],
    "audio": [...], "llm": [...]}`` (plus ``"projector"`` when ``"own"``).

    Args:
        model: A :class:`~commit_mllm.models.MultimodalLM` (anything with optional
            ``vision_encoder``/``audio_encoder`` attributes and an ``llm`` attribute).
        projector_side: ``"encoder"`` (projector with its encoder), ``"llm"`` (with the
            LLM) or ``"own"`` (separate ``"projector"`` component).

    Returns:
        Ordered dict ``component -> list of prefixes`` (each ending with ``"."``).

    Raises:
        ValueError: If ``projector_side`` is unknown or the model has no modality.
    """
    if projector_side not in ("encoder", "llm", "own"):
        raise ValueError(f"projector_side must be encoder|llm|own, got {projector_side!r}")
    modalities = [
        m for m in ("vision", "audio") if getattr(model, f"{m}_encoder", None) is not None
    ]
    if not modalities:
        raise ValueError("model has no vision_encoder or audio_encoder")
    out: dict[str, list[str]] = {}
    own: list[str] = []
    llm = ["llm."]
    for m in modalities:
        name = "encoder" if len(modalities) == 1 else m
        prefixes = [f"{m}_encoder."]
        proj = f"{m}_projector."
        if projector_side == "encoder":
            prefixes.append(proj)
        elif projector_side == "llm":
            llm.append(proj)
        else:
            own.append(proj)
        out[name] = prefixes
    out["llm"] = llm
    if own:
        out["projector"] = own
    return out


def component_parameters(
    model: nn.Module, projector_side: str = "encoder", trainable_only: bool = True
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Splits the model's parameters into components by name prefix.

    Args:
        model: The assembled model.
        projector_side: See :func:`component_prefixes`.
        trainable_only: Only parameters with ``requires_grad=True``.

    Returns:
        ``component -> [(name, parameter), ...]`` (components may be empty when frozen).

    Raises:
        ValueError: If a (trainable) parameter matches no component prefix.
    """
    prefixes = component_prefixes(model, projector_side)
    out: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in prefixes}
    for name, param in _named(model, trainable_only):
        owner = next((c for c, ps in prefixes.items() if name.startswith(tuple(ps))), None)
        if owner is None:
            raise ValueError(f"parameter {name!r} belongs to no component {prefixes}")
        out[owner].append((name, param))
    return out


def _named(model: nn.Module, trainable_only: bool) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        if param.requires_grad or not trainable_only:
            yield name, param
