"""What the overhead benchmark times: the models, the settings (arms), one step of each."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from commit_mllm import CoMMIT, CoMMITConfig, Components
from commit_mllm.data import Collator, train_tiny_tokenizer
from commit_mllm.method.lookahead import supervised_mask
from commit_mllm.models import LoRASettings, component_prefixes
from commit_mllm.models.mllm import MultimodalLM
from commit_mllm.models.mllm_config import LLMConfig, MLLMConfig, VisionEncoderConfig
from commit_mllm.tasks import task_texts
from commit_mllm.training.model_spec import TINY_CLIP, TINY_LLM
from overhead_quality import grid_name

MODES = ("lora", "full")


# The CPU-sized "medium" model: CLIP-style ViT (hidden 384, 6 layers) + Llama (hidden 512,
# 8 layers, vocab 8192, untied head): ~44 M parameters.
MEDIUM_LLM = {
    **TINY_LLM,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 8192,
    "tie_word_embeddings": False,
}


MEDIUM_CLIP = {
    **TINY_CLIP,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "patch_size": 16,
}


@dataclass(frozen=True)
class ModelSpec:
    """A model size of the benchmark.

    Attributes:
        name: ``tiny`` or ``medium``.
        llm: transformers Llama config dict.
        clip: transformers CLIP vision config dict (without ``image_size``).
        image_size: Image side in pixels.
        batch_size: Rows per batch.
        lora_r: LoRA rank on the LLM in ``lora`` mode.
        min_block: Steps per timing block (rounded up to a multiple of K).
        rounds: Timing rounds.
        quick_rounds: Timing rounds with ``--quick``.
        resize_vocab: Resize the LLM's vocabulary to the tokenizer's (tiny preset style).
    """

    name: str
    llm: dict
    clip: dict
    image_size: int
    batch_size: int
    lora_r: int
    min_block: int
    rounds: int
    quick_rounds: int
    resize_vocab: bool = False


SPECS = {
    "tiny": ModelSpec("tiny", dict(TINY_LLM), dict(TINY_CLIP), 32, 16, 8, 16, 16, 2, True),
    "medium": ModelSpec("medium", MEDIUM_LLM, MEDIUM_CLIP, 64, 8, 16, 8, 4, 1),
}


@dataclass(frozen=True)
class Setting:
    """One arm of the overhead benchmark.

    Attributes:
        name: Label in the tables.
        every: K (0 for the plain step); None = the config's own.
        rows: Row fraction of the estimate (None = all rows); ignored for ``default``.
        plain: A plain step without CoMMIT.
        preset: ``default`` (``CoMMITConfig()``), ``exact`` or ``grid`` (``every`` / ``rows``).
        snapshot: The meter's snapshot scope (``needed`` or ``all``).
    """

    name: str
    every: int | None = None
    rows: float | None = None
    plain: bool = False
    preset: str = "grid"
    snapshot: str = "needed"

    def config(self) -> CoMMITConfig:
        """The CoMMIT settings of this arm."""
        if self.preset == "default":
            return CoMMITConfig(snapshot=self.snapshot)
        if self.preset == "exact":
            return CoMMITConfig(exact=True, snapshot=self.snapshot)
        return CoMMITConfig(every=self.every, rows=self.rows, snapshot=self.snapshot)

    @property
    def k(self) -> int:
        """Steps between estimates (1 for the plain step)."""
        return max(1, self.config().effective_every) if not self.plain else 1


PLAIN = Setting("plain", 0, None, True)


DEFAULT = Setting("default", preset="default")


EXACT = Setting("exact", preset="exact")


def settings_for(model: str, quick: bool = False) -> list[Setting]:
    """Timing arms: plain, default, exact and (K, rows) cells that show where time goes."""
    # The default (K = 16, rows 0.25) and exact (K = 1, all rows) arms are cells of the grid too.
    if quick:
        cells = [(1, 0.25)]
    elif model == "tiny":
        cells = [(1, 0.25), (4, 1.0), (4, 0.25), (16, 1.0)]
    else:
        cells = [(1, 0.25), (4, 0.25)]
    grid = [Setting(grid_name(k, f), k, None if f == 1.0 else f) for k, f in cells]
    return [PLAIN, DEFAULT, EXACT, *grid]


# ---- model and data -----------------------------------------------------------------------
@dataclass
class Bench:
    """A model with its optimizer, components and fixed batches."""

    model: MultimodalLM
    components: Components
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, Any]]
    params: list[torch.nn.Parameter]
    n_params: int
    n_trainable: int
    tokens: int = field(default=0)


def make_collator(image_size: int, max_length: int = 48) -> Collator:
    """The tiny byte-level tokenizer (easy-VQA + tones-AQA texts) and a CLIP processor."""
    import transformers

    tok = train_tiny_tokenizer(task_texts("all"))
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    size = {"height": image_size, "width": image_size}
    proc = cls(size={"shortest_edge": image_size}, crop_size=size)
    return Collator(tok, proc, None, max_length=max_length)


def build_model(spec: ModelSpec, mode: str, collator: Collator, seed: int = 0) -> MultimodalLM:
    """The MultimodalLM of a spec: encoder + projector full, LLM with LoRA or full."""
    llm = LLMConfig(config=dict(spec.llm))
    if spec.resize_vocab:
        llm.vocab_size = len(collator.tokenizer)
    if mode == "lora":
        llm.lora = LoRASettings(r=spec.lora_r, alpha=2.0 * spec.lora_r)
    vision = VisionEncoderConfig(config={**spec.clip, "image_size": spec.image_size})
    cfg = MLLMConfig(llm=llm, vision=vision, image_token_id=collator.image_token_id)
    torch.manual_seed(seed)
    return MultimodalLM(cfg)


def build_bench(
    spec: ModelSpec,
    mode: str,
    collator: Collator,
    samples: Sequence[dict],
    n_batches: int,
    lr: float = 1e-4,
    device: torch.device | None = None,
) -> Bench:
    """Model, components (projector with the encoder), AdamW and ``n_batches`` batches."""
    device = device or torch.device("cpu")
    model = build_model(spec, mode, collator).to(device)
    comps = Components.from_model(model, component_prefixes(model), {"encoder": lr, "llm": lr})
    opt = torch.optim.AdamW(comps.param_groups())
    b = spec.batch_size
    batches = [to_device(collator(samples[i * b : (i + 1) * b]), device) for i in range(n_batches)]
    params = [p for p in model.parameters() if p.requires_grad]
    n_all = sum(p.numel() for p in model.parameters())
    tokens = int(batches[0]["attention_mask"].sum())
    return Bench(model, comps, opt, batches, params, n_all, sum(p.numel() for p in params), tokens)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def targets_of(batch: dict[str, Any]) -> torch.Tensor:
    """Supervised next-token targets [T], row-major."""
    labels = batch["labels"]
    return labels[:, 1:][supervised_mask(labels)]


# ---- one step -----------------------------------------------------------------------------
def plain_step(bench: Bench, batch: dict[str, Any]) -> None:
    """Forward, CE, backward, clip, AdamW step: no meter."""
    logits, targets = bench.model.supervised_logits(batch)
    F.cross_entropy(logits.float(), targets).backward()
    torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
    bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)


def commit_step(bench: Bench, commit: CoMMIT, batch: dict[str, Any]) -> Any:
    """The README's CoMMIT step (forward through the meter ... after_step)."""
    logits = commit.forward(batch)
    ce = F.cross_entropy(logits.float(), targets_of(batch))
    commit.backward(ce, commit.aux_loss(logits))
    commit.after_backward()
    torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
    commit.before_step()
    bench.optimizer.step()
    report = commit.after_step()
    bench.optimizer.zero_grad(set_to_none=True)
    return report


def step_fn(bench: Bench, setting: Setting) -> Callable[[int], None]:
    """A callable running step ``i`` (batch ``i`` mod the fixed batches) of an arm."""
    if setting.plain:
        return lambda i: plain_step(bench, bench.batches[i % len(bench.batches)])
    commit = CoMMIT(
        bench.model, bench.optimizer, bench.components, setting.config(), total_steps=10**6
    )
    return lambda i: commit_step(bench, commit, bench.batches[i % len(bench.batches)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_block(fn: Callable[[int], None], n: int, device: torch.device) -> float:
    """Mean seconds per step over ``n`` steps."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    sync(device)
    return (time.perf_counter() - t0) / n
