"""Tiny pretrained parts for the built-in tasks: tokenizer, causal LM and feature encoder.

Instruction tuning (and CoMMIT's balance between encoder and LLM) only makes sense from
*pretrained* parts, but no hub can be reached here. :func:`prepare_tiny_parts` builds them
offline in about a minute on 2 CPU cores, deterministically, and caches the result:

``<cache>/<task>-<key>/``
    ``tokenizer/``  the tiny byte-level BPE of :func:`~commit_mllm.data.train_tiny_tokenizer`
    on ``task_texts("all")`` (one tokenizer serves both tasks).
    ``llm/``        a tiny ``LlamaForCausalLM`` pretrained as a causal LM on the task's
    question + answer *text* only, rendered as the collator does (``<s>USER: {question}
    ASSISTANT: {answer}</s>``, no media placeholder). It learns the language and the
    answer prior p(answer | question): exactly the shortcut that makes an MLLM ignore its
    encoder (biased learning).
    ``encoder/``    easy-vqa: a tiny ``CLIPVisionModel`` (+ its ``CLIPImageProcessor``);
    tones-aqa: a tiny ``WhisperEncoder`` (+ its ``WhisperFeatureExtractor``), both trained
    on a *pretext* task over synthetic media that never touches the task's images / clips
    or its answers (see :func:`synth_scene` and :func:`synth_audio_scene`).
    ``manifest.json`` settings, seeds, versions, timings, pretext and probe metrics and a
    content hash of the weights.

The cache key hashes the settings and the package / torch / transformers versions; a
folder is written under a temporary name and renamed when complete, so a reader never sees
a half-written folder and a complete one is reused in milliseconds.

Load the parts into a :class:`~commit_mllm.models.MultimodalLM` with :func:`tiny_mllm_config`
and :func:`load_media_processor`.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "AUDIO_HEADS",
    "VISION_HEADS",
    "PretrainSettings",
    "content_hash",
    "default_cache_dir",
    "linear_probe",
    "load_media_processor",
    "prepare_tiny_parts",
    "segment_means",
    "synth_audio_scene",
    "synth_scene",
    "tiny_mllm_config",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_SIZE = 64
AUDIO_RATE = 16_000
# The 8 easy-vqa fill colours (measured from its PNGs); half of the synthetic shapes use
# one of them so the pretext covers the target palette, the rest use random colours.
EASY_VQA_RGB = (
    (0, 0, 0),
    (0, 0, 255),
    (165, 42, 42),
    (128, 128, 128),
    (0, 255, 0),
    (255, 0, 0),
    (0, 128, 128),
    (255, 255, 0),
)
SHAPES = ("circle", "rectangle", "triangle", "pentagon", "cross", "diamond")
VISION_HEADS = {"shape": 6, "hue": 13, "value": 3, "size": 3, "quadrant": 4}
"""Pretext targets of the vision encoder -> number of classes (hue: 12 bins + achromatic)."""
AUDIO_HEADS = {
    "count": 4,
    "first_pitch": 5,
    "first_dir": 3,
    "first_level": 3,
    "first_dur": 3,
    "last_pitch": 5,
    "last_dir": 3,
    "last_level": 3,
    "last_dur": 3,
}
"""Pretext targets of the audio encoder -> classes (pitch: 4 bins + noise; dir: flat/up/down)."""


# ---------------------------------------------------------------- settings
@dataclass
class PretrainSettings:
    """Everything that determines the cached parts (hashed into the cache key).

    Attributes:
        task: ``"easy-vqa"`` or ``"tones-aqa"``.
        seed: Seed of every initialisation and data stream.
        steps_scale: Multiplies every step count and probe size (tests use ~0.01).
        llm: ``LlamaConfig`` fields of the tiny LLM (vocabulary added from the tokenizer).
        llm_steps: Causal-LM pretraining steps.
        llm_batch: Causal-LM batch size.
        llm_lr: Peak AdamW learning rate of the LLM (warmup then cosine).
        vision: ``CLIPVisionConfig`` fields of the tiny vision encoder.
        audio: ``WhisperConfig`` fields of the tiny audio encoder.
        encoder_steps: Pretext steps of the vision encoder.
        audio_encoder_steps: Pretext steps of the audio encoder (a step costs ~4x a vision
            step on CPU: 1-2 s clips, 100-token sequences).
        encoder_batch: Pretext batch size.
        encoder_lr: Peak AdamW learning rate of the encoder and its head.
        probe_samples: Task training samples used by the linear probe (3/4 fit, 1/4 eval).
        threads: ``torch.set_num_threads`` during pretraining (results depend on it).
    """

    task: str = "easy-vqa"
    seed: int = 0
    steps_scale: float = 1.0
    llm: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        }
    )
    llm_steps: int = 300
    llm_batch: int = 32
    llm_lr: float = 3e-3
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    )
    audio: dict[str, Any] = field(
        default_factory=lambda: {
            "num_mel_bins": 80,
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 256,
            "decoder_layers": 1,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 64,
            "vocab_size": 64,
            # Token ids inside the tiny (unused) decoder vocabulary.
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 1,
            # 100 positions = 200 mel frames = 2 s: the longest tones-aqa clip in one window.
            "max_source_positions": 100,
            "max_target_positions": 16,
        }
    )
    encoder_steps: int = 600
    audio_encoder_steps: int = 400
    encoder_batch: int = 32
    encoder_lr: float = 3e-3
    probe_samples: int = 2000
    threads: int = 2

    def scaled(self, n: int, minimum: int = 1) -> int:
        """``n`` times :attr:`steps_scale`, rounded, at least ``minimum``."""
        return max(minimum, round(n * self.steps_scale))

    @property
    def modality(self) -> str:
        """``"vision"`` for easy-vqa, ``"audio"`` for tones-aqa."""
        return "vision" if self.task == "easy-vqa" else "audio"


def default_cache_dir() -> Path:
    """``$COMMIT_MLLM_CACHE`` if set, else ``~/.cache/commit-mllm``."""
    env = os.environ.get("COMMIT_MLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "commit-mllm"


def _versions() -> dict[str, str]:
    import transformers

    from commit_mllm import __version__

    return {
        "commit_mllm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def cache_key(settings: PretrainSettings) -> str:
    """Hex digest identifying ``settings`` + library versions (first 16 hex digits)."""
    blob = json.dumps({"settings": asdict(settings), "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over the tensors of every ``*.safetensors`` file and ``tokenizer.json``.

    Tensors are hashed by name, dtype, shape and bytes (not the file bytes), so the hash
    identifies the weights themselves.

    Args:
        folder: A folder written by :func:`prepare_tiny_parts`.

    Returns:
        Hex digest.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(str(path.relative_to(folder)).encode())
        tensors = load_file(str(path))
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    tok = folder / "tokenizer" / "tokenizer.json"
    if tok.is_file():
        h.update(tok.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- entry point
def prepare_tiny_parts(
    task: str,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    force: bool = False,
    steps_scale: float = 1.0,
    log: Callable[[str], Any] | None = print,
    settings: PretrainSettings | None = None,
) -> Path:
    """Pretrain (or load from cache) a tiny tokenizer, LLM and encoder for a built-in task.

    Args:
        task: ``"easy-vqa"`` (CLIP vision encoder) or ``"tones-aqa"`` (Whisper encoder).
        cache_dir: Parent folder of the cache; default :func:`default_cache_dir`.
        seed: Seed of initialisation and synthetic data.
        force: Retrain even when a complete cached folder exists (then replace it).
        steps_scale: Multiplies every step count and probe size (tests: ~0.01).
        log: Progress callback (``None`` = silent).
        settings: Full settings; overrides ``task``/``seed``/``steps_scale`` when given.

    Returns:
        The folder with ``tokenizer/``, ``llm/``, ``encoder/`` and ``manifest.json``.
    """
    from commit_mllm.tasks import PRETRAIN_TASKS

    settings = settings or PretrainSettings(task=task, seed=seed, steps_scale=steps_scale)
    if settings.task not in PRETRAIN_TASKS:
        raise ValueError(f"unknown task {settings.task!r}; available: {', '.join(PRETRAIN_TASKS)}")
    say = log or (lambda _msg: None)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(settings)
    final = root / f"{settings.task}-{key}"
    if not force and (final / MANIFEST).is_file():
        say(f"[pretrain] using cached parts {final}")
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{settings.task}-{key}-", dir=root))
    try:
        _build_parts(tmp, settings, key, say)
        _publish(tmp, final, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"[pretrain] parts ready in {final}")
    return final


def _publish(tmp: Path, final: Path, replace: bool) -> None:
    """Renames the complete ``tmp`` folder to ``final`` (atomic on one file system)."""
    if final.exists():
        if not replace and (final / MANIFEST).is_file():
            return  # another process finished the same key first: keep its folder
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def _build_parts(folder: Path, s: PretrainSettings, key: str, say: Callable) -> None:
    """Trains every part into ``folder`` and writes the manifest last."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        t0 = time.perf_counter()
        tok = _build_tokenizer(folder / "tokenizer")
        t_tok = time.perf_counter()
        say(f"[pretrain] tokenizer: {len(tok)} tokens ({t_tok - t0:.1f}s)")
        llm_metrics = pretrain_llm(tok, s, folder / "llm", say)
        t_llm = time.perf_counter()
        if s.modality == "vision":
            enc_metrics = pretrain_vision(s, folder / "encoder", say)
        else:
            enc_metrics = pretrain_audio(s, folder / "encoder", say)
        t_enc = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    manifest = {
        "format": FORMAT_VERSION,
        "task": s.task,
        "modality": s.modality,
        "seed": s.seed,
        "steps_scale": s.steps_scale,
        "cache_key": key,
        "settings": asdict(s),
        "versions": _versions(),
        "tokenizer": _token_ids(tok),
        "timings_s": {
            "tokenizer": round(t_tok - t0, 3),
            "llm": round(t_llm - t_tok, 3),
            "encoder": round(t_enc - t_llm, 3),
            "total": round(t_enc - t0, 3),
        },
        "metrics": {"llm": llm_metrics, "encoder": enc_metrics},
        "mllm_config": _mllm_config_dict(s, _token_ids(tok)),
        "content_hash": content_hash(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    say(f"[pretrain] total {t_enc - t0:.1f}s")


def _token_ids(tok: Any) -> dict[str, int]:
    from commit_mllm.data import AUDIO_TOKEN, IMAGE_TOKEN

    return {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "audio_token_id": tok.convert_tokens_to_ids(AUDIO_TOKEN),
    }


def _build_tokenizer(folder: Path) -> Any:
    """Trains the shared tiny tokenizer on both tasks' texts and saves it."""
    from commit_mllm.data import train_tiny_tokenizer
    from commit_mllm.tasks import task_texts

    tok = train_tiny_tokenizer(task_texts("all"))
    tok.save_pretrained(str(folder))
    return tok


# ---------------------------------------------------------------- MLLM config
def _mllm_config_dict(s: PretrainSettings, ids: dict[str, int]) -> dict[str, Any]:
    """The :class:`~commit_mllm.models.MLLMConfig` fields (relative paths) that fit the parts."""
    cfg: dict[str, Any] = {
        "llm": {"name_or_path": "llm"},
        "vision_projector": {"type": "mlp"},
        "audio_projector": {"type": "mlp"},
    }
    if s.modality == "vision":
        # The pretext trained the last layer's patch tokens: use them (LLaVA's -2 would
        # drop half of a 2-layer encoder); the CLS token carries no pretext target.
        cfg["vision"] = {"name_or_path": "encoder", "feature_layer": -1, "drop_cls": True}
        cfg["image_token_id"] = ids["image_token_id"]
    else:
        cfg["audio"] = {"name_or_path": "encoder"}
        # 2 encoder tokens merged per LLM token: 1-2 s clips -> 25-50 LLM tokens.
        cfg["audio_projector"] = {"type": "mlp", "stride": 2}
        cfg["audio_token_id"] = ids["audio_token_id"]
    return cfg


def tiny_mllm_config(
    folder: str | os.PathLike[str], projector: dict[str, Any] | None = None, **overrides: Any
) -> Any:
    """The :class:`~commit_mllm.models.MLLMConfig` that assembles the cached parts.

    Args:
        folder: A folder returned by :func:`prepare_tiny_parts`.
        projector: Fields of the (fresh) projector; default an MLP (stride 2 for audio).
        **overrides: Extra ``MLLMConfig`` fields (e.g. ``projector_side="own"``).

    Returns:
        An ``MLLMConfig`` with absolute paths to ``llm/`` and ``encoder/``.
    """
    from commit_mllm.models import MLLMConfig

    folder = Path(folder)
    data = json.loads((folder / MANIFEST).read_text())["mllm_config"]
    data["llm"]["name_or_path"] = str(folder / "llm")
    for m in ("vision", "audio"):
        if m in data:
            data[m]["name_or_path"] = str(folder / "encoder")
            if projector is not None:
                data[f"{m}_projector"] = dict(projector)
    data.update(overrides)
    return MLLMConfig(**data)


def load_media_processor(folder: str | os.PathLike[str]) -> Any:
    """The image processor (easy-vqa) or Whisper feature extractor (tones-aqa) of the parts.

    Args:
        folder: A folder returned by :func:`prepare_tiny_parts`.

    Returns:
        ``CLIPImageProcessor`` or ``WhisperFeatureExtractor`` loaded from ``encoder/``.
    """
    from transformers import WhisperFeatureExtractor

    folder = Path(folder)
    modality = json.loads((folder / MANIFEST).read_text())["modality"]
    cls = _clip_processor_class() if modality == "vision" else WhisperFeatureExtractor
    return cls.from_pretrained(str(folder / "encoder"), local_files_only=True)


# ---------------------------------------------------------------- LLM
def llm_corpus(task: str, seed: int, n: int | None = None) -> list[dict[str, Any]]:
    """Text-only question/answer samples for causal-LM pretraining.

    easy-vqa: the training split's (question, answer) pairs (never the test split).
    tones-aqa: every question wording with every answer of its type, uniformly (the
    answer cannot be told from the text, so the prior is uniform per type).

    Args:
        task: Task name.
        seed: Shuffling seed.
        n: Number of samples for tones-aqa (default 4096).

    Returns:
        Samples with ``conversations`` only (no media, no placeholder).
    """
    rng = np.random.default_rng([seed, 11])
    if task == "easy-vqa":
        from commit_mllm.tasks import easy_vqa

        qs, ans, _, _ = easy_vqa._raw("train")
        pairs = list(zip(qs, ans))
    else:
        from commit_mllm.tasks import tones_aqa

        types = tones_aqa.QUESTION_TYPES
        pairs = []
        for _ in range(n or 4096):
            t = types[int(rng.integers(len(types)))]
            q = tones_aqa.QUESTIONS[t][int(rng.integers(2))]
            pairs.append((q, tones_aqa.ANSWERS[t][int(rng.integers(len(tones_aqa.ANSWERS[t])))]))
    order = rng.permutation(len(pairs))
    return [
        {
            "conversations": [
                {"from": "human", "value": pairs[i][0]},
                {"from": "gpt", "value": pairs[i][1]},
            ]
        }
        for i in order
    ]


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def pretrain_llm(tok: Any, s: PretrainSettings, out: Path, say: Callable) -> dict[str, Any]:
    """Pretrains the tiny Llama as a causal LM on the task's text and saves it to ``out``.

    Every token of ``<s>USER: {q} ASSISTANT: {a}</s>`` is a target, so the model learns
    the template, the questions and the answer prior p(a | q).

    Args:
        tok: The tiny tokenizer.
        s: Settings.
        out: Output folder (``save_pretrained``).
        say: Logger.

    Returns:
        Metrics: steps, final / held-out loss and perplexity, answer-token accuracy.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from commit_mllm.data import Collator

    ids = _token_ids(tok)
    torch.manual_seed(s.seed)
    cfg = LlamaConfig(
        vocab_size=ids["vocab_size"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        **s.llm,
    )
    model = LlamaForCausalLM(cfg)
    collator = Collator(tok)
    corpus = llm_corpus(s.task, s.seed)
    held_out, corpus = corpus[:512], corpus[512:]
    steps, bsz = s.scaled(s.llm_steps), s.llm_batch
    opt = torch.optim.AdamW(model.parameters(), lr=s.llm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _warmup_cosine(i, steps, max(1, steps // 20))
    )
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        rows = [corpus[(step * bsz + j) % len(corpus)] for j in range(bsz)]
        batch = collator(rows)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 4) == 0:
            say(f"[pretrain] llm step {step + 1}/{steps} loss {loss:.3f}")
    train_s = time.perf_counter() - t0
    metrics = {"steps": steps, "batch": bsz, "train_s": round(train_s, 2)}
    metrics["ms_per_step"] = round(1000 * train_s / steps, 1)
    final = float(np.mean(losses[-max(1, steps // 10) :]))
    metrics.update(final_train_loss=round(final, 4), final_train_ppl=round(math.exp(final), 3))
    metrics.update(_llm_eval(model, collator, held_out[: s.scaled(512, 32)]))
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(str(out))
    return metrics


@torch.no_grad()
def _llm_eval(model: nn.Module, collator: Any, rows: Sequence[dict]) -> dict[str, float]:
    """Held-out LM loss / perplexity and answer accuracy (first answer token, teacher forced)."""
    model.eval()
    batch = collator(list(rows))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    ans = batch["labels"][:, 1:]
    pred = out.logits[:, :-1].argmax(-1)
    first = (ans != -100).float().argmax(1)  # first answer position of each row
    rows_idx = torch.arange(ans.shape[0])
    acc = (pred[rows_idx, first] == ans[rows_idx, first]).float().mean()
    loss = float(out.loss)
    return {
        "heldout_loss": round(loss, 4),
        "heldout_ppl": round(math.exp(loss), 3),
        "heldout_answer_first_token_acc": round(float(acc), 4),
    }


# ---------------------------------------------------------------- training helpers
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


class _PretextHead(nn.Module):
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
    head: _PretextHead,
    make_batch: Callable[[int], tuple[Any, torch.Tensor]],
    s: PretrainSettings,
    say: Callable,
) -> dict[str, Any]:
    """The shared pretext loop: AdamW, warmup + cosine, clip 1.0, accuracy of the last steps."""
    steps = s.scaled(s.encoder_steps if s.modality == "vision" else s.audio_encoder_steps)
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=s.encoder_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _warmup_cosine(i, steps, max(1, steps // 15))
    )
    t0, tail, losses = time.perf_counter(), [], []
    for step in range(steps):
        inputs, targets = make_batch(step)
        tokens, lengths = encode(inputs)
        loss, accs = head.loss(head(tokens, lengths), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*params, *head.parameters()], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step >= steps - max(1, steps // 10):
            tail.append(accs)
        if (step + 1) % max(1, steps // 4) == 0:
            say(f"[pretrain] encoder step {step + 1}/{steps} loss {loss:.3f}")
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


def linear_probe(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_eval: torch.Tensor,
    y_eval: torch.Tensor,
    steps: int = 300,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> float:
    """Accuracy of a multinomial logistic regression trained on frozen features.

    A tiny torch replacement for scikit-learn's ``LogisticRegression``: features are
    standardised with the fit set's statistics, then full-batch AdamW fits W, b.

    Args:
        x_fit: [N, F] fit features.
        y_fit: [N] long labels.
        x_eval: [M, F] evaluation features.
        y_eval: [M] long labels.
        steps: Full-batch optimisation steps.
        weight_decay: L2 strength (decoupled).
        seed: Initialisation seed.

    Returns:
        Evaluation accuracy in [0, 1].
    """
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf, xe = (x_fit - mean) / std, (x_eval - mean) / std
    n_cls = int(max(y_fit.max(), y_eval.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(xf.shape[1], n_cls)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=gen)
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05, weight_decay=weight_decay)
    xf, xe = xf.detach(), xe.detach()
    with torch.enable_grad():  # callers may hold no_grad while extracting features
        for _ in range(steps):
            loss = nn.functional.cross_entropy(lin(xf), y_fit)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float((lin(xe).argmax(-1) == y_eval).float().mean())


def _probe_all(feats: torch.Tensor, labels: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """Linear-probe accuracy per label on a 3/4 fit, 1/4 eval split of ``feats`` [N, F]."""
    out = {}
    for name, y in labels.items():
        keep = (y >= 0).nonzero(as_tuple=True)[0]
        n_fit = (3 * len(keep)) // 4
        fit, ev = keep[:n_fit], keep[n_fit:]
        out[name] = round(linear_probe(feats[fit], y[fit], feats[ev], y[ev], seed=seed), 4)
    return out


# ---------------------------------------------------------------- vision
def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list:
    angles = rot + np.arange(n) * 2 * np.pi / n
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]


def _draw_shape(
    draw: Any, shape: str, cx: float, cy: float, r: float, rng: Any, fill: tuple
) -> None:
    """Draws one filled shape of "radius" ``r`` centred at (cx, cy) (2x canvas units)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "rectangle":
        aspect = float(np.exp(rng.uniform(-0.6, 0.6)))
        w, h = r * aspect**0.5, r / aspect**0.5
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rng.uniform(0, 2 * np.pi)), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, rng.uniform(0, 2 * np.pi)), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)
    else:  # cross: two bars
        t = r * rng.uniform(0.25, 0.4)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def _colour_labels(rgb: tuple[int, int, int]) -> tuple[int, int]:
    """(hue bin 0..11 or 12 = achromatic, value bin 0..2) of a fill colour."""
    h, sat, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    hue = 12 if sat < 0.25 or v < 0.15 else int(h * 12) % 12
    return hue, min(2, int(v * 3))


def synth_scene(
    rng: np.random.Generator, coverage: bool = False
) -> tuple[Any, dict[str, int]] | tuple[Any, dict[str, int], np.ndarray]:
    """One synthetic 64x64 scene for the vision pretext and its targets.

    A single filled shape (6 classes: circle, rectangle, triangle, pentagon, cross,
    diamond) of random size, position, rotation and colour (half the time one of the 8
    easy-vqa colours, otherwise uniform RGB) on a background like easy-vqa's (a light
    pastel, 80%) or a random mid/dark colour, drawn at 2x and downsampled (anti-aliased
    edges like the task's PNGs). No easy-vqa image is used.

    Args:
        rng: Random generator (all randomness comes from it).
        coverage: Also return the shape's coverage of a 32x32 grid (2x2-pixel cells).

    Returns:
        ``(PIL image RGB 64x64, targets)`` with keys of :data:`VISION_HEADS`, plus the
        float32 [32, 32] coverage in [0, 1] when ``coverage``.
    """
    from PIL import Image, ImageDraw

    big = 2 * IMAGE_SIZE
    if rng.random() < 0.8:
        bg = tuple(int(v) for v in rng.integers(220, 256, 3))
    else:
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
        fill = EASY_VQA_RGB[int(rng.integers(len(EASY_VQA_RGB)))]
    else:
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    size = int(rng.integers(3))
    r = rng.uniform(*((8, 16), (16, 30), (30, 48))[size])  # radius on the 2x canvas
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    shape = int(rng.integers(len(SHAPES)))
    img = Image.new("RGB", (big, big), bg)
    _draw_shape(ImageDraw.Draw(img), SHAPES[shape], cx, cy, r, rng, fill)
    # Pixels that differ from the background are the shape (read before downsampling).
    cover = np.any(np.asarray(img) != np.asarray(bg, dtype=np.uint8), axis=-1)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    hue, value = _colour_labels(fill)
    quadrant = int(cx >= big / 2) + 2 * int(cy >= big / 2)
    targets = {"shape": shape, "hue": hue, "value": value, "size": size, "quadrant": quadrant}
    if not coverage:
        return img, targets
    return img, targets, cover.reshape(32, big // 32, 32, big // 32).mean((1, 3), dtype=np.float32)


def _clip_processor_class() -> Any:
    """The PIL-based CLIP image processor class (torchvision is not usable here)."""
    try:
        from transformers import CLIPImageProcessorPil as cls  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls


def _image_processor() -> Any:
    """The CLIP image processor the parts are saved with: 64x64, CLIP normalisation."""
    return _clip_processor_class()(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def _pixels(images: Sequence[Any], processor: Any) -> torch.Tensor:
    """PIL images (already 64x64) -> normalised [B, 3, 64, 64] (same maths as the processor)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(0, 3, 1, 2).copy())


def pretrain_vision(s: PretrainSettings, out: Path, say: Callable) -> dict[str, Any]:
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
        say: Logger.

    Returns:
        Metrics: pretext loss / accuracies, probe accuracies (pretrained and random init).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(s.seed)
    model = CLIPVisionModel(CLIPVisionConfig(**s.vision))
    random_init = CLIPVisionModel(CLIPVisionConfig(**s.vision))  # probe baseline
    random_init.load_state_dict(model.state_dict())
    grid = model.config.image_size // model.config.patch_size
    head = _PretextHead(model.config.hidden_size, VISION_HEADS, n_tokens=grid**2, dense=16)
    processor = _image_processor()
    rng = np.random.default_rng([s.seed, 21])  # never the easy-vqa images or their seeds

    def make_batch(_step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        scenes = [synth_scene(rng, coverage=True) for _ in range(s.encoder_batch)]
        targets = torch.tensor([[t[k] for k in VISION_HEADS] for _, t, _ in scenes])
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
    metrics = _train_pretext(encode, params, head, make_batch, s, say)
    t0 = time.perf_counter()
    metrics["probe"] = _vision_probe(model, processor, s)
    metrics["probe_random_init"] = _vision_probe(random_init, processor, s)
    metrics["probe_s"] = round(time.perf_counter() - t0, 2)
    say(f"[pretrain] vision probe {metrics['probe']} (random init {metrics['probe_random_init']})")
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return metrics


def _easy_vqa_probe_set(n: int, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Paths of ``n`` easy-vqa *train* images with their colour and shape labels (-1 unknown)."""
    from commit_mllm.tasks import easy_vqa

    qs, ans, ids, paths = easy_vqa._raw("train")
    colour: dict[int, int] = {}
    shape: dict[int, int] = {}
    for q, a, i in zip(qs, ans, ids):
        t = easy_vqa.question_type(q)
        if t == easy_vqa.COLOUR:
            colour[i] = easy_vqa.COLOURS.index(a)
        elif t == easy_vqa.SHAPE and a in easy_vqa.SHAPES:
            shape[i] = easy_vqa.SHAPES.index(a)
    pool = sorted(set(colour) | set(shape))
    rng = np.random.default_rng([seed, 31])
    chosen = [pool[i] for i in rng.permutation(len(pool))[:n]]
    labels = {
        "colour": torch.tensor([colour.get(i, -1) for i in chosen]),
        "shape": torch.tensor([shape.get(i, -1) for i in chosen]),
    }
    return [paths[i] for i in chosen], labels


@torch.no_grad()
def _vision_probe(model: nn.Module, processor: Any, s: PretrainSettings) -> dict[str, float]:
    """Linear probes (colour, shape) on frozen last-layer patch features, mean and flat."""
    from commit_mllm.data import image_features

    paths, labels = _easy_vqa_probe_set(s.scaled(s.probe_samples, 64), s.seed)
    model.eval()
    feats = []
    for i in range(0, len(paths), 256):
        px = image_features(paths[i : i + 256], processor)
        feats.append(model(pixel_values=px).last_hidden_state[:, 1:])
    tokens = torch.cat(feats)  # [N, n_patches, d]
    out = {f"{k}_meanpool": v for k, v in _probe_all(tokens.mean(1), labels, s.seed).items()}
    out.update(
        {f"{k}_patches": v for k, v in _probe_all(tokens.flatten(1), labels, s.seed).items()}
    )
    return out


# ---------------------------------------------------------------- audio
_PITCH_EDGES = np.log([200.0, 400.0, 800.0, 1600.0, 3200.0])
_LEVEL_EDGES = (0.2, 0.45)  # peak amplitude bins: soft / medium / loud
_DUR_EDGES = (0.2, 0.4)  # seconds: short / medium / long


def _event(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """One sound event (tone, chirp or noise burst) and its property labels."""
    from commit_mllm.tasks.tones_aqa import _fade

    dur = rng.uniform(0.08, 0.6)
    amp = float(np.exp(rng.uniform(np.log(0.05), np.log(0.9))))
    t = np.arange(int(dur * AUDIO_RATE)) / AUDIO_RATE
    kind = rng.choice(3, p=[0.45, 0.35, 0.2])
    if kind == 2:  # noise
        x = rng.standard_normal(t.size)
        x = x / (np.abs(x).max() + 1e-9)
        pitch, direction = 4, 0
    else:
        f0 = float(np.exp(rng.uniform(_PITCH_EDGES[0], _PITCH_EDGES[-1] - 1e-3)))
        if kind == 0:
            x, direction = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)), 0
        else:
            f1 = f0 * 2 ** (rng.choice([-1, 1]) * rng.uniform(0.7, 2.0))
            k = np.log(f1 / f0) / dur
            x, direction = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k), 1 if f1 > f0 else 2
        # The pitch bin is the geometric mean frequency (start for tones).
        mid = np.log(f0) if kind == 0 else 0.5 * (np.log(f0) + np.log(f1))
        pitch = int(np.clip(np.searchsorted(_PITCH_EDGES, mid) - 1, 0, 3))
    labels = {
        "pitch": pitch,
        "dir": direction,
        "level": int(np.searchsorted(_LEVEL_EDGES, amp)),
        "dur": int(np.searchsorted(_DUR_EDGES, dur)),
    }
    return _fade(amp * x), labels


def synth_audio_scene(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """One synthetic 1-2 s clip for the audio pretext and its targets.

    1-4 events in sequence (pure tones 200-3200 Hz, exponential chirps up or down, or
    white-noise bursts; 0.08-0.6 s; peak 0.05-0.9), random gaps and faint background
    noise. Targets (:data:`AUDIO_HEADS`): the number of events and, for the first and the
    last event, pitch bin (4 log bins or noise), direction (flat / up / down), level bin
    and duration bin. Generated from its own stream, never the tones-aqa clips.

    Args:
        rng: Random generator.

    Returns:
        ``(clip float32 [n] at 16 kHz, targets)``.
    """
    n = int(rng.integers(1, 5))
    events = [_event(rng) for _ in range(n)]
    gaps = [int(rng.uniform(0.05, 0.25) * AUDIO_RATE) for _ in range(n - 1)]
    body = sum(len(e) for e, _ in events) + sum(gaps)
    total = max(int(rng.uniform(1.0, 2.0) * AUDIO_RATE), body + AUDIO_RATE // 20)
    total = min(total, max(body, 2 * AUDIO_RATE))  # stay within one 2 s window when possible
    pos = int(rng.integers(0, total - body + 1))
    clip = rng.standard_normal(total) * rng.uniform(0.0, 0.01)
    for k, (e, _) in enumerate(events):
        clip[pos : pos + len(e)] += e
        pos += len(e) + (gaps[k] if k < len(gaps) else 0)
    first, last = events[0][1], events[-1][1]
    targets = {"count": n - 1}
    targets.update({f"first_{k}": v for k, v in first.items()})
    targets.update({f"last_{k}": v for k, v in last.items()})
    return np.clip(clip, -1, 1).astype(np.float32), targets


def _whisper_config(s: PretrainSettings) -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(**s.audio)


def pretrain_audio(s: PretrainSettings, out: Path, say: Callable) -> dict[str, Any]:
    """Pretext-trains a tiny Whisper encoder on synthetic clips; saves it to ``out``.

    Features come from ``WhisperFeatureExtractor`` padded only to the batch's longest clip
    (:func:`~commit_mllm.data.audio_features`), run through
    :class:`~commit_mllm.models.AudioEncoder` exactly as in the MLLM.

    Args:
        s: Settings.
        out: Output folder (``WhisperEncoder`` + feature extractor).
        say: Logger.

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
    head = _PretextHead(enc.hidden_size, AUDIO_HEADS, n_segments=8)
    fe = WhisperFeatureExtractor(feature_size=s.audio["num_mel_bins"])
    rng = np.random.default_rng([s.seed, 41])  # tones-aqa uses [seed, split, i] streams

    def make_batch(_step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
        scenes = [synth_audio_scene(rng) for _ in range(s.encoder_batch)]
        targets = torch.tensor([[t[k] for k in AUDIO_HEADS] for _, t in scenes])
        return audio_features([c for c, _ in scenes], fe), (targets, None)

    def encode(inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return enc(*inputs)  # features [B, N, d], valid lengths [B]

    enc.train()
    metrics = _train_pretext(encode, list(enc.parameters()), head, make_batch, s, say)
    t0 = time.perf_counter()
    metrics["probe"] = _audio_probe(enc, fe, s)
    metrics["probe_random_init"] = _audio_probe(random_init, fe, s)
    metrics["probe_s"] = round(time.perf_counter() - t0, 2)
    say(f"[pretrain] audio probe {metrics['probe']} (random init {metrics['probe_random_init']})")
    enc.hf_model.save_pretrained(str(out))
    fe.save_pretrained(str(out))
    return metrics


def _tones_labels(sample: dict[str, Any]) -> dict[str, int]:
    """Probe labels of a tones-aqa sample: the fact behind its answer, per question type."""
    from commit_mllm.tasks import tones_aqa

    qtype, q = sample["question_type"], sample["conversations"][0]["value"]
    a = sample["conversations"][1]["value"]
    out = {"count": -1, "pitch": -1, "loudness": -1, "duration": -1}
    if qtype in (tones_aqa.COUNT, tones_aqa.PITCH):
        out[qtype] = tones_aqa.ANSWERS[qtype].index(a)
    else:  # "first > second" is true iff the answer and the wording agree
        wording0 = q.endswith(tones_aqa.QUESTIONS[qtype][0])
        out[qtype] = int((a == "yes") == wording0)
    return out


@torch.no_grad()
def _audio_probe(enc: nn.Module, fe: Any, s: PretrainSettings) -> dict[str, float]:
    """Linear probes on frozen features of tones-aqa *train* clips (4 time-segment means)."""
    from commit_mllm.data import audio_features
    from commit_mllm.tasks import load_task

    data = load_task("tones-aqa", "train", seed=s.seed, max_samples=s.scaled(s.probe_samples, 64))
    samples = [data[i] for i in range(len(data))]
    labels = {
        k: torch.tensor([_tones_labels(x)[k] for x in samples]) for k in _tones_labels(samples[0])
    }
    enc.eval()
    pooled = []
    for i in range(0, len(samples), 128):
        feats, mask = audio_features([x["audio"] for x in samples[i : i + 128]], fe)
        tokens, lengths = enc(feats, mask)
        for row, n in zip(tokens, lengths.tolist()):
            # Means over 4 equal time segments keep "first vs second" linearly readable.
            segs = np.array_split(np.arange(n), 4)
            pooled.append(torch.cat([row[seg].mean(0) for seg in segs]))
    return _probe_all(torch.stack(pooled), labels, s.seed)
