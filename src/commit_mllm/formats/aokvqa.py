"""A-OKVQA v1.0 (Schwenk et al., 2022): commonsense VQA on COCO 2017 images.

Published layout (the A-OKVQA README's ``datasets/`` folder: annotations and COCO images
side by side)::

    datasets/
      aokvqa/aokvqa_v1p0_train.json   [{question_id, image_id, question, choices (4),
      aokvqa/aokvqa_v1p0_val.json       correct_choice_idx, direct_answers (10),
      aokvqa/aokvqa_v1p0_test.json      difficult_direct_answer, rationales (3)}, ...]
      coco/train2017/<image_id:012d>.jpg   (val2017/ for the val split)

``src`` may be ``datasets/``, ``datasets/aokvqa/`` or one annotation file. COCO is looked
for beside the annotations (``coco/<split>2017/`` next to ``aokvqa/``, or ``<split>2017/``
in the annotation folder) unless ``media_root`` (``--coco-dir``) names the COCO folder
(holding ``<split>2017/``, or the images themselves).

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


def _annotation(src: Path, split: str) -> Path:
    """The split's annotation file: ``src`` itself, in ``src``, or in ``src/aokvqa``."""
    if src.is_file():
        return src
    name = f"aokvqa_v1p0_{split}.json"
    for folder in (src, src / "aokvqa"):
        if (folder / name).is_file():
            return folder / name
    return src / name  # not found: read_json names it


def _questions(src: Path, split: str) -> tuple[Path, list[Any]]:
    if split == "test":
        raise FormatError(
            f"{DATASET}: the test split has no answers (it is scored on the A-OKVQA "
            "leaderboard); use train or val"
        )
    check_split(split, SPLITS, DATASET)
    path = _annotation(src, split)
    where = src if src.is_file() else f"{src} or {src / 'aokvqa'}"
    data = read_json(path, DATASET, f"aokvqa_v1p0_{split}.json in {where} ({EXPECTED})")
    if not isinstance(data, list):
        raise FormatError(f"{DATASET}: '{path.name}' must be {EXPECTED}")
    return path, data


def _coco_dir(annotations: Path, split: str, media_root: Path | None) -> Path:
    """The folder of the split's COCO images (see the module docstring for where)."""
    images = f"{split}2017"
    if media_root is not None:
        candidates = [images, f"coco/{images}", ""]
        return find_dir(media_root, candidates, DATASET, f"COCO {images} image")
    # datasets/aokvqa/<file> -> datasets/coco/<split>2017 (the published layout) first.
    candidates = [f"../coco/{images}", f"coco/{images}", images, f"../{images}"]
    return find_dir(annotations, candidates, DATASET, f"COCO {images} image (pass --coco-dir)")


def _read(src: Path, split: str, media_root: Path | None, mode: str) -> list[dict[str, Any]]:
    path, data = _questions(src, split)
    coco = _coco_dir(path.parent, split, media_root)
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
            f"expected <coco>/{split}2017/<image_id:012d>.jpg; pass the COCO folder as "
            "--coco-dir / media_root",
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
        src: ``datasets/``, the folder with ``aokvqa_v1p0_<split>.json``, or that file.
        split: ``train`` or ``val``.
        media_root: COCO folder containing ``<split>2017/`` (default: found beside the
            annotations).

    Returns:
        Rows with ``meta = {"format", "question_id", "choices", "correct_choice_idx",
        "direct_answers", "difficult_direct_answer"}``.
    """
    return _read(src, split, media_root, "mc")


def read_direct_answer(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read A-OKVQA as direct answer (answers are the most frequent direct answer).

    Args:
        src: ``datasets/``, the folder with ``aokvqa_v1p0_<split>.json``, or that file.
        split: ``train`` or ``val``.
        media_root: COCO folder containing ``<split>2017/`` (default: found beside the
            annotations).

    Returns:
        Rows with the same ``meta`` as :func:`read` (``format`` = ``aokvqa-da``).
    """
    return _read(src, split, media_root, "da")
