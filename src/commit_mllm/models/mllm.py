"""``MultimodalLM``: encoder(s) + projector(s) + a causal LM, spliced at placeholder tokens.

Batch format (from the collator):

* ``input_ids`` [B, L] long, right-padded; exactly one placeholder token per sample and
  modality (``image_token_id`` / ``audio_token_id``).
* ``attention_mask`` [B, L]; ``labels`` [B, L] (-100 except answer tokens; causal
  convention: ``labels[:, 1:]`` are predicted from positions ``[:, :-1]``).
* vision: ``pixel_values`` [B, 3, H, W]; audio: ``input_features`` [B, n_mels, T] and
  ``feature_attention_mask`` [B, T]. Other (non-tensor) keys are ignored.

Logits are computed **only at supervised positions**: the LLM's decoder stack runs to
hidden states, the states that predict a supervised token are gathered, and only those go
through the LM head. ``logits`` [T, V] follow, row-major, the order of
``labels[:, 1:][labels[:, 1:] != -100]`` of the original labels.

The model also implements the cached-encoder adapter protocol of the balance meter:
:meth:`MultimodalLM.encode`, :meth:`MultimodalLM.decode`,
:meth:`MultimodalLM.encoder_parameters`, :meth:`MultimodalLM.supervised_logits`,
:meth:`MultimodalLM.select_rows`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from commit_mllm.models.encoders import AudioEncoder, VisionEncoder, _dtype, build_hf_config
from commit_mllm.models.feature_cache import FeatureCache, check_cacheable
from commit_mllm.models.lora import apply_lora, freeze_module, unwrap_peft
from commit_mllm.models.projectors import build_projector

from .mllm_config import (
    MODALITIES,
    LLMConfig,
    MLLMConfig,
    PartConfig,
)

__all__ = ["MLLMOutput", "MultimodalLM"]


CONFIG_NAME = "mllm_config.json"


WEIGHTS_NAME = "model.safetensors"


@dataclass
class MLLMOutput:
    """Output of :meth:`MultimodalLM.forward`.

    Attributes:
        loss: Scalar mean cross-entropy over supervised tokens (float32).
        logits: [T, V] logits at supervised positions (row-major label order).
        targets: [T] target token ids.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


def _build_llm(cfg: LLMConfig) -> nn.Module:
    """Builds the causal LM from a hub id / folder or a config dict; resizes the vocab."""
    from transformers import AutoModelForCausalLM

    if (cfg.name_or_path is None) == (cfg.config is None):
        raise ValueError("LLMConfig: give exactly one of name_or_path or config")
    kwargs: dict[str, Any] = {}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.name_or_path is not None:
        llm = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, dtype=_dtype(cfg.dtype), **kwargs
        )
    else:
        llm = AutoModelForCausalLM.from_config(build_hf_config(cfg.config), **kwargs)
        if cfg.dtype is not None:
            llm.to(_dtype(cfg.dtype))
    if cfg.vocab_size is not None and cfg.vocab_size != llm.get_input_embeddings().num_embeddings:
        # mean_resizing=False: plain init of the new rows, deterministic and cheap.
        llm.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
    return llm


def _setup_part(module: nn.Module, attr: str, cfg: PartConfig) -> None:
    """Freezes and/or wraps ``module.<attr>`` with LoRA according to ``cfg``."""
    inner = getattr(module, attr)
    if cfg.freeze:
        freeze_module(inner)
    if cfg.lora is not None:
        setattr(module, attr, apply_lora(inner, cfg.lora))


class MultimodalLM(nn.Module):
    """Multimodal LM: ``vision_encoder``/``audio_encoder`` + projectors + ``llm``.

    Submodule names are stable prefixes (``vision_encoder.``, ``vision_projector.``,
    ``audio_encoder.``, ``audio_projector.``, ``llm.``) so parameters can be split into
    components by name (see :func:`~commit_mllm.models.lora.component_prefixes`).

    Args:
        config: The model configuration.
    """

    def __init__(self, config: MLLMConfig) -> None:
        super().__init__()
        self.config = config
        self.llm = _build_llm(config.llm)
        d_llm = self.llm.get_input_embeddings().embedding_dim
        self.vision_encoder: VisionEncoder | None = None
        self.audio_encoder: AudioEncoder | None = None
        if config.vision is not None:
            if config.image_token_id is None:
                raise ValueError("a vision encoder needs image_token_id")
            v = config.vision
            self.vision_encoder = VisionEncoder(
                v.name_or_path, v.config, v.feature_layer, v.drop_cls, v.prune_layers, v.dtype
            )
            self.vision_projector = build_projector(
                config.vision_projector, self.vision_encoder.hidden_size, d_llm
            )
        if config.audio is not None:
            if config.audio_token_id is None:
                raise ValueError("an audio encoder needs audio_token_id")
            a = config.audio
            self.audio_encoder = AudioEncoder(
                a.name_or_path, a.config, a.max_source_positions, a.mask_padding, a.dtype
            )
            self.audio_projector = build_projector(
                config.audio_projector, self.audio_encoder.hidden_size, d_llm
            )
        if self.vision_encoder is None and self.audio_encoder is None:
            raise ValueError("MLLMConfig needs a vision or an audio encoder")
        self._configure_trainable()
        self.feature_cache: FeatureCache | None = None
        """Frozen-tower outputs reused by :meth:`encode` (see :meth:`enable_feature_cache`)."""

    # ------------------------------------------------------------------ construction
    def _configure_trainable(self) -> None:
        """Applies freezing and LoRA per part (after all parts are built)."""
        _setup_part(self, "llm", self.config.llm)
        for m in self.modalities:
            _setup_part(getattr(self, f"{m}_encoder"), "model", getattr(self.config, m))
            if getattr(self.config, f"{m}_projector").freeze:
                freeze_module(getattr(self, f"{m}_projector"))

    @property
    def modalities(self) -> list[str]:
        """Modalities present, in fixed order (``"vision"``, ``"audio"``)."""
        return [m for m in MODALITIES if getattr(self, f"{m}_encoder", None) is not None]

    @property
    def hf_llm(self) -> nn.Module:
        """The ``transformers`` causal LM (unwrapped from peft; LoRA layers stay in it)."""
        return unwrap_peft(self.llm)

    def _token_id(self, modality: str) -> int:
        return int(
            self.config.image_token_id if modality == "vision" else self.config.audio_token_id
        )

    # ------------------------------------------------------------------ adapter protocol
    @property
    def _projector_in_encode(self) -> bool:
        return self.config.projector_side == "encoder"

    def encode(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Runs the modality pathway only (encoders, and projectors when on encoder side).

        Args:
            batch: The collated batch (see module docstring).

        Returns:
            Dict with, per modality ``m``, ``m`` -> [B, N_m, d] features and optionally
            ``m + "_lengths"`` -> [B] valid lengths. ``d`` is the LLM width when the
            projector runs here, the encoder width otherwise.
        """
        feats: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            x, lengths = self._run_encoder(m, batch)
            if self._projector_in_encode:
                x, lengths = getattr(self, f"{m}_projector")(x, lengths)
            feats[m] = x
            if lengths is not None:
                feats[f"{m}_lengths"] = lengths
        return feats

    def enable_feature_cache(
        self, max_bytes: int | None = None, modalities: list[str] | None = None
    ) -> FeatureCache:
        """Compute each frozen tower's output once per media item and reuse it.

        From now on :meth:`encode` (training forward, lookaheads, generation) looks every
        row's tower output up by the content of its input (see
        :mod:`commit_mllm.models.feature_cache`); projectors still run on every row.

        Args:
            max_bytes: Cap on the stored outputs (None = no cap).
            modalities: The towers to cache (default: every modality of the model).

        Returns:
            The cache (also :attr:`feature_cache`).

        Raises:
            ValueError: A tower is not frozen or not deterministic in training mode; one line
                naming ``train.cache_frozen_features``.
        """
        modalities = list(modalities or self.modalities)
        for m in modalities:
            reason = check_cacheable(m, getattr(self, f"{m}_encoder"))
            if reason is not None:
                raise ValueError(reason)
        self.feature_cache = FeatureCache(modalities, max_bytes)
        return self.feature_cache

    def _run_encoder(
        self, modality: str, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = self.feature_cache
        if cache is not None and modality in cache.modalities:
            return cache.encode(modality, batch, self._run_tower)
        return self._run_tower(modality, batch)

    def _run_tower(
        self, modality: str, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if modality == "vision":
            return self.vision_encoder(batch["pixel_values"]), None
        return self.audio_encoder(batch["input_features"], batch.get("feature_attention_mask"))

    def decode(
        self, batch: Mapping[str, Any], features: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Everything after :meth:`encode`: splice, run the LLM, logits at supervised tokens.

        Args:
            batch: The collated batch (needs ``labels``).
            features: Output of :meth:`encode` for the same rows.

        Returns:
            [T, V] logits, row-major in the order of ``labels[:, 1:] != -100``.
        """
        return self._decode(batch, features)[0]

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Yields every parameter read by :meth:`encode` (frozen ones included)."""
        for m in self.modalities:
            yield from getattr(self, f"{m}_encoder").parameters()
            if self._projector_in_encode:
                yield from getattr(self, f"{m}_projector").parameters()

    def supervised_logits(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [T, V] and targets [T] at supervised positions (= decode(encode(batch)))."""
        return self._decode(batch, self.encode(batch))

    def select_rows(
        self, batch: Mapping[str, Any], features: Any, n_rows: int
    ) -> tuple[dict[str, Any], Any]:
        """First ``n_rows`` rows of a batch and of its cached features.

        Args:
            batch: The collated batch; tensors and lists with a batch dimension are sliced,
                other values are kept.
            features: Output of :meth:`encode` (tensor, dict, list/tuple or ``None``).
            n_rows: Number of leading rows to keep.

        Returns:
            The sliced batch (a new dict) and the sliced features.
        """
        bsz = batch["input_ids"].shape[0]
        return {k: _take_rows(v, n_rows, bsz) for k, v in batch.items()}, _take_rows(
            features, n_rows, bsz
        )

    # ------------------------------------------------------------------ forward
    def forward(self, **batch: Any) -> MLLMOutput:
        """Training forward.

        Args:
            **batch: The collated batch (see module docstring); non-tensor keys ignored.

        Returns:
            :class:`MLLMOutput` with ``loss`` (mean CE over supervised tokens, float32),
            ``logits`` [T, V] and ``targets`` [T].
        """
        logits, targets = self.supervised_logits(batch)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        return MLLMOutput(loss=loss, logits=logits, targets=targets)

    def _project(
        self, features: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per modality (tokens [B, N, d_llm], lengths [B] or None), projecting if needed."""
        out = {}
        for m in self.modalities:
            x, lengths = features[m], features.get(f"{m}_lengths")
            if not self._projector_in_encode:
                x, lengths = getattr(self, f"{m}_projector")(x, lengths)
            out[m] = (x, lengths)
        return out

    def _decode(
        self, batch: Mapping[str, Any], features: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Splices, runs the decoder stack, applies the LM head at supervised positions."""
        labels = batch["labels"]
        embeds, mask, new_pos = self.splice(
            batch["input_ids"], batch["attention_mask"], self._project(features)
        )
        hidden = self._decoder_stack()(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False
        ).last_hidden_state
        shifted = labels[:, 1:]
        sel = shifted != self.config.ignore_index
        rows, cols = sel.nonzero(as_tuple=True)  # row-major, like boolean indexing
        logits = self._lm_head(hidden[rows, new_pos[:, :-1][rows, cols]])
        return logits, shifted[sel]

    def _decoder_stack(self) -> nn.Module:
        hf = self.hf_llm
        return hf.base_model if hf.base_model is not hf else hf.get_decoder()

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on gathered states [T, H] -> [T, V] (with Gemma-style soft-capping)."""
        logits = self.hf_llm.get_output_embeddings()(hidden)
        cap = getattr(self.hf_llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ splicing
    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokens: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replaces each placeholder by its row's feature tokens and re-pads on the right.

        Args:
            input_ids: [B, L] token ids with one placeholder per row and modality.
            attention_mask: [B, L].
            tokens: modality -> (features [B, N_m, d_llm], valid lengths [B] or ``None``).

        Returns:
            ``inputs_embeds`` [B, L'] x d_llm, ``attention_mask`` [B, L'] and ``new_pos``
            [B, L] long: the spliced index of each original position (for a placeholder,
            the index of its *last* feature token, i.e. the state that predicts the next
            original token).
        """
        bsz, seq = input_ids.shape
        emb_layer = self.hf_llm.get_input_embeddings()
        ids = input_ids.clone()
        # Extra tokens each position adds beyond itself (n_m - 1 at the placeholder).
        extra = torch.zeros_like(input_ids)
        placed = {}
        for m, (x, lengths) in tokens.items():
            is_ph = input_ids == self._token_id(m)
            if not bool((is_ph.sum(1) == 1).all()):
                raise ValueError(f"each row needs exactly one {m} placeholder token")
            pos = is_ph.long().argmax(1)  # [B]
            n = lengths if lengths is not None else torch.full_like(pos, x.shape[1])
            if bool((n < 1).any()):
                raise ValueError(f"every row needs at least one {m} feature token")
            extra[torch.arange(bsz), pos] += n - 1
            ids[is_ph] = 0  # any valid id; the embedding is overwritten
            placed[m] = (x, n, pos)
        cum = extra.cumsum(1)
        start = torch.arange(seq, device=ids.device) + cum - extra  # [B, L]
        new_pos = start + extra
        total = int((seq + cum[:, -1]).max())
        text = emb_layer(ids)
        out = text.new_zeros(bsz, total, text.shape[-1])
        mask = attention_mask.new_zeros(bsz, total)
        rows = torch.arange(bsz, device=ids.device).unsqueeze(1)
        out[rows, start] = text
        mask[rows, start] = attention_mask
        for x, n, pos in placed.values():
            slots = torch.arange(x.shape[1], device=ids.device).unsqueeze(0)
            valid = slots < n.unsqueeze(1)  # [B, N_m]
            idx = start[torch.arange(bsz), pos].unsqueeze(1) + slots
            r, c = valid.nonzero(as_tuple=True)
            out[r, idx[r, c]] = x[r, c].to(out.dtype)
            mask[r, idx[r, c]] = 1
        return out, mask, new_pos

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, batch: Mapping[str, Any], max_new_tokens: int = 16, **generate_kwargs: Any
    ) -> torch.Tensor:
        """Greedy generation from prompts (any padding side) for evaluation.

        The spliced prompts are re-packed with left padding, then
        ``llm.generate(inputs_embeds=..., attention_mask=...)`` runs.

        Args:
            batch: Prompt-only batch: ``input_ids`` [B, L], ``attention_mask`` [B, L] and
                the modality inputs (``labels`` is not needed).
            max_new_tokens: Maximum number of generated tokens.
            **generate_kwargs: Passed to ``generate`` (defaults: ``do_sample=False`` and
                the LLM's pad/eos ids).

        Returns:
            [B, <= max_new_tokens] new token ids (rows that stop early are padded).
        """
        embeds, mask, _ = self.splice(
            batch["input_ids"], batch["attention_mask"], self._project(self.encode(batch))
        )
        # Stable sort on the mask moves padding to the left, keeping token order.
        order = torch.sort(mask, dim=1, stable=True).indices
        mask = mask.gather(1, order)
        embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
        hf = self.hf_llm
        gen_cfg = hf.generation_config
        pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else gen_cfg.eos_token_id
        kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": pad}
        kwargs.update(generate_kwargs)
        return hf.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs
        )

    # ------------------------------------------------------------------ persistence
    def resolved_config(self) -> MLLMConfig:
        """Config that rebuilds this architecture from configs alone (no weight download).

        Every part's ``name_or_path`` is replaced by its current ``transformers`` config
        (vocabulary resize and layer pruning already applied).
        """
        data = self.config.to_dict()
        data["llm"].update(name_or_path=None, config=self.hf_llm.config.to_dict(), vocab_size=None)
        for m in self.modalities:
            enc = getattr(self, f"{m}_encoder").hf_model
            data[m].update(name_or_path=None, config=enc.config.to_dict())
            if m == "vision":
                data[m]["prune_layers"] = False  # the stored config is already pruned
                data[m]["feature_layer"] = self.vision_encoder.feature_index
            else:
                data[m]["max_source_positions"] = None
        return MLLMConfig.from_dict(data)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Saves the resolved config (JSON) and all weights (safetensors) to ``folder``."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.resolved_config().to_dict(), indent=2))
        save_model(self, str(folder / WEIGHTS_NAME))  # handles tied (shared) tensors

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> MultimodalLM:
        """Loads a model saved by :meth:`save_pretrained` (built from configs, then weights)."""
        from safetensors.torch import load_model

        folder = Path(folder)
        config = MLLMConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        model = cls(config)
        load_model(model, str(folder / WEIGHTS_NAME), strict=True)
        return model


def _take_rows(value: Any, n_rows: int, bsz: int) -> Any:
    """Slices the leading batch dimension of tensors / lists / dicts; keeps other values."""
    if isinstance(value, torch.Tensor):
        return value[:n_rows] if value.dim() > 0 and value.shape[0] == bsz else value
    if isinstance(value, Mapping):
        return {k: _take_rows(v, n_rows, bsz) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == bsz:
        return type(value)(value[:n_rows])
    return value
