"""TextVQA 0.5.1 (Singh et al., 2019): questions about text in images, ten answers each.

Published layout (``src`` is this folder, or the annotation file itself)::

    TextVQA_0.5.1_train.json     {"dataset_name": "textvqa", "data": [row, ...]}
    TextVQA_0.5.1_val.json       row: question_id, image_id, question, answers (10), ...
    train_images/<image_id>.jpg  train *and* val images (train_val_images.zip)

The test annotations carry no answers, so only ``train`` and ``val`` convert. The training
target is the most frequent of the ten answers; all ten go to ``meta["answers"]`` for VQA
soft accuracy.
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
    read_json,
    require,
)

__all__ = ["SPLITS", "annotation_file", "read"]

SPLITS = ("train", "val")
DATASET = "TextVQA"
EXPECTED = "TextVQA_0.5.1_{train,val}.json from the TextVQA 0.5.1 release"
ROW_FIELDS = ("question_id", "image_id", "question", "answers")


def annotation_file(src: Path, split: str) -> Path:
    """The annotation file of ``split``: ``src`` itself if it is a file."""
    return src if src.is_file() else src / f"TextVQA_0.5.1_{split}.json"


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer (ties: the one given first)."""
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


def _rows(data: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise FormatError(
            f"{DATASET}: '{path.name}' must be a JSON object with a 'data' list of "
            f"questions ({EXPECTED})"
        )
    return data["data"]


def read(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read one split of TextVQA.

    Args:
        src: Folder with ``TextVQA_0.5.1_<split>.json`` (or that file).
        split: ``train`` or ``val``.
        media_root: Folder containing ``train_images/`` (default: the annotation folder).

    Returns:
        Rows with ``meta = {"format", "answers", "question_id", "image_id"}``.
    """
    check_split(split, SPLITS, DATASET)
    path = annotation_file(src, split)
    rows = _rows(read_json(path, DATASET, EXPECTED), path)
    images = find_dir(media_root or path.parent, ["train_images", ""], DATASET, "image")
    out = []
    for index, row in enumerate(rows):
        where = f"{path.name} data[{index}]"
        require(row, ROW_FIELDS, where, "a TextVQA question row")
        answers = row["answers"]
        if not isinstance(answers, list) or not answers:
            raise FormatError(f"{where}: 'answers' must be a non-empty list of strings")
        hint = "expected train_images/<image_id>.jpg"
        image = check_media(images / f"{row['image_id']}.jpg", where, DATASET, hint)
        meta = {
            "format": "textvqa",
            "answers": [str(a) for a in answers],
            "question_id": row["question_id"],
            "image_id": row["image_id"],
        }
        prompt = f"{row['question'].strip()}\n{SHORT_ANSWER}"
        out.append(
            make_row(
                str(row["question_id"]),
                "image",
                image,
                prompt,
                majority_answer(answers),
                "textvqa",
                meta,
            )
        )
    return out
