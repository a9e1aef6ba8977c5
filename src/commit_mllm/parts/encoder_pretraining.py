"""Pretext pretraining of the tiny encoders on synthetic media (never the task's own).

Vision: a tiny ``CLIPVisionModel`` learns shape, hue, brightness, size, quadrant and per-patch
coverage of synthetic PIL scenes (:func:`~commit_mllm.parts.synthetic.synth_scene`). Audio: a
tiny ``WhisperEncoder`` learns the event count and the pitch, direction, level and duration of
the first and last events of synthetic clips
(:func:`~commit_mllm.parts.synthetic.synth_audio_scene`). Afterwards the frozen features are
linearly probed on the task's training media (:mod:`commit_mllm.parts.probes`).

Must-learn variants (:data:`commit_mllm.tasks.VARIANTS`) pretrain an encoder blind to one
feature: its stem (CLIP's patch embedding, Whisper's first convolution) is tied across its
input channels (RGB; mel bins) throughout pretraining, so it reads one weighted luminance per
pixel (one energy value per frame), and the pretext drops the targets of that feature (hue and
brightness; pitch and sweep direction). The saved weights stay tied; the MLLM trains them
untied, so fine-tuning the tower can recover the feature and freezing it cannot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from commit_mllm.parts.llm_pretraining import warmup_cosine
from commit_mllm.parts.probes import audio_probe, vision_probe
from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.synthetic import (
    AUDIO_HEADS,
    IMAGE_SIZE,
    VISION_HEADS,
    synth_audio_scene,
    synth_scene,
)

if TYPE_CHECKING:
    from commit_mllm.parts.settings import PretrainSettings

WITHHELD_HEADS = {
    "colour": ("hue", "value"),
    "pitch": ("first_pitch", "first_dir", "last_pitch", "last_dir"),
}
"""Pretext targets dropped for a withheld feature (:attr:`PretrainSettings.withhold`)."""

__all__ = [
    "WITHHELD_HEADS",
    "PretextHead",
    "clip_processor_class",
    "pretrain_audio",
    "pretrain_vision",
    "segment_means",
    "tie_stem",
]

MS_PER_STEP = {"vision": 45, "audio": 110}
"""Measured ms per pretext step (batch 32, 2 threads, idle 2-core machine): for 'usually'."""


def segment_means(tokens: torch.Tensor, lengths: torch.Tensor | None, n: int) -> torch.Tensor:
    """Means of ``n`` equal, ordered segments of each row's valid tokens.

    Args:
        tokens: [B, N, d].
        lengths: [B] valid tokens per row (valid first); ``None`` = all valid.
        n: Number of segments (a row shorter than ``n`` repeats tokens).

    Returns:
        [B, n, d].
    """
    bsz, n_tok, _ = tokens.shape
    if lengths is None:
        lengths = torch.full((bsz,), n_tok, device=tokens.device)
    lengths = lengths.clamp(min=1).to(tokens.dtype).unsqueeze(1)  # [B, 1]
    pos = torch.arange(n_tok, device=tokens.device, dtype=tokens.dtype).unsqueeze(0)
    seg_lo = torch.arange(n, device=tokens.device, dtype=tokens.dtype).view(1, n, 1)
    # Token t of a row with L valid tokens covers [t, t+1) x n / L in segment units; it is
    # counted in segment k when its centre falls in [k, k+1), or, for rows shorter than n,
    # when it is the nearest token to the segment's centre.
    centre = ((pos + 0.5) * n / lengths).unsqueeze(1)  # [B, 1, N]
    inside = (centre >= seg_lo) & (centre < seg_lo + 1) & (pos.unsqueeze(1) < lengths.unsqueeze(1))
    nearest = ((seg_lo + 0.5) * lengths.unsqueeze(1) / n).floor()  # [B, n, 1]
    weights = (inside | (pos.unsqueeze(1) == nearest)).to(tokens.dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ tokens


@torch.no_grad()
def tie_stem(weight: torch.Tensor) -> None:
    """Ties a stem's weights across its input channels in place (their mean, dim 1).

    CLIP's patch embedding [d, 3, p, p] then reads ``sum_c x_c`` (one luminance value per
    pixel), Whisper's first convolution [d, n_mels, k] one energy value per frame: colour,
    resp. pitch, are invisible to every later layer.

    Args:
        weight: The stem's weight, input channels on dim 1.
    """
    weight.copy_(weight.mean(1, keepdim=True).expand_as(weight))


def _heads(all_heads: dict[str, int], withhold: str | None) -> dict[str, int]:
    """The pretext targets, less those of the withheld feature."""
    drop = WITHHELD_HEADS.get(withhold, ()) if withhold else ()
    return {k: v for k, v in all_heads.items() if k not in drop}


class PretextHead(nn.Module):
    """Multi-target classifier over encoder tokens that keeps *where* things are.

    A plain mean pool would hide position (quadrant, first vs last event), so the tokens
    are pooled into ``n_segments`` ordered groups: ``n_segments=None`` keeps every token
    (fixed-length image patches, each reduced to 16 dims), otherwise the valid tokens of a
    row are split into that many equal time segments and averaged (variable-length audio).

    Args:
        d: Token width.
        classes: Target name -> number of classes.
        n_tokens: Tokens per row (``n_segments=None`` only).
        n_segments: Number of ordered time segments (audio), or ``None``.
        dense: Per-token regression outputs (vision: the shape's coverage of 4x4 cells of
            each patch), 0 for none.

    Shapes:
        tokens [B, N, d] (+ lengths [B]) -> logits [B, sum(classes)] and dense [B, N, dense].
    """

    def __init__(
        self,
        d: int,
        classes: dict[str, int],
        n_tokens: int = 0,
        n_segments: int | None = None,
        dense: int = 0,
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(d, dense) if dense else None
        self.classes = dict(classes)
        self.n_segments = n_segments
        self.norm = nn.LayerNorm(d)
        self.reduce = nn.Linear(d, 16 if n_segments is None else d)
        width = n_tokens * 16 if n_segments is None else n_segments * d
        self.out = nn.Sequential(
            nn.GELU(), nn.Linear(width, 256), nn.GELU(), nn.Linear(256, sum(classes.values()))
        )

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, sum(classes)] (and dense logits [B, N, dense]) from tokens [B, N, d]."""
        normed = self.norm(tokens)
        x = self.reduce(normed)
        if self.n_segments is not None:
            x = segment_means(x, lengths, self.n_segments)
        dense = self.dense(normed) if self.dense is not None else None
        return self.out(x.flatten(1)), dense

    def loss(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor | None],
        targets: tuple[torch.Tensor, torch.Tensor | None],
    ) -> tuple[torch.Tensor, dict]:
        """Sum of per-target cross-entropies (+ dense BCE).

        Args:
            outputs: :meth:`forward`'s logits and dense logits.
            targets: Class targets [B, n_targets] (-1 = ignore) and dense targets in [0, 1]
                [B, N, dense] (or ``None``).

        Returns:
            The loss and the training accuracy per target.
        """
        (logits, dense), (targets, dense_y) = outputs, targets
        total, accs, start = logits.new_zeros(()), {}, 0
        if dense is not None and dense_y is not None:
            total = total + 5.0 * nn.functional.binary_cross_entropy_with_logits(dense, dense_y)
        for j, (name, k) in enumerate(self.classes.items()):
            part, y = logits[:, start : start + k], targets[:, j]
            total = total + nn.functional.cross_entropy(part, y, ignore_index=-1)
            valid = y >= 0
            accs[name] = (
                float((part.argmax(-1)[valid] == y[valid]).float().mean())
                if valid.any()
                else float("nan")
            )
            start += k
        return total, accs


def _train_pretext(
    encode: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]],
    params: list[nn.Parameter],
    head: PretextHead,
    make_batch: Callable[[int], tuple[Any, torch.Tensor]],
    s: PretrainSettings,
    say: Say | None,
    stem: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The shared pretext loop: AdamW, warmup + cosine, clip 1.0, accuracy of the last steps.

    ``stem`` (a withheld feature's stem weight) is kept tied by :func:`tie_stem` at the start
    and after every optimizer step.
    """
    steps = s.scaled(s.encoder_steps if s.modality == "vision" else s.audio_encoder_steps)
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=s.encoder_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: warmup_cosine(i, steps, max(1, steps // 15))
    )
    t0, tail, losses = time.perf_counter(), [], []
    usually = f"~{math.ceil(steps * MS_PER_STEP[s.modality] / 1000)} s on an idle machine"
    what = f"{s.task}: pretext-training the tiny {s.modality} encoder ({steps} steps)"
    if stem is not None:
        tie_stem(stem)
    with phase(say, what, usually, steps) as bar:
        for step in range(steps):
            inputs, targets = make_batch(step)
            tokens, lengths = encode(inputs)
            loss, accs = head.loss(head(tokens, lengths), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, *head.parameters()], 1.0)
            opt.step()
            if stem is not None:
                tie_stem(stem)
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step >= steps - max(1, steps // 10):
                tail.append(accs)
            bar.update()
            bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    train_s = time.perf_counter() - t0
    return {
        "steps": steps,
        "batch": s.encoder_batch,
        "train_s": round(train_s, 2),
        "ms_per_step": round(1000 * train_s / steps, 1),
        "final_loss": round(float(np.mean(losses[-max(1, steps // 10) :])), 4),
        "pretext_train_acc": {
            k: round(float(np.nanmean([a[k] for a in tail])), 4) for k in tail[0]
        },
    }


def clip_processor_class() -> Any:
    """The PIL-based CLIP image processor class (torchvision is not usable here)."""
    try:
        from transformers import CLIPImageProcessorPil as cls  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls


def _image_processor() -> Any:
    """The CLIP image processor the parts are saved with: 64x64, CLIP normalisation."""
    return clip_processor_class()(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def _pixels(images: Sequence[Any], processor: Any) -> torch.Tensor:
    """PIL images (already 64x64) -> normalised [B, 3, 64, 64] (same maths as the processor)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(0, 3, 1, 2).copy())


def pretrain_vision(s: PretrainSettings, out: Path, say: Say | None) -> dict[str, Any]:
    """Pretext-trains a tiny CLIP vision tower on synthetic scenes; saves it to ``out``.

    Targets, read from the last layer's patch tokens (a per-token reduction, flattened in
    patch order, then an MLP, so position stays visible): shape class (6), hue bin (12 +
    achromatic), brightness bin, size bin and quadrant of the shape (cross-entropy), plus a
    dense target per patch token: the shape's coverage of the patch's 4x4 cells (binary
    cross-entropy). The dense target puts the outline into the patch tokens themselves,
    which is what a projector + LLM read; the global shape class alone learns slowly.
    After training, frozen features are linearly probed for colour and shape on
    easy-vqa *train* images (and, as a baseline, the same architecture untrained).

    Args:
        s: Settings.
        out: Output folder (model + image processor).
        say: Line printer for progress (``None``: silent).

    Returns:
        Metrics: pretext loss / accuracies, probe accuracies (pretrained and random init).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(s.seed)
    model = CLIPVisionModel(CLIPVisionConfig(**s.vision))
    random_init = CLIPVisionModel(CLIPVisionConfig(**s.vision))  # probe baseline
    random_init.load_state_dict(model.state_dict())
    grid = model.config.image_size // model.config.patch_size
    heads = _heads(VISION_HEADS, s.withhold)
    head = PretextHead(model.config.hidden_size, heads, n_tokens=grid**2, dense=16)
    processor = _image_processor()
    rng = np.random.default_rng([s.seed, 21])  # never the easy-vqa images or their seeds

    def make_batch(_step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        scenes = [synth_scene(rng, coverage=True) for _ in range(s.encoder_batch)]
        targets = torch.tensor([[t[k] for k in heads] for _, t, _ in scenes])
        # Coverage of 4x4 cells per patch, in patch order: [B, grid^2, 16].
        cover = torch.from_numpy(np.stack([c for _, _, c in scenes]))
        f = 32 // (4 * grid)
        cover = cover.view(-1, 4 * grid, f, 4 * grid, f).mean((2, 4))
        cover = cover.view(-1, grid, 4, grid, 4).permute(0, 1, 3, 2, 4).reshape(-1, grid**2, 16)
        return _pixels([im for im, _, _ in scenes], processor), (targets, cover)

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return model(pixel_values=pixels).last_hidden_state[:, 1:], None

    # post_layernorm feeds only the pooled output, which the MLLM never reads.
    params = [p for n, p in model.named_parameters() if "post_layernorm" not in n]
    model.train()
    stem = model.get_input_embeddings().weight if s.withhold else None
    metrics = _train_pretext(encode, params, head, make_batch, s, say, stem)
    t0 = time.perf_counter()
    with phase(say, f"{s.task}: linear probes of the encoder on task images", "~5 s"):
        metrics["probe"] = vision_probe(model, processor, s)
        metrics["probe_random_init"] = vision_probe(random_init, processor, s)
    metrics["probe_s"] = round(time.perf_counter() - t0, 2)
    if say is not None:
        say(f"[prepare] probe {metrics['probe']} (random init {metrics['probe_random_init']})")
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return metrics


def _whisper_config(s: PretrainSettings) -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(**s.audio)


def pretrain_audio(s: PretrainSettings, out: Path, say: Say | None) -> dict[str, Any]:
    """Pretext-trains a tiny Whisper encoder on synthetic clips; saves it to ``out``.

    Features come from ``WhisperFeatureExtractor`` padded only to the batch's longest clip
    (:func:`~commit_mllm.data.audio_features`), run through
    :class:`~commit_mllm.models.AudioEncoder` exactly as in the MLLM.

    Args:
        s: Settings.
        out: Output folder (``WhisperEncoder`` + feature extractor).
        say: Line printer for progress (``None``: silent).

    Returns:
        Metrics: pretext loss / accuracies, probe accuracies (pretrained and random init).
    """
    from transformers import WhisperFeatureExtractor

    from commit_mllm.data import audio_features
    from commit_mllm.models import AudioEncoder

    torch.manual_seed(s.seed)
    enc = AudioEncoder(config=_whisper_config(s).to_dict())
    random_init = AudioEncoder(config=_whisper_config(s).to_dict())
    random_init.load_state_dict(enc.state_dict())
    heads = _heads(AUDIO_HEADS, s.withhold)
    head = PretextHead(enc.hidden_size, heads, n_segments=8)
    fe = WhisperFeatureExtractor(feature_size=s.audio["num_mel_bins"])
    rng = np.random.default_rng([s.seed, 41])  # tones-aqa uses [seed, split, i] streams

    def make_batch(_step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
        scenes = [synth_audio_scene(rng) for _ in range(s.encoder_batch)]
        targets = torch.tensor([[t[k] for k in heads] for _, t in scenes])
        return audio_features([c for c, _ in scenes], fe), (targets, None)

    def encode(inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return enc(*inputs)  # features [B, N, d], valid lengths [B]

    enc.train()
    stem = enc.hf_model.conv1.weight if s.withhold else None
    metrics = _train_pretext(encode, list(enc.parameters()), head, make_batch, s, say, stem)
    t0 = time.perf_counter()
    with phase(say, f"{s.task}: linear probes of the encoder on task clips", "~10 s"):
        metrics["probe"] = audio_probe(enc, fe, s)
        metrics["probe_random_init"] = audio_probe(random_init, fe, s)
    metrics["probe_s"] = round(time.perf_counter() - t0, 2)
    if say is not None:
        say(f"[prepare] probe {metrics['probe']} (random init {metrics['probe_random_init']})")
    enc.hf_model.save_pretrained(str(out))
    fe.save_pretrained(str(out))
    return metrics
