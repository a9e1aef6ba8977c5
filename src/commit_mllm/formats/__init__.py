r"""Readers of the paper's six datasets in their published on-disk layouts.

CoMMIT (arXiv 2407.20454) evaluates on TextVQA, IconQA and A-OKVQA (vision) and ClothoAQA,
MACS and the Song Describer Dataset (audio). Each module here reads one dataset as its
authors distribute it (annotation files plus media folders; see ``docs/paper_tasks.md``)
and yields the project's LLaVA-style rows::

    {"id": "textvqa-34602", "image": "/data/textvqa/train_images/0054c91397f2fe05.jpg",
     "conversations": [{"from": "human", "value": "<image>\nwhat is ...?\nAnswer ..."},
                       {"from": "gpt", "value": "nokia"}],
     "question_type": "textvqa",
     "meta": {"format": "textvqa", "answers": ["nokia", ...]}}

``meta`` carries what the dataset's metric needs (all ten TextVQA answers, A-OKVQA choices
and direct answers, ClothoAQA per-annotator answers, every reference caption of a clip).
:func:`load_llava` ignores it, so a converted file trains like any other LLaVA JSONL;
:func:`commit_mllm.evaluation.metrics.score` and :mod:`commit_mllm.training.paper_eval` read it.

Entry points: :func:`convert` (dataset folder -> JSONL) and :func:`load_format` (dataset
folder -> validated samples in memory).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from commit_mllm.data.llava_json import DataFormatError, validate_row
from commit_mllm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN

__all__ = [
    "FORMATS",
    "FormatError",
    "convert",
    "format_modality",
    "load_format",
    "read_format",
    "write_jsonl",
]

FORMATS: dict[str, str] = {
    "textvqa": "textvqa",
    "iconqa": "iconqa",
    "aokvqa": "aokvqa",
    "aokvqa-da": "aokvqa",
    "clothoaqa": "clothoaqa",
    "macs": "macs",
    "sdd": "sdd",
}
"""Format name -> module of :mod:`commit_mllm.formats` that reads it."""

_MODALITY = {"textvqa": "image", "iconqa": "image", "aokvqa": "image", "aokvqa-da": "image"}

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short-answer VQA."""
MC_ANSWER = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's instruction for multiple-choice questions."""
LETTERS = "ABCDEFGHIJ"


class FormatError(DataFormatError):
    """A dataset folder does not match its published layout; the message names the file."""


# ---- helpers shared by the dataset modules --------------------------------------------------
def make_row(
    sample_id: str,
    modality: str,
    media: str | os.PathLike,
    prompt: str,
    answer: str,
    question_type: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """One single-turn LLaVA-style row with the modality placeholder and a ``meta`` dict.

    Args:
        sample_id: Unique id of the row.
        modality: ``image`` or ``audio``.
        media: Path of the media file.
        prompt: The instruction (question plus answer-format hint).
        answer: The training target (the reference answer).
        question_type: Reported per type by the metrics.
        meta: Metric fields; must contain ``format``.

    Returns:
        The row dict.
    """
    token = IMAGE_TOKEN if modality == "image" else AUDIO_TOKEN
    return {
        "id": sample_id,
        modality: str(media),
        "conversations": [
            {"from": "human", "value": f"{token}\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": question_type,
        "meta": meta,
    }


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    """LLaVA-1.5's multiple-choice prompt: question, ``A. choice`` lines, the instruction."""
    lines = [question.strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join([*lines, MC_ANSWER])


def read_json(path: Path, dataset: str, expected: str) -> Any:
    """Parse a JSON annotation file; a missing or invalid file is a :class:`FormatError`."""
    if not path.is_file():
        raise FormatError(f"{dataset}: annotation file '{path}' not found; expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"{dataset}: '{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); expected {expected}"
        ) from None


def read_csv(path: Path, dataset: str, columns: Sequence[str], expected: str) -> list[dict]:
    """Rows of an annotation CSV (keys and values stripped), checking its required columns.

    Raises:
        FormatError: The file is missing or lacks a column; the message names the file and
            says what was ``expected``.
    """
    import csv

    if not path.is_file():
        raise FormatError(f"{dataset}: annotation file '{path}' not found; expected {expected}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise FormatError(
                f"{dataset}: '{path.name}' lacks column(s) {', '.join(missing)} "
                f"(header: {','.join(header) or 'empty'}; expected {expected})"
            )
        return [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]


def require(row: Any, keys: Iterable[str], where: str, expected: str) -> None:
    """Raise a :class:`FormatError` naming ``where`` if ``row`` lacks one of ``keys``."""
    if not isinstance(row, dict):
        raise FormatError(f"{where}: expected an object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise FormatError(f"{where}: missing field '{key}' ({expected})")


def find_dir(root: Path, candidates: Sequence[str], dataset: str, what: str) -> Path:
    """The first existing folder among ``root / c`` (``""`` = ``root`` itself; ``..`` allowed).

    Raises:
        FormatError: None exists; the message lists every place looked at.
    """
    paths = [Path(os.path.normpath(root / name)) if name else root for name in candidates]
    for path in paths:
        if path.is_dir():
            return path
    looked = ", ".join(f"'{p}'" for p in paths)
    raise FormatError(f"{dataset}: {what} folder not found (looked at {looked})")


def check_media(path: Path, where: str, dataset: str, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise a :class:`FormatError` naming it."""
    if not path.is_file():
        raise FormatError(f"{where}: {dataset} media file '{path}' not found ({hint})")
    return path


def hash_split(key: str, test_percent: int = 10) -> str:
    """Deterministic ``train`` / ``test`` split by the MD5 of ``key`` (stable across runs)."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < test_percent else "train"


def check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    """Raise a :class:`FormatError` if ``split`` is not one of ``allowed``."""
    if split not in allowed:
        raise FormatError(f"{dataset}: unknown split {split!r} (use {', '.join(allowed)})")


# ---- registry and entry points -------------------------------------------------------------
def _reader(format_name: str) -> Callable[..., list[dict[str, Any]]]:
    if format_name not in FORMATS:
        raise ValueError(f"unknown dataset format {format_name!r} (use {', '.join(FORMATS)})")
    module = importlib.import_module(f"commit_mllm.formats.{FORMATS[format_name]}")
    if format_name == "aokvqa-da":
        return module.read_direct_answer
    return module.read


def format_modality(format_name: str) -> str:
    """``image`` for the vision formats, ``audio`` for the audio ones."""
    if format_name not in FORMATS:
        raise ValueError(f"unknown dataset format {format_name!r} (use {', '.join(FORMATS)})")
    return _MODALITY.get(format_name, "audio")


def read_format(
    format_name: str,
    src: str | os.PathLike,
    split: str = "train",
    media_root: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Read a dataset in its published layout into LLaVA-style rows (with ``meta``).

    Args:
        format_name: One of :data:`FORMATS`.
        src: The dataset's annotation folder (or its main annotation file).
        split: The split to read (which splits exist depends on the dataset).
        media_root: Folder holding the dataset's media folder when it is not ``src``
            (COCO for A-OKVQA, TAU Urban Acoustic Scenes 2019 for MACS).

    Returns:
        Rows with absolute media paths, every media file checked to exist.

    Raises:
        FormatError: The folder does not match the layout (names the file and what was
            expected).
        ValueError: Unknown format.
    """
    src_path = Path(src).expanduser().resolve()
    if not src_path.exists():
        raise FormatError(f"{format_name}: dataset path '{src_path}' does not exist")
    root = Path(media_root).expanduser().resolve() if media_root is not None else None
    return _reader(format_name)(src_path, split, root)


def write_jsonl(
    rows: Iterable[dict[str, Any]], path: str | os.PathLike, relative_to: str | None = None
) -> int:
    """Write rows as JSONL (``meta`` kept); return the row count.

    Args:
        rows: Rows from :func:`read_format`.
        path: Output file (parent folders are created).
        relative_to: Write media paths relative to this folder (for ``data.media_root``)
            instead of absolute.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            if relative_to is not None:
                row = dict(row)
                for key in ("image", "audio"):
                    if row.get(key) is not None:
                        row[key] = os.path.relpath(row[key], relative_to)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def convert(
    format_name: str,
    src: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    split: str = "train",
    media_root: str | os.PathLike | None = None,
    relative_to: str | os.PathLike | None = None,
) -> int:
    """Convert a dataset in its published layout to a LLaVA-style JSONL file.

    Args:
        format_name: One of :data:`FORMATS`.
        src: The dataset's annotation folder (or main annotation file).
        out_jsonl: Output JSONL path.
        split: Split to convert.
        media_root: Folder of the dataset's media when not under ``src``.
        relative_to: Write media paths relative to this folder (default: absolute).

    Returns:
        The number of rows written.

    Raises:
        FormatError: The dataset folder does not match the layout.
    """
    rows = read_format(format_name, src, split, media_root)
    rel = None if relative_to is None else str(Path(relative_to).expanduser().resolve())
    return write_jsonl(rows, out_jsonl, rel)


def load_format(
    format_name: str,
    src: str | os.PathLike,
    split: str = "train",
    media_root: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Read a dataset directly into validated samples (what :func:`load_llava` yields).

    Each sample also keeps the row's ``meta`` (metric fields).

    Args:
        format_name: One of :data:`FORMATS`.
        src: The dataset's annotation folder (or main annotation file).
        split: Split to read.
        media_root: Folder of the dataset's media when not under ``src``.

    Returns:
        Sample dicts (``id``, ``image``, ``audio``, ``sampling_rate``, ``conversations``,
        ``question_type``, ``meta``).
    """
    rows = read_format(format_name, src, split, media_root)
    samples = []
    for index, row in enumerate(rows):
        # Media were checked by the reader already; skip the second stat() per row.
        sample = validate_row(row, f"{format_name} row {index}", None, check_files=False)
        sample["meta"] = row["meta"]
        samples.append(sample)
    return samples
