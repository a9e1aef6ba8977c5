"""Clotho-AQA (Lipping et al., 2022): audio question answering, three annotators per question.

Published layout (``src`` is this folder)::

    clotho_aqa_train.csv   file_name,QuestionText,answer,confidence   (one row per
    clotho_aqa_val.csv     annotator: each question appears three times)
    clotho_aqa_test.csv
    audio_files/<file_name>.wav

The rows of one (file, question) pair become one sample: the training target is the
majority answer (ties: the answer with more "yes" confidence, then the first given) and
every annotator's answer goes to ``meta["answers"]``. The question type is ``yes_no`` when
the majority answer is yes/no, else ``single_word``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from commit_mllm.formats import (
    SHORT_ANSWER,
    FormatError,
    check_media,
    check_split,
    find_dir,
    make_row,
    read_csv,
)

__all__ = ["COLUMNS", "SPLITS", "majority", "read"]

SPLITS = ("train", "val", "test")
DATASET = "ClothoAQA"
COLUMNS = ("file_name", "QuestionText", "answer")
CONFIDENCE = {"yes": 2, "maybe": 1, "no": 0}


def majority(answers: list[str], confidences: list[str]) -> str:
    """The most frequent answer; ties go to the higher total confidence, then the first.

    Args:
        answers: Every annotator's answer.
        confidences: Their confidence (``yes`` / ``maybe`` / ``no``; others count as 0).
    """
    keys = [a.strip().lower() for a in answers]
    counts = Counter(keys)
    conf: dict[str, int] = {}
    for key, c in zip(keys, confidences):
        conf[key] = conf.get(key, 0) + CONFIDENCE.get(c.strip().lower(), 0)
    best = max(counts, key=lambda k: (counts[k], conf.get(k, 0), -keys.index(k)))
    return best


def _read_csv(path: Path) -> list[dict[str, str]]:
    return read_csv(
        path,
        DATASET,
        COLUMNS,
        "clotho_aqa_{train,val,test}.csv with columns file_name,QuestionText,answer,confidence",
    )


def read(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read one split of Clotho-AQA, one sample per (audio file, question).

    Args:
        src: Folder with ``clotho_aqa_<split>.csv`` (or that file).
        split: ``train``, ``val`` or ``test``.
        media_root: Folder containing ``audio_files/`` (default: the CSV's folder).

    Returns:
        Rows with ``meta = {"format", "answers", "confidences", "answer_type"}``.
    """
    check_split(split, SPLITS, DATASET)
    path = src if src.is_file() else src / f"clotho_aqa_{split}.csv"
    rows = _read_csv(path)
    audio_dir = find_dir(media_root or path.parent, ["audio_files", ""], DATASET, "audio")
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row["file_name"].strip() or not row["QuestionText"].strip():
            raise FormatError(f"{path.name} line {lineno}: empty file_name or QuestionText")
        groups.setdefault((row["file_name"].strip(), row["QuestionText"].strip()), []).append(row)
    per_file: Counter[str] = Counter()
    out = []
    for (file_name, question), group in groups.items():
        audio = check_media(
            audio_dir / file_name, f"{path.name}", DATASET, "expected audio_files/<file_name>"
        )
        answers = [r["answer"].strip() for r in group]
        confidences = [r.get("confidence", "").strip() for r in group]
        answer = majority(answers, confidences)
        qtype = "yes_no" if answer in ("yes", "no") else "single_word"
        meta = {
            "format": "clothoaqa",
            "answers": answers,
            "confidences": confidences,
            "answer_type": qtype,
        }
        sample_id = f"{file_name}#{per_file[file_name]}"
        per_file[file_name] += 1
        prompt = f"{question}\n{SHORT_ANSWER}"
        out.append(make_row(sample_id, "audio", audio, prompt, answer, qtype, meta))
    return out
