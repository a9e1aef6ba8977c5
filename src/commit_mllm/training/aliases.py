"""Config-key aliases that users of big MLLM frameworks type, mapped to canonical keys.

LLaVA / LLaMA-Factory / ms-swift / axolotl name the same settings differently
(``mm_projector_lr``, ``aligner_lr``, ``freeze_vision_tower`` ...). :func:`resolve_aliases`
rewrites them to the canonical ``encoder_lr`` / ``projector_lr`` / ``llm_lr`` /
``freeze_encoder`` / ``freeze_projector`` / ``freeze_llm``. Pure: returns a new dict.

Example:
    >>> resolve_aliases({"vit_lr": 2e-5, "freeze_language_model": False}, "train")
    {'encoder_lr': 2e-05, 'freeze_llm': False}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ALIASES", "resolve_aliases"]

ALIASES: dict[str, str] = {
    "vit_lr": "encoder_lr",
    "mm_vision_tower_lr": "encoder_lr",
    "aligner_lr": "projector_lr",
    "mm_projector_lr": "projector_lr",
    "freeze_vit": "freeze_encoder",
    "freeze_vision_tower": "freeze_encoder",
    "freeze_aligner": "freeze_projector",
    "freeze_multi_modal_projector": "freeze_projector",
    "freeze_language_model": "freeze_llm",
}
"""Alias -> canonical key."""


def resolve_aliases(mapping: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Rewrite alias keys to their canonical names.

    Args:
        mapping: A config section (e.g. the ``train:`` section of a run config).
        where: Where the section comes from, for error messages (e.g. ``"train"``).

    Returns:
        A new dict in the input's order, aliases replaced by canonical keys (an alias
        that duplicates its canonical key with the same value is dropped).

    Raises:
        ValueError: Two keys for one canonical setting with different values (an alias
            and the canonical key, or two aliases); the message names both keys.
    """
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in mapping.items():
        canonical = ALIASES.get(key, key)
        if canonical in out:
            if out[canonical] != value:
                raise ValueError(
                    f"{where}: '{source[canonical]}' = {out[canonical]!r} and '{key}' = "
                    f"{value!r} set the same setting '{canonical}' to different values; "
                    f"keep one of them"
                )
            continue
        out[canonical] = value
        source[canonical] = key
    return out
