"""LoRA through peft on a registered HF MLLM, per part, and freezing.

Each part (``encoder``, ``projector``, ``llm``; see :mod:`.registry`) gets a training mode:
``"full"`` (all its weights train), ``"freeze"`` (none) or a dict of LoRA settings
(``r``, ``alpha``, ``dropout``, ``target_modules``: module-name suffixes such as
``["q_proj", "v_proj"]``). One ``peft.LoraConfig`` is built whose ``target_modules`` regex
only matches the chosen suffixes *inside the LoRA parts*, with per-part rank / alpha through
``rank_pattern`` / ``alpha_pattern``; parts in ``"full"`` mode are re-enabled after peft
froze the base model (their parameter names do not change).

Example:
    >>> model = configure_training(model, encoder="freeze", projector="full",
    ...                            llm={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    >>> components = build_components(model, "encoder", lrs={"encoder": 1e-4, "llm": 2e-4})
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .registry import PARTS, UnknownArchitectureError, spec_for, unwrap_model

__all__ = ["configure_training", "part_module_regex"]

PartMode = str | Mapping[str, Any]


def part_module_regex(prefixes: Sequence[str]) -> str:
    """A regex over *module* names of the bare model that lie inside ``prefixes``."""
    bodies = []
    for p in prefixes:
        if p.startswith("re:"):
            body = p[3:]
            bodies.append(body[1:] if body.startswith("^") else body)
        else:
            bodies.append(re.escape(p.rstrip(".")) + r"(?=\.|$)")
    return "(?:" + "|".join(f"(?:{b})" for b in bodies) + ")"


def configure_training(
    model: nn.Module,
    *,
    encoder: PartMode = "freeze",
    projector: PartMode = "full",
    llm: PartMode = "full",
    parts: Mapping[str, Sequence[str]] | None = None,
) -> nn.Module:
    """Set what trains in each part; wrap with peft when any part uses LoRA.

    Args:
        model: A bare registered HF MLLM (or any model with ``parts`` given).
        encoder: Mode of the modality encoder.
        projector: Mode of the projector / connector.
        llm: Mode of the language model (and its head).
        parts: Part -> module prefixes, for unregistered classes.

    Returns:
        The model to train: a ``peft.PeftModel`` when a part uses LoRA, else ``model``.

    Raises:
        UnknownArchitectureError: Unregistered class and no ``parts``.
        ValueError: An unknown mode, or a LoRA part whose target modules match nothing.
    """
    modes = {"encoder": encoder, "projector": projector, "llm": llm}
    prefixes = _part_prefixes(model, parts)
    for name, mode in modes.items():
        if not isinstance(mode, Mapping) and mode not in ("full", "freeze"):
            raise ValueError(f"{name} mode must be 'full', 'freeze' or LoRA settings, got {mode!r}")
    lora_parts = {n: m for n, m in modes.items() if isinstance(m, Mapping)}
    if lora_parts:
        model = _wrap_lora(model, lora_parts, prefixes)
    bare = unwrap_model(model)
    for name, mode in modes.items():
        if isinstance(mode, Mapping):
            continue
        regex = re.compile(part_module_regex(prefixes[name]))
        for pname, param in bare.named_parameters():
            # LoRA tensors of another part never match: they sit under that part's prefix.
            if regex.match(pname) and "lora_" not in pname:
                param.requires_grad_(mode == "full")
    return model


def _part_prefixes(model: nn.Module, parts: Mapping[str, Sequence[str]] | None):
    if parts is not None:
        return {p: list(parts.get(p, ())) for p in PARTS}
    spec = spec_for(model)
    if spec is None:
        raise UnknownArchitectureError(
            f"no part map for {type(unwrap_model(model)).__name__}: pass parts={{'encoder': "
            "[...], 'projector': [...], 'llm': [...]}}"
        )
    return {p: list(v) for p, v in spec.parts().items()}


def _wrap_lora(
    model: nn.Module, lora_parts: Mapping[str, Mapping[str, Any]], prefixes: Mapping
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets, ranks, alphas = [], {}, {}
    first = next(iter(lora_parts.values()))
    for name, cfg in lora_parts.items():
        suffixes = cfg.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
        suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
        pattern = (
            part_module_regex(prefixes[name])
            + r"(?:\..*)?\.(?:"
            + "|".join(re.escape(s) for s in suffixes)
            + ")"
        )
        if not any(re.fullmatch(pattern, n) for n, _ in unwrap_model(model).named_modules()):
            raise ValueError(f"LoRA on {name}: no module matches target_modules {suffixes}")
        targets.append(pattern)
        ranks[pattern] = int(cfg.get("r", 8))
        alphas[pattern] = float(cfg.get("alpha", 16))
    config = LoraConfig(
        r=int(first.get("r", 8)),
        lora_alpha=float(first.get("alpha", 16)),
        lora_dropout=float(first.get("dropout", 0.0)),
        target_modules="|".join(f"(?:{t})" for t in targets),
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )
    return get_peft_model(model, config)
