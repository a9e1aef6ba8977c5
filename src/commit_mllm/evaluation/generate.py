"""Evaluation by greedy generation: exact-match accuracy, overall and per question type."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["evaluate", "normalize_answer"]

_PUNCT = re.compile(r"[^\w\s/-]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse spaces (exact match on short answers)."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    collator: Any,
    samples: Sequence[dict],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy-generate an answer for every sample and score exact match.

    Args:
        model: A :class:`~commit_mllm.models.MultimodalLM` (``generate(batch, ...)``).
        collator: Its collator (``generation_batch``, ``tokenizer``).
        samples: Samples whose last turn is the reference answer.
        batch_size: Generation batch size.
        max_new_tokens: Generation length.
        device: Device of the model.
        autocast: Context-manager factory (mixed precision).
        progress: Show a progress bar over the samples (tqdm, on stderr).

    Returns:
        ``({"accuracy": a, "accuracy/<type>": a_t, ..., "n": n}, predictions)`` where each
        prediction is ``{"id", "question_type", "prediction", "answer", "correct"}``.
    """
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext
    tok = collator.tokenizer
    preds: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc="eval", unit="sample")
    try:
        for i in range(0, len(samples), batch_size):
            rows = [samples[j] for j in range(i, min(i + batch_size, len(samples)))]
            batch = collator.generation_batch(rows)
            with autocast():
                out = model.generate(_to_device(batch, device), max_new_tokens=max_new_tokens)
            texts = tok.batch_decode(out, skip_special_tokens=True)
            types = batch.get("question_type") or [""] * len(rows)
            for sid, qt, text, ref in zip(batch["ids"], types, texts, batch["answers"]):
                ok = normalize_answer(text) == normalize_answer(ref)
                preds.append(
                    {
                        "id": sid,
                        "question_type": qt,
                        "prediction": text.strip(),
                        "answer": ref,
                        "correct": ok,
                    }
                )
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return _score(preds), preds


def _score(preds: list[dict]) -> dict[str, float]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for p in preds:
        if p["question_type"]:
            by_type[p["question_type"]].append(p["correct"])
    n = len(preds)
    out: dict[str, float] = {"accuracy": sum(p["correct"] for p in preds) / n if n else 0.0, "n": n}
    for qt in sorted(by_type):
        out[f"accuracy/{qt}"] = sum(by_type[qt]) / len(by_type[qt])
    return out
