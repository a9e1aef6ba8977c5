"""A causal LM in GGUF -> an ordinary Hugging Face folder (fp32 weights + tokenizer).

transformers de-quantizes a GGUF file itself (``from_pretrained(dir, gguf_file=...)``, with
the ``gguf`` package of the ``real`` extra). The folder it saves is a normal one: the GGUF
quantizer attributes and the ``quantization_config`` entry are dropped first (the tensors are
already fp32, and ``save_pretrained`` refuses a model that still claims to be quantized).
The tokenizer is saved beside the weights with ``<image>`` / ``<audio>`` given to two unused
special tokens (:func:`~commit_mllm.parts.tokenizer.rename_special_tokens`), so the
collator finds its placeholders and the embedding is not resized.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.tokenizer import rename_special_tokens

__all__ = ["check_llm_folder", "gguf_to_folder"]


def _drop_quantizer(model: Any) -> None:
    """Makes a de-quantized GGUF model savable as a plain fp32 model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def gguf_to_folder(
    gguf: Path,
    out: Path,
    renames: Mapping[int, tuple[str, str]],
    name: str,
    say: Say | None,
    usually: str = "~30 s",
) -> dict[str, Any]:
    """De-quantizes ``gguf`` with transformers and saves model + tokenizer into ``out``.

    Args:
        gguf: The ``.gguf`` file.
        out: Output folder (must exist, empty).
        renames: Special tokens to rename, ``id -> (expected text, new text)``.
        name: Recorded as the config's ``name_or_path``.
        say: Line printer for progress (``None``: silent).
        usually: How long the de-quantization usually takes (for the progress line).

    Returns:
        Report entries: parameter count, vocabulary, timings.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with phase(say, f"{name}: de-quantizing the GGUF weights with transformers", usually):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    t_load = time.perf_counter() - t0
    _drop_quantizer(model)
    model.config.name_or_path = name
    model.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    raw = out.parent / f"{out.name}-tokenizer-raw"
    tok.save_pretrained(str(raw))
    try:
        rename_special_tokens(raw, out / "tokenizer-tmp", renames)
        for path in (out / "tokenizer-tmp").iterdir():
            shutil.move(str(path), out / path.name)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(out / "tokenizer-tmp", ignore_errors=True)
    return {
        "architecture": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(model.get_input_embeddings().num_embeddings),
        "gguf_load_s": round(t_load, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check_llm_folder(folder: Path, prompt: str, say: Say | None) -> dict[str, Any]:
    """Reloads the folder as ordinary files and checks placeholders and a greedy answer.

    Args:
        folder: A folder written by :func:`gguf_to_folder`.
        prompt: A user message for the greedy sanity answer (chat template when present).
        say: Line printer for progress.

    Returns:
        Report entries: reload time, placeholder ids (single tokens, no resize), the greedy
        answer.

    Raises:
        ValueError: A placeholder is not one token, or the tokenizer would need new tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from commit_mllm.data.tokenizer import add_placeholder_tokens

    with phase(say, "checking the saved LLM (reload, placeholders, a greedy answer)", "~10 s"):
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        reload_s = time.perf_counter() - t0
        info = add_placeholder_tokens(tok)
        if info.needs_resize:
            raise ValueError(f"{folder}: <image>/<audio> are not tokens of the saved tokenizer")
        chat = bool(getattr(tok, "chat_template", None))
        text = prompt
        if chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = tok(text, return_tensors="pt", add_special_tokens=not chat)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        "reload_s": round(reload_s, 1),
        "placeholder_ids": {"image": info.image_token_id, "audio": info.audio_token_id},
        "needs_resize": False,
        "chat_template": chat,
        "greedy_sanity": {"prompt": prompt, "answer": answer.strip()},
    }
