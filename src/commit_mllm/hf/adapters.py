"""Cached-encoder adapters for native Hugging Face MLLMs (the balance meter's protocol).

METHOD.md: the LLM-only lookahead branch reuses the encoder outputs cached from the training
forward. An adapter wraps a registered ``*ForConditionalGeneration`` model (bare or
peft-wrapped) and implements :class:`~commit_mllm.method.lookahead.CachedEncoderModel`:

* ``encode(batch)`` runs encoder + projector only, through the model's own
  ``get_image_features`` / ``get_video_features`` (or the audio tower + projector for
  Qwen2-Audio), and returns ``{modality: features}`` (plain tensors, so the meter can detach
  and keep them);
* ``decode(batch, features)`` runs the rest: transformers 5.x forwards accept precomputed
  encoder outputs (``mm_encoder_outputs``) and compute the LM head only at chosen positions
  (``logits_to_keep`` as a [B, L] bool mask), so the head runs only at supervised positions;
  Qwen2-Audio has neither, so the adapter scatters the features into ``inputs_embeds`` and
  applies the head to the gathered states itself.

``decode(batch, encode(batch))`` equals the model's full forward logits at
``labels[:, 1:] != -100`` (row-major), [T, V].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .registry import MLLMSpec, _tolerant, spec_for, unwrap_model

__all__ = ["HFCachedEncoder", "make_adapter", "supervised_forward", "supervised_positions"]


def supervised_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, L] bool: positions whose logits predict a supervised next token.

    ``hidden[mask]`` is row-major, so it pairs with ``labels[:, 1:][labels[:, 1:] != -100]``.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def supervised_forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Full forward, LM head only at supervised positions: [T, V] logits.

    Used for classes without an adapter (and through DDP): passes ``logits_to_keep`` as a
    [B, L] bool mask when the forward takes it, else slices the full logits.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and v is not None}
    labels = batch["labels"]
    if _accepts_logits_to_keep(model):
        return model(**inputs, logits_to_keep=supervised_positions(labels)).logits
    logits = model(**inputs).logits
    return logits[:, :-1][labels[:, 1:] != -100]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    bare = unwrap_model(model)
    return "logits_to_keep" in inspect.signature(bare.forward).parameters


class HFCachedEncoder(nn.Module):
    """A registered HF MLLM seen through the cached-encoder protocol.

    The wrapped model is a submodule, so ``train()`` / ``eval()`` reach it; parameters are
    the model's own (identity), so components built on the model apply unchanged.

    Args:
        model: The model the Trainer trains (bare or ``PeftModel``).
        spec: Its registry entry (default: looked up by class).
    """

    def __init__(self, model: nn.Module, spec: MLLMSpec | None = None):
        super().__init__()
        spec = spec or spec_for(model)
        if spec is None or spec.adapter is None:
            raise ValueError(f"no cached-encoder adapter for {type(unwrap_model(model)).__name__}")
        self.model = model
        self.spec = spec

    @property
    def bare(self) -> nn.Module:
        """The unwrapped ``transformers`` model (LoRA layers injected)."""
        return unwrap_model(self.model)

    # ---- the protocol --------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Encoder + projector only.

        Returns:
            Modality -> features: a tuple of [N_i, d_llm] tensors per image/video (or one
            [B, Q, d_llm] tensor for BLIP-2; [N_audio_tokens, d_llm] for Qwen2-Audio).
        """
        out: dict[str, Any] = {}
        for feat in self.spec.features:
            if batch.get(feat.trigger) is None:
                continue
            kwargs = {kw: batch[k] for k, kw in feat.inputs.items() if batch.get(k) is not None}
            if self.spec.adapter == "qwen2_audio":
                out[feat.key] = self._audio_features(**kwargs)
                continue
            res = getattr(self.bare, feat.method)(**kwargs, return_dict=True)
            pooled = res.pooler_output
            out[feat.key] = tuple(pooled) if isinstance(pooled, (list, tuple)) else pooled
        return out

    def decode(self, batch: Mapping[str, Any], features: Mapping[str, Any]) -> torch.Tensor:
        """LM on cached features; returns [T, V] logits at supervised positions."""
        consumed = {k for f in self.spec.features for k in f.consumed}
        inputs = {
            k: v for k, v in batch.items() if k not in consumed and k != "labels" and v is not None
        }
        keep = supervised_positions(batch["labels"])
        if self.spec.adapter == "qwen2_audio":
            return self._audio_decode(inputs, features.get("audio"), keep)
        cached = {key: self._wrap(val) for key, val in features.items()}
        if "pixel_values" in consumed:
            inputs["pixel_values"] = None  # BLIP-2 takes it positionally (required)
        # The forward ignores mm_encoder_outputs keys it does not know; pass only present ones.
        return self.bare(**inputs, mm_encoder_outputs=cached or None, logits_to_keep=keep).logits

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter ``encode`` reads: encoder and projector (frozen ones included)."""
        import re

        pats = [_tolerant(p)[3:] for p in (*self.spec.encoder, *self.spec.projector)]
        regex = re.compile("|".join(f"(?:{p})" for p in pats))
        for name, param in self.bare.named_parameters():
            if regex.search(name):
                yield param

    def forward(self, **batch: Any) -> Any:
        """The wrapped model's own forward (unchanged)."""
        return self.model(**batch)

    # ---- helpers -------------------------------------------------------------------------
    def _wrap(self, pooled: Any) -> Any:
        from transformers import modeling_outputs

        if self.spec.output_class == "BaseModelOutputWithVisionQformerOutputs":
            from transformers.models.blip_2.modeling_blip_2 import (
                BaseModelOutputWithVisionQformerOutputs,
            )

            return BaseModelOutputWithVisionQformerOutputs(
                pooler_output=pooled, qformer_outputs=None, vision_outputs=None
            )
        cls = getattr(modeling_outputs, self.spec.output_class)
        return cls(pooler_output=pooled)

    def _audio_features(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Qwen2-Audio: audio tower + projector, valid frames only: [N_audio_tokens, d_llm]."""
        from transformers.masking_utils import create_bidirectional_mask

        inner = self.bare.model
        tower = inner.audio_tower
        feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(
            feature_attention_mask.sum(-1)
        )
        batch, _, frames = input_features.shape
        max_len = (frames - 2) // 2 + 1
        seq = torch.arange(max_len, device=feat_lengths.device).expand(batch, max_len)
        mask_2d = (seq < feat_lengths[:, None]).long()
        dummy = torch.zeros(batch, max_len, 1, dtype=input_features.dtype)
        attn = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=dummy.to(input_features.device),
            attention_mask=mask_2d,
        )
        hidden = tower(input_features, attention_mask=attn).last_hidden_state
        feats = inner.multi_modal_projector(hidden)
        valid = torch.arange(feats.shape[1], device=feats.device)[None] < out_lengths[:, None]
        return feats[valid]

    def _audio_decode(
        self, inputs: dict[str, Any], feats: torch.Tensor | None, keep: torch.Tensor
    ) -> torch.Tensor:
        """Qwen2-Audio: scatter features at the (expanded) audio tokens, run LM, gather, head."""
        bare = self.bare
        ids = inputs.pop("input_ids")
        embeds = bare.get_input_embeddings()(ids)
        if feats is not None:
            is_audio = ids == bare.config.audio_token_id
            if int(is_audio.sum()) != feats.shape[0]:
                raise ValueError(
                    f"Qwen2-Audio adapter: {int(is_audio.sum())} audio tokens for {feats.shape[0]} "
                    "audio features; expand each audio placeholder to its feature count in the "
                    "processor (the legacy single-token path is not supported by the adapter)"
                )
            embeds = embeds.masked_scatter(is_audio[..., None], feats.to(embeds.dtype))
        hidden = bare.model.language_model(inputs_embeds=embeds, **inputs).last_hidden_state
        return bare.lm_head(hidden[keep])


def make_adapter(model: nn.Module) -> HFCachedEncoder | None:
    """The cached-encoder adapter of a registered class, or None (full-forward fallback)."""
    spec = spec_for(model)
    if spec is None or spec.adapter is None:
        return None
    return HFCachedEncoder(model, spec)
