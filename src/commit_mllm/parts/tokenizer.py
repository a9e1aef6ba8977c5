"""Tokenizers of the parts: the shared tiny BPE, and placeholder tokens in real tokenizers.

The collator needs ``<image>`` / ``<audio>`` to encode as one id each. The tiny tokenizer
has them as special tokens. A real LLM's tokenizer gets them by *renaming* two special tokens
that instruction data never uses (Gemma's ``<unused0>`` / ``<unused1>``; SmolLM2's code-data
markers ``<repo_name>`` / ``<reponame>``): the model keeps its embedding size (no resize, no
untrained rows in the output softmax), and since the model replaces a placeholder's
embedding by the encoder's features, the renamed rows are never read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_tokenizer", "rename_special_tokens", "token_ids"]


def token_ids(tok: Any) -> dict[str, int]:
    """The ids an MLLM config needs from a tokenizer (vocabulary size, special tokens)."""
    from commit_mllm.data import AUDIO_TOKEN, IMAGE_TOKEN

    return {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN),
        "audio_token_id": tok.convert_tokens_to_ids(AUDIO_TOKEN),
    }


def build_tiny_tokenizer(folder: Path) -> Any:
    """Trains the shared tiny tokenizer on both tasks' texts and saves it to ``folder``."""
    from commit_mllm.data import train_tiny_tokenizer
    from commit_mllm.tasks import task_texts

    tok = train_tiny_tokenizer(task_texts("all"))
    tok.save_pretrained(str(folder))
    return tok


def rename_special_tokens(src: Path, dst: Path, renames: Mapping[int, tuple[str, str]]) -> None:
    """Copies a saved tokenizer folder, renaming special tokens by id.

    Args:
        src: Folder written by ``tokenizer.save_pretrained``.
        dst: Output folder (must not exist).
        renames: ``id -> (expected current text, new text)``, e.g.
            ``{6: ("<unused0>", "<image>")}``; a token whose text differs from the expected
            one is refused (never silently overwrite a real token).

    Raises:
        ValueError: A renamed id is missing or holds another token.
    """
    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    data = json.loads(path.read_text())
    found = set()
    for entry in data.get("added_tokens", []):
        if entry["id"] not in renames:
            continue
        old, new = renames[entry["id"]]
        if entry["content"] != old:
            raise ValueError(f"token id {entry['id']} is {entry['content']!r}, expected {old!r}")
        entry["content"], entry["special"] = new, True
        vocab = data["model"]["vocab"]
        if isinstance(vocab, dict) and old in vocab:
            vocab[new] = vocab.pop(old)
        elif isinstance(vocab, list) and vocab[entry["id"]][0] == old:
            vocab[entry["id"]] = [new, vocab[entry["id"]][1]]
        found.add(entry["id"])
    if found != set(renames):
        raise ValueError(f"token ids {sorted(set(renames) - found)} are not special tokens")
    path.write_text(json.dumps(data, ensure_ascii=False))
    cfg_path = dst / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        dec = cfg.get("added_tokens_decoder", {})
        for i, (_old, new) in renames.items():
            if str(i) in dec:
                dec[str(i)]["content"] = new
        # Lists of extra special tokens name them by text.
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(cfg.get(key), list):
                cfg[key] = [_renamed(t, renames) for t in cfg[key]]
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _renamed(token: Any, renames: Mapping[int, tuple[str, str]]) -> Any:
    for old, new in renames.values():
        if token == old:
            return new
    return token
