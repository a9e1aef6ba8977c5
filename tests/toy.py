"""Small torch-only multimodal models for the core tests (no transformers)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 23


class ToyMLLM(nn.Module):
    """Encoder(s) + projector(s) + a tiny LM; implements the cached-encoder protocol.

    Batch: ``input_ids`` [B, L], ``labels`` [B, L], ``pixels`` [B, 12] (and ``sound``
    [B, 10] with ``audio=True``). Each modality yields 3 feature tokens prepended to the text.
    """

    def __init__(self, dropout: float = 0.0, audio: bool = False, hidden: int = 16):
        super().__init__()
        self.audio = audio
        self.vision_encoder = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Dropout(dropout))
        self.vision_projector = nn.Linear(8, hidden)
        if audio:
            self.audio_encoder = nn.Sequential(nn.Linear(10, 24), nn.Tanh())
            self.audio_projector = nn.Linear(8, hidden)
        self.llm = nn.ModuleDict(
            {
                "embed": nn.Embedding(VOCAB, hidden),
                "mlp": nn.Sequential(
                    nn.Linear(hidden, 2 * hidden),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(2 * hidden, hidden),
                ),
                "mix": nn.Linear(hidden, hidden),
                "head": nn.Linear(hidden, VOCAB),
            }
        )
        self.encode_calls = 0

    def encode(self, batch):
        self.encode_calls += 1
        feats = self.vision_projector(self.vision_encoder(batch["pixels"]).view(-1, 3, 8))
        if self.audio:
            a = self.audio_projector(self.audio_encoder(batch["sound"]).view(-1, 3, 8))
            feats = torch.cat([feats, a], dim=1)
        return feats

    def decode(self, batch, features):
        h = self.llm["embed"](batch["input_ids"])
        ctx = self.llm["mix"](features.mean(dim=1, keepdim=True))
        # A causal-ish running mean so every position sees earlier tokens.
        h = h + ctx
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1, device=h.device)[None, :, None]
        h = h + self.llm["mlp"](h)
        logits = self.llm["head"](h)
        mask = batch["labels"][:, 1:] != -100
        return logits[:, :-1][mask]

    def encoder_parameters(self):
        mods = [self.vision_encoder, self.vision_projector]
        if self.audio:
            mods += [self.audio_encoder, self.audio_projector]
        for m in mods:
            yield from m.parameters()

    def forward(self, batch):
        return self.decode(batch, self.encode(batch))


class NoCacheWrapper(nn.Module):
    """The same model seen through a plain forward function only (no adapter methods)."""

    def __init__(self, inner: ToyMLLM):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(batch)


def make_batch(rows: int = 6, length: int = 9, audio: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # only the "answer" half is supervised
    labels[0, -1] = -100  # ragged supervision
    batch = {"input_ids": ids, "labels": labels, "pixels": torch.randn(rows, 12, generator=g)}
    if audio:
        batch["sound"] = torch.randn(rows, 10, generator=g)
    return batch


def targets(batch):
    labels = batch["labels"]
    return labels[:, 1:][labels[:, 1:] != -100]


TWO = {"encoder": ["vision_encoder", "vision_projector"], "llm": ["llm"]}
THREE = {
    "vision": ["vision_encoder", "vision_projector"],
    "audio": ["audio_encoder", "audio_projector"],
    "llm": ["llm"],
}
