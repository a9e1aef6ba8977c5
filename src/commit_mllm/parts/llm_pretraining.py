"""Causal-LM pretraining of the tiny Llama on a task's question + answer text only.

The LLM learns the prompt template, the questions and the answer prior p(answer | question):
exactly the shortcut that lets an MLLM ignore its encoder (biased learning).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.tokenizer import token_ids

if TYPE_CHECKING:
    from commit_mllm.parts.settings import PretrainSettings

__all__ = ["LLM_MS_PER_STEP", "llm_corpus", "pretrain_llm", "warmup_cosine"]

LLM_MS_PER_STEP = 65
"""Measured ms per pretraining step (batch 32, 2 threads, idle 2-core machine): for 'usually'."""


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


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def pretrain_llm(tok: Any, s: PretrainSettings, out: Path, say: Say | None) -> dict[str, Any]:
    """Pretrains the tiny Llama as a causal LM on the task's text and saves it to ``out``.

    Every token of ``<s>USER: {q} ASSISTANT: {a}</s>`` is a target, so the model learns
    the template, the questions and the answer prior p(a | q).

    Args:
        tok: The tiny tokenizer.
        s: Settings.
        out: Output folder (``save_pretrained``).
        say: Line printer for progress (``None``: silent).

    Returns:
        Metrics: steps, final / held-out loss and perplexity, answer-token accuracy.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from commit_mllm.data import Collator

    ids = token_ids(tok)
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
    from commit_mllm.tasks import base_task

    corpus = llm_corpus(base_task(s.task), s.seed)  # a variant's LLM is its base task's
    held_out, corpus = corpus[:512], corpus[512:]
    steps, bsz = s.scaled(s.llm_steps), s.llm_batch
    opt = torch.optim.AdamW(model.parameters(), lr=s.llm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: warmup_cosine(i, steps, max(1, steps // 20))
    )
    model.train()
    t0, losses = time.perf_counter(), []
    usually = f"~{math.ceil(steps * LLM_MS_PER_STEP / 1000)} s on an idle machine"
    with phase(say, f"{s.task}: pretraining the tiny LLM ({steps} steps)", usually, steps) as bar:
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
            bar.update()
            bar.set_postfix_str(f"loss {losses[-1]:.3f}")
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
