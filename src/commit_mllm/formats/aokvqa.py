"""A-OKVQA v1.0 (Schwenk et al., 2022): commonsense VQA on COCO 2017 images.

Published layout (``src`` is the annotation folder or one annotation file; ``media_root``
is the COCO folder, default ``src``)::

    aokvqa_v1p0_train.json   [{question_id, image_id, question, choices (4),
    aokvqa_v1p0_val.json       correct_choice_idx, direct_answers (10),
                               difficult_direct_answer, rationales (3)}, ...]
    <coco>/train2017/<image_id:012d>.jpg   (val2017/ for the val split)

Two formats read it: ``aokvqa`` (multiple choice: lettered options, answered by letter)
and ``aokvqa-da`` (direct answer: answered by the most frequent direct answer). Both keep
choices, the correct index and the ten direct answers in ``meta``, so either is scored on
both settings. The test file has no answers and is not converted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from commit_mllm.formats import (
    LETTERS,
    SHORT_ANSWER,
    FormatError,
    check_media,
    check_split,
    find_dir,
    make_row,
    mc_prompt,
    read_json,
    require,
)

__all__ = ["SPLITS", "read", "read_direct_answer"]

SPLITS = ("train", "val")
DATASET = "A-OKVQA"
EXPECTED = "a JSON list of questions as in aokvqa_v1p0_{train,val}.json"
FIELDS = ("question_id", "image_id", "question", "choices", "correct_choice_idx", "direct_answers")


def _questions(src: Path, split: str) -> tuple[Path, list[Any]]:
    check_split(split, SPLITS, DATASET)
    path = src if src.is_file() else src / f"aokvqa_v1p0_{split}.json"
    data = read_json(path, DATASET, f"aokvqa_v1p0_{split}.json ({EXPECTED})")
    if not isinstance(data, list):
        raise FormatError(f"{DATASET}: '{path.name}' must be {EXPECTED}")
    return path, data


def _read(src: Path, split: str, media_root: Path | None, mode: str) -> list[dict[str, Any]]:
    path, data = _questions(src, split)
    coco = find_dir(
        media_root or path.parent,
        [f"{split}2017", f"coco/{split}2017", ""],
        DATASET,
        f"COCO {split}2017 image",
    )
    out = []
    for index, q in enumerate(data):
        where = f"{path.name}[{index}]"
        require(q, FIELDS, where, "an A-OKVQA question")
        choices, idx = [str(c) for c in q["choices"]], q["correct_choice_idx"]
        if not isinstance(idx, int) or not 0 <= idx < len(choices) or len(choices) > 10:
            raise FormatError(f"{where}: 'correct_choice_idx' must index one of the choices")
        answers = [str(a) for a in q["direct_answers"]]
        if not answers:
            raise FormatError(f"{where}: 'direct_answers' must be a non-empty list")
        image = check_media(
            coco / f"{int(q['image_id']):012d}.jpg",
            where,
            DATASET,
            f"expected <coco>/{split}2017/<image_id:012d>.jpg; pass the COCO folder as media_root",
        )
        meta = {
            "format": "aokvqa" if mode == "mc" else "aokvqa-da",
            "question_id": str(q["question_id"]),
            "choices": choices,
            "correct_choice_idx": idx,
            "direct_answers": answers,
            "difficult_direct_answer": bool(q.get("difficult_direct_answer", False)),
        }
        question = str(q["question"]).strip()
        if mode == "mc":
            prompt, answer, qtype = mc_prompt(question, choices), LETTERS[idx], "multiple_choice"
        else:
            prompt = f"{question}\n{SHORT_ANSWER}"
            answer, qtype = Counter(answers).most_common(1)[0][0], "direct_answer"
        out.append(make_row(str(q["question_id"]), "image", image, prompt, answer, qtype, meta))
    return out


def read(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read A-OKVQA as multiple choice (answers are option letters).

    Args:
        src: Folder with ``aokvqa_v1p0_<split>.json`` (or that file).
        split: ``train`` or ``val``.
        media_root: COCO folder containing ``<split>2017/`` (default: ``src``).

    Returns:
        Rows with ``meta = {"format", "question_id", "choices", "correct_choice_idx",
        "direct_answers", "difficult_direct_answer"}``.
    """
    return _read(src, split, media_root, "mc")


def read_direct_answer(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read A-OKVQA as direct answer (answers are the most frequent direct answer).

    Args:
        src: Folder with ``aokvqa_v1p0_<split>.json`` (or that file).
        split: ``train`` or ``val``.
        media_root: COCO folder containing ``<split>2017/`` (default: ``src``).

    Returns:
        Rows with the same ``meta`` as :func:`read` (``format`` = ``aokvqa-da``).
    """
    return _read(src, split, media_root, "da")
