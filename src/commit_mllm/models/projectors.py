"""Projectors (connectors) from encoder features to LLM input embeddings.

Every projector maps ``features`` [B, N, d_in] (+ optional valid lengths [B]) to
``tokens`` [B, N_tok, d_llm] and the valid token lengths [B] (``None`` if all are valid).
Rows are right-padded: a row's valid tokens come first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "MLPProjector",
    "ProjectorConfig",
    "QFormerProjector",
    "build_projector",
    "length_mask",
]


@dataclass
class ProjectorConfig:
    """Settings of a projector.

    Attributes:
        type: ``"mlp"`` (LLaVA-1.5 Linear-GELU-Linear) or ``"qformer"`` (learned queries).
        hidden_dim: MLP hidden width / Q-Former width; ``None`` = the LLM width.
        stride: MLP only: merge this many consecutive encoder tokens into one (audio frame
            down-sampling); ``1`` keeps every token.
        pool: MLP only: how merged tokens combine, ``"concat"`` or ``"avg"``.
        patch_merge: MLP only: merge each ``patch_merge x patch_merge`` block of a square
            patch grid into one token before the MLP (vision): with ``pool: concat`` the
            block's features are stacked (pixel shuffle / space-to-depth, as nanoVLM, SmolVLM
            and InternVL do), with ``avg`` they are averaged. 8x8 patches with 2 -> 16 tokens.
            ``1`` keeps every patch.
        num_queries: Q-Former: learned queries (per window when ``window_size`` is set).
        num_layers: Q-Former: number of (self-attn, cross-attn, FFN) blocks.
        num_heads: Q-Former: attention heads.
        window_size: Q-Former: encoder tokens per window (SALMONN-style window-level
            Q-Former for long audio); ``None`` = one window over all tokens.
        dropout: Dropout inside the projector.
        freeze: Freeze the projector's parameters.
    """

    type: str = "mlp"
    hidden_dim: int | None = None
    stride: int = 1
    pool: str = "concat"
    patch_merge: int = 1
    num_queries: int = 32
    num_layers: int = 2
    num_heads: int = 4
    window_size: int | None = None
    dropout: float = 0.0
    freeze: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as a JSON-serialisable dict."""
        return asdict(self)


def length_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean validity mask from lengths.

    Args:
        lengths: [B] valid lengths.
        n: Padded length.

    Returns:
        [B, n] bool, ``True`` at positions ``< lengths``.
    """
    return torch.arange(n, device=lengths.device) < lengths.unsqueeze(-1)


class MLPProjector(nn.Module):
    """LLaVA-1.5 projector ``Linear -> GELU -> Linear`` with optional token merging.

    Args:
        in_dim: Encoder width ``d_in``.
        out_dim: LLM width ``d_llm``.
        hidden_dim: Hidden width (default ``out_dim``).
        stride: Merge ``stride`` consecutive tokens (zero-padding the last group).
        pool: ``"concat"`` (input ``stride * d_in``) or ``"avg"``.
        patch_merge: Merge ``m x m`` blocks of a square ``g x g`` patch grid (``g``
            divisible by ``m``; not with ``stride`` > 1), concatenated or averaged by
            ``pool``.

    Shapes:
        [B, N, d_in] -> [B, ceil(N / stride), d_out]; lengths -> ceil(lengths / stride).
        With ``patch_merge`` m: [B, g*g, d_in] -> [B, (g/m)^2, d_out], tokens in row-major
        grid order.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        stride: int = 1,
        pool: str = "concat",
        patch_merge: int = 1,
    ) -> None:
        super().__init__()
        if pool not in ("concat", "avg"):
            raise ValueError(f"pool must be concat|avg, got {pool!r}")
        if patch_merge < 1 or (patch_merge > 1 and stride > 1):
            raise ValueError(
                f"patch_merge must be >= 1 and not combined with stride > 1, got "
                f"patch_merge={patch_merge}, stride={stride}"
            )
        self.stride, self.pool, self.patch_merge = stride, pool, patch_merge
        hidden_dim = hidden_dim or out_dim
        group = stride * patch_merge**2
        merged = in_dim * group if pool == "concat" else in_dim
        self.fc1 = nn.Linear(merged, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projects features.

        Args:
            features: [B, N, d_in].
            lengths: Optional [B] valid lengths (padding is zeroed before merging, so a
                row's output does not depend on its padding).

        Returns:
            Tokens [B, ceil(N / stride), d_out] and lengths [B] (or ``None``).
        """
        x = features.to(self.fc1.weight.dtype)
        if lengths is not None:
            x = x * length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)
        if self.stride > 1:
            bsz, n, d = x.shape
            n_out = -(-n // self.stride)
            x = nn.functional.pad(x, (0, 0, 0, n_out * self.stride - n))
            x = x.view(bsz, n_out, self.stride, d)
            # avg divides by stride also for a partial last group: a fixed scale, simpler.
            x = x.reshape(bsz, n_out, -1) if self.pool == "concat" else x.mean(2)
            if lengths is not None:
                lengths = -(-lengths // self.stride)
        if self.patch_merge > 1:
            x = self._merge_patches(x, lengths)
        return self.fc2(self.act(self.fc1(x))), lengths

    def _merge_patches(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """[B, g*g, d] -> [B, (g/m)^2, m*m*d] (concat) or [B, (g/m)^2, d] (avg)."""
        bsz, n, d = x.shape
        m, g = self.patch_merge, math.isqrt(n)
        if lengths is not None or g * g != n or g % m:
            raise ValueError(
                f"patch_merge {m} needs a square patch grid whose side it divides and no "
                f"padding; got {n} tokens per row"
            )
        x = x.view(bsz, g // m, m, g // m, m, d).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(bsz, (g // m) ** 2, m * m, d)
        return x.reshape(bsz, (g // m) ** 2, m * m * d) if self.pool == "concat" else x.mean(2)


class _QFormerBlock(nn.Module):
    """Pre-LN block: query self-attention, cross-attention to encoder tokens, FFN."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Updates queries [B, Q, dim] attending to ``kv`` [B, N, dim]; mask True = ignore."""
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.norm_cross(q)
        q = q + self.cross_attn(h, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return q + self.ffn(self.norm_ffn(q))


class QFormerProjector(nn.Module):
    """Small Q-Former connector (BLIP-2 / SALMONN style): learned queries cross-attend.

    ``num_queries`` learned queries attend (through ``num_layers`` blocks) to the encoder
    tokens; the query outputs are projected to the LLM width. With ``window_size`` the
    encoder tokens are cut into windows of that many tokens and every window gets its own
    ``num_queries`` outputs (SALMONN's window-level Q-Former), so the output length grows
    with the clip length.

    Args:
        in_dim: Encoder width ``d_in``.
        out_dim: LLM width ``d_llm``.
        hidden_dim: Q-Former width (default ``out_dim``).
        num_queries: Learned queries (per window).
        num_layers: Number of blocks.
        num_heads: Attention heads (must divide ``hidden_dim``).
        window_size: Tokens per window, or ``None`` for a single window.
        dropout: Attention/FFN dropout.

    Shapes:
        [B, N, d_in] -> [B, Q, d_out] (no window) or [B, ceil(N / w) * Q, d_out] (windows);
        lengths -> ``None`` (no window, all valid) or ``ceil(lengths / w) * Q``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        num_queries: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        window_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim = hidden_dim or out_dim
        self.num_queries, self.window_size = num_queries, window_size
        self.input_proj = nn.Linear(in_dim, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(
            [_QFormerBlock(dim, num_heads, dropout) for _ in range(num_layers)]
        )
        self.output_norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, out_dim)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projects features with learned queries.

        Args:
            features: [B, N, d_in].
            lengths: Optional [B] valid lengths (padded tokens are masked as keys).

        Returns:
            Tokens [B, N_tok, d_out] and lengths [B] (``None`` without windows).
        """
        bsz, n, _ = features.shape
        kv = self.input_norm(self.input_proj(features.to(self.input_proj.weight.dtype)))
        valid = length_mask(lengths, n) if lengths is not None else None
        w = self.window_size or n
        n_win = -(-n // w)
        if n_win * w != n:
            kv = nn.functional.pad(kv, (0, 0, 0, n_win * w - n))
            if valid is None:
                valid = length_mask(torch.full((bsz,), n, device=kv.device), n)
            valid = nn.functional.pad(valid, (0, n_win * w - n), value=False)
        kv = kv.reshape(bsz * n_win, w, -1)
        pad_mask = None
        if valid is not None:
            pad_mask = ~valid.reshape(bsz * n_win, w)
            # Fully padded windows attend to everything (outputs discarded): no NaN softmax.
            pad_mask = pad_mask & ~pad_mask.all(-1, keepdim=True)
        q = self.queries.unsqueeze(0).expand(bsz * n_win, -1, -1)
        for block in self.blocks:
            q = block(q, kv, pad_mask)
        out = self.output_proj(self.output_norm(q)).reshape(bsz, n_win * self.num_queries, -1)
        if self.window_size is None or lengths is None:
            return out, None if self.window_size is None else lengths
        return out, -(-lengths // w) * self.num_queries


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """Builds a projector from settings.

    Args:
        config: Projector settings.
        in_dim: Encoder width.
        out_dim: LLM width.

    Returns:
        An :class:`MLPProjector` or :class:`QFormerProjector`.
    """
    if config.type == "mlp":
        return MLPProjector(
            in_dim, out_dim, config.hidden_dim, config.stride, config.pool, config.patch_merge
        )
    if config.type == "qformer":
        return QFormerProjector(
            in_dim,
            out_dim,
            config.hidden_dim,
            config.num_queries,
            config.num_layers,
            config.num_heads,
            config.window_size,
            config.dropout,
        )
    raise ValueError(f"unknown projector type {config.type!r}")
