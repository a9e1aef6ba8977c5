"""Feature encoders: vision (CLIP / SigLIP / ViT / DINOv2), audio (Whisper encoder, any length).

Both wrap a ``transformers`` model stored as the attribute ``model`` (so parameter names are
``vision_encoder.model.…`` / ``audio_encoder.model.…`` inside a
:class:`~commit_mllm.models.MultimodalLM`). The wrapped model may later be replaced by a
``peft.PeftModel`` (LoRA); :attr:`hf_model` always returns the underlying HF model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from commit_mllm.models.lora import unwrap_peft

__all__ = [
    "VISION_MODEL_TYPES",
    "AudioEncoder",
    "VisionEncoder",
    "build_hf_config",
    "whisper_output_lengths",
]

# model_type of a *vision* config -> transformers model class name. Full CLIP / SigLIP
# checkpoints (model_type "clip" / "siglip") are mapped to their vision tower.
VISION_MODEL_TYPES: dict[str, str] = {
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel",
    "vit": "ViTModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
}
# Vision model types whose sequence starts with a CLS token (DINOv2 with registers adds
# ``num_register_tokens`` more after it); SigLIP has none.
_CLS_MODEL_TYPES = ("clip_vision_model", "clip", "vit", "dinov2", "dinov2_with_registers")
# Modules that feed only pooled outputs (or, DINOv2's ``layernorm``, only last_hidden_state,
# never the hidden_states the features come from) and DINOv2's ``mask_token`` (masked image
# modelling only): they never reach the selected patch features, so they are frozen (a
# trainable parameter without gradient would look like a stuck component).
_POOLING_MODULES = ("post_layernorm", "head", "pooler", "layernorm", "mask_token")


def build_hf_config(config: dict[str, Any]) -> Any:
    """Builds a ``transformers`` config from a plain dict holding ``model_type``.

    Args:
        config: e.g. ``{"model_type": "llama", "hidden_size": 32, ...}``.

    Returns:
        The ``PretrainedConfig`` instance.
    """
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type")
    return AutoConfig.for_model(model_type, **config)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    return getattr(torch, name)


class VisionEncoder(nn.Module):
    """Vision tower returning patch features from a selected hidden layer (LLaVA style).

    Args:
        name_or_path: Hub id or local folder of a CLIP / SigLIP / ViT / DINOv2 checkpoint.
            Loaded with ``from_pretrained``; a full CLIP/SigLIP checkpoint yields its vision
            tower.
        config: Alternatively, a config dict (with ``model_type``) built with random weights.
        feature_layer: Index into ``hidden_states`` (``0`` = embeddings, ``-1`` = last layer,
            ``-2`` = LLaVA's choice).
        drop_cls: Drop the leading CLS token (CLIP, ViT and DINOv2 have one, SigLIP has
            none) and DINOv2's register tokens, leaving only patch tokens (a square grid).
        prune_layers: Build only the layers up to ``feature_layer`` (saves compute; the
            dropped layers would never receive gradients).
        dtype: Parameter dtype name (``"float32"``, ``"bfloat16"``...).

    Shapes:
        ``pixel_values`` [B, 3, H, W] -> features [B, N, d_enc].
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        feature_layer: int = -2,
        drop_cls: bool = True,
        prune_layers: bool = True,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        import transformers

        if (name_or_path is None) == (config is None):
            raise ValueError("give exactly one of name_or_path or config")
        hf_config = (
            transformers.AutoConfig.from_pretrained(name_or_path)
            if name_or_path is not None
            else build_hf_config(config)
        )
        model_type = hf_config.model_type
        if model_type not in VISION_MODEL_TYPES:
            raise ValueError(f"unsupported vision model_type {model_type!r}")
        cls = getattr(transformers, VISION_MODEL_TYPES[model_type])
        if model_type in ("clip", "siglip"):
            hf_config = hf_config.vision_config
        n_layers = hf_config.num_hidden_layers
        kwargs: dict[str, Any] = {"add_pooling_layer": False} if model_type == "vit" else {}
        self.feature_index = feature_layer
        if prune_layers and feature_layer != 0:
            keep = feature_layer % (n_layers + 1)  # hidden_states has n_layers + 1 entries
            hf_config.num_hidden_layers = keep
            self.feature_index = -1 if keep > 0 else 0
        self.load_note: str | None = None
        """One line on what loading left out on purpose (pruned layers), or None."""
        if name_or_path is not None:
            self.model, self.load_note = _load_pruned(
                cls, name_or_path, hf_config, n_layers, feature_layer, dtype, kwargs
            )
        else:
            self.model = cls(hf_config, **kwargs)
            if dtype is not None:
                self.model.to(_dtype(dtype))
        self.drop_cls = drop_cls and model_type in _CLS_MODEL_TYPES
        self.n_prefix = 1 + int(getattr(hf_config, "num_register_tokens", 0) or 0)
        for name, param in self.model.named_parameters():
            if set(name.split(".")) & set(_POOLING_MODULES):
                param.requires_grad_(False)

    @property
    def hf_model(self) -> nn.Module:
        """The underlying ``transformers`` model (unwrapped from peft if needed)."""
        return unwrap_peft(self.model)

    @property
    def hidden_size(self) -> int:
        """Feature width ``d_enc``."""
        return int(self.hf_model.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encodes images.

        Args:
            pixel_values: [B, 3, H, W] images (cast to the encoder dtype).

        Returns:
            [B, N, d_enc] patch features (CLS dropped if configured).
        """
        dtype = next(self.hf_model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_index]
        return feats[:, self.n_prefix :] if self.drop_cls else feats


def _load_pruned(
    cls: type,
    name_or_path: str,
    hf_config: Any,
    n_layers: int,
    feature_layer: int,
    dtype: str | torch.dtype | None,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, str | None]:
    """``from_pretrained`` with the weights of pruned layers skipped quietly.

    transformers reports every checkpoint weight the model does not use as a warning table;
    after pruning to ``feature_layer`` the dropped layers' weights are unused by design, so
    the table would read as a failed load. It is replaced by one line; any other unused or
    missing weight is still reported.

    Returns:
        The model and the line (None when nothing was left out).
    """
    import logging
    import re

    keep = hf_config.num_hidden_layers
    report = logging.getLogger("transformers.modeling_utils")

    def no_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)  # the table is summed up below instead

    report.addFilter(no_report)
    try:
        model, info = cls.from_pretrained(
            name_or_path, config=hf_config, dtype=_dtype(dtype), output_loading_info=True, **kwargs
        )
    finally:
        report.removeFilter(no_report)
    layer = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
    unexpected = sorted(info.get("unexpected_keys") or ())
    pruned = [k for k in unexpected if (m := layer.search(k)) and int(m.group(1)) >= keep]
    other = [k for k in unexpected if k not in pruned]
    problems = [*other, *sorted(info.get("missing_keys") or ())]
    if problems:
        logging.getLogger(__name__).warning(
            "%s: %d checkpoint weight(s) unused or missing besides the pruned layers: %s",
            name_or_path,
            len(problems),
            ", ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""),
        )
    if not pruned:
        return model, None
    return model, (
        f"vision encoder: layers {keep}..{n_layers - 1} of {name_or_path} are not built "
        f"(feature_layer {feature_layer} reads layer {keep}); their {len(pruned)} weights "
        "are skipped on purpose"
    )


def whisper_output_lengths(frame_lengths: torch.Tensor) -> torch.Tensor:
    """Encoder output lengths for mel-frame lengths (Whisper's stride-2 second conv).

    Args:
        frame_lengths: [B] number of valid mel frames.

    Returns:
        [B] number of valid encoder tokens, ``(frames - 1) // 2 + 1`` (0 for 0 frames).
    """
    return torch.where(frame_lengths > 0, (frame_lengths - 1) // 2 + 1, 0)


class AudioEncoder(nn.Module):
    """Whisper encoder that runs on clips of any length (no padding to 30 s).

    transformers' ``WhisperEncoder.forward`` insists on exactly ``2 * max_source_positions``
    mel frames. This wrapper keeps the HF module (weights, names, LoRA targets) but runs its
    sub-modules itself on the batch's own length: conv stem, then the first ``T/2`` rows of
    the positional table, then the layers with a key-padding mask. Clips longer than the
    table (30 s for pretrained Whisper) are cut into table-sized windows, encoded
    independently and concatenated, as Whisper itself processes long audio.

    Padded frames are zeroed before each convolution and masked as attention keys, so a
    clip's features do not depend on which other clips share its batch.

    Args:
        name_or_path: Hub id / local folder of a Whisper model (full ``WhisperModel`` /
            ``WhisperForConditionalGeneration`` checkpoint: the encoder is kept) or of a saved
            ``WhisperEncoder``.
        config: Alternatively, a ``WhisperConfig`` dict (``model_type: whisper``).
        max_source_positions: Optionally shrink the positional table to this many tokens
            (pretrained rows are sliced); the window length becomes twice that in frames.
        mask_padding: Mask padded tokens as attention keys (recommended).
        dtype: Parameter dtype name.

    Shapes:
        ``input_features`` [B, n_mels, T] + ``feature_attention_mask`` [B, T] ->
        features [B, ceil(T / 2), d] and lengths [B].
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        max_source_positions: int | None = None,
        mask_padding: bool = True,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, WhisperConfig, WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if (name_or_path is None) == (config is None):
            raise ValueError("give exactly one of name_or_path or config")
        if name_or_path is not None:
            hf_config = AutoConfig.from_pretrained(name_or_path)
            archs = hf_config.architectures or []
            if "WhisperEncoder" in archs:
                model = WhisperEncoder.from_pretrained(name_or_path, dtype=_dtype(dtype))
            else:  # full encoder-decoder checkpoint: keep the encoder only
                model = WhisperModel.from_pretrained(name_or_path, dtype=_dtype(dtype)).encoder
        else:
            config = dict(config)
            config.pop("model_type", None)
            model = WhisperEncoder(WhisperConfig(**config))
            if dtype is not None:
                model.to(_dtype(dtype))
        if max_source_positions is not None and max_source_positions < model.max_source_positions:
            _shrink_positions(model, max_source_positions)
        self.model = model
        self.mask_padding = mask_padding

    @property
    def hf_model(self) -> nn.Module:
        """The underlying ``WhisperEncoder`` (unwrapped from peft if needed)."""
        return unwrap_peft(self.model)

    @property
    def hidden_size(self) -> int:
        """Feature width ``d``."""
        return int(self.hf_model.config.d_model)

    @property
    def window_frames(self) -> int:
        """Longest mel-frame span encoded at once (``2 * max_source_positions``)."""
        return 2 * int(self.hf_model.embed_positions.num_embeddings)

    def forward(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes a batch of log-mel spectrograms of any (even) length.

        Args:
            input_features: [B, n_mels, T] log-mel features.
            feature_attention_mask: [B, T] 1 for valid frames (valid frames first); ``None``
                means all frames are valid.

        Returns:
            Tuple of features [B, ceil(T / 2), d] and valid token lengths [B] (long).
        """
        bsz, n_mels, n_frames = input_features.shape
        if feature_attention_mask is None:
            feature_attention_mask = input_features.new_ones(bsz, n_frames, dtype=torch.long)
        frame_mask = feature_attention_mask.to(torch.bool)
        lengths = whisper_output_lengths(frame_mask.sum(-1))
        win = self.window_frames
        if n_frames <= win:
            return self._encode(input_features, frame_mask), lengths
        # Long clips: cut into table-sized windows, encode them as separate rows, re-join.
        n_win = -(-n_frames // win)
        pad = n_win * win - n_frames
        feats = nn.functional.pad(input_features, (0, pad))
        mask = nn.functional.pad(frame_mask, (0, pad))
        feats = feats.view(bsz, n_mels, n_win, win).permute(0, 2, 1, 3).reshape(-1, n_mels, win)
        out = self._encode(feats, mask.view(bsz * n_win, win))
        out = out.view(bsz, n_win * out.shape[1], -1)
        return out[:, : (n_frames + 1) // 2], lengths

    def _encode(self, feats: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Runs the HF encoder's sub-modules on [B, n_mels, T] with T <= window_frames."""
        enc = self.hf_model
        dtype = enc.conv1.weight.dtype
        m = frame_mask.unsqueeze(1).to(dtype)  # [B, 1, T]
        x = feats.to(dtype) * m
        x = nn.functional.gelu(enc.conv1(x)) * m  # zero padding as conv2's neighbours see it
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)  # [B, N, d]
        n_tok = x.shape[1]
        x = x + enc.embed_positions.weight[:n_tok].to(dtype)
        x = nn.functional.dropout(x, p=enc.dropout, training=self.training)
        attn_mask = None
        if self.mask_padding:
            tok_valid = torch.arange(n_tok, device=x.device) < whisper_output_lengths(
                frame_mask.sum(-1)
            ).unsqueeze(-1)
            # A window with no valid frame attends to everything (its output is discarded),
            # avoiding an all -inf softmax row.
            tok_valid = tok_valid | ~tok_valid.any(-1, keepdim=True)
            attn_mask = torch.zeros(tok_valid.shape, dtype=dtype, device=x.device)
            attn_mask = attn_mask.masked_fill(~tok_valid, torch.finfo(dtype).min)[:, None, None]
        for layer in enc.layers:
            # LayerDrop as in WhisperEncoder.forward.
            if self.training and enc.layerdrop > 0 and torch.rand([]) < enc.layerdrop:
                continue
            x = layer(x, attn_mask)
        return enc.layer_norm(x)


def _shrink_positions(encoder: nn.Module, n_positions: int) -> None:
    """Keeps the first ``n_positions`` rows of a WhisperEncoder's positional table."""
    old = encoder.embed_positions
    new = nn.Embedding(
        n_positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(old.weight[:n_positions])
    new.requires_grad_(old.weight.requires_grad)
    encoder.embed_positions = new
    encoder.max_source_positions = n_positions
    encoder.config.max_source_positions = n_positions
