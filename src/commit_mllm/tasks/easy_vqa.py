"""Built-in vision task ``easy-vqa``: the ``easy-vqa`` PyPI package as samples.

The package ships 4,000 train and 1,000 test 64x64 PNGs (one circle / rectangle /
triangle in one of 8 colours) and 38,575 train / 9,673 test ``[question, answer, image_id]``
triples. The question type is derived from the question text (see :func:`question_type`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from commit_mllm.data.sample import make_sample

YES_NO = "yes/no"
NEGATION = "negation"
COLOUR = "colour"
SHAPE = "shape"
QUESTION_TYPES = (YES_NO, NEGATION, COLOUR, SHAPE)
"""Question types, in a fixed order."""
SPLITS = ("train", "test")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def question_type(question: str) -> str:
    """Classify an easy-VQA question.

    Rule: questions starting with ``what`` ask for an attribute: ``colour`` if they contain
    ``color``, else ``shape`` (this includes "what is the red shape?"). The others are
    yes/no presence questions: ``negation`` if they contain the word ``not`` or ``no``
    ("is there not a ...", "is no ... present?", "does the image not contain ..."), else
    ``yes/no``.

    Args:
        question: Question text.

    Returns:
        One of :data:`QUESTION_TYPES`.
    """
    words = question.lower().replace("?", " ").split()
    if words and words[0] == "what":
        return COLOUR if "color" in words else SHAPE
    return NEGATION if {"not", "no"} & set(words) else YES_NO


@lru_cache(maxsize=2)
def _raw(split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], dict[int, str]]:
    """Questions, answers, image ids and image paths of a split (cached)."""
    import easy_vqa

    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return tuple(qs), tuple(ans), tuple(int(i) for i in ids), dict(paths)


def answers() -> list[str]:
    """The 13 possible answers (8 colours, 3 shapes, yes, no)."""
    import easy_vqa

    return list(easy_vqa.get_answers())


def load_easy_vqa(
    split: str = "train",
    seed: int = 0,
    max_samples: int | None = None,
    question_types: Sequence[str] | str | None = None,
) -> list[dict[str, Any]]:
    r"""Load easy-VQA samples.

    Args:
        split: ``"train"`` or ``"test"`` (the package's own split).
        seed: Seed of the subsampling (only used when ``max_samples`` cuts).
        max_samples: Keep a uniformly random subset of this size (chosen with ``seed``,
            returned in file order); ``None`` keeps all.
        question_types: Keep only these types (e.g. ``["colour"]``); ``None`` = full mix.

    Returns:
        Samples ``{"id", "image" (PNG path), "audio": None, "sampling_rate": None,
        "conversations", "question_type"}`` with the question as
        ``"<image>\n{question}"`` and the answer as the gpt turn.
    """
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split must be one of {SPLITS}, got {split!r}")
    types = _check_types(question_types)
    qs, ans, ids, paths = _raw(split)
    keep = [i for i, q in enumerate(qs) if question_type(q) in types]
    if max_samples is not None and max_samples < len(keep):
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(keep, size=max_samples, replace=False).tolist())
    return [
        make_sample(
            f"easy-vqa-{split}-{i}", qs[i], ans[i], question_type(qs[i]), image=paths[ids[i]]
        )
        for i in keep
    ]


def _check_types(question_types: Sequence[str] | str | None) -> set[str]:
    """Validate a question-type selection (``"color"`` is accepted for ``"colour"``)."""
    if question_types is None:
        return set(QUESTION_TYPES)
    if isinstance(question_types, str):
        question_types = [question_types]
    types = {"colour" if t == "color" else t for t in question_types}
    unknown = types - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"unknown easy-vqa question types {sorted(unknown)}; use {QUESTION_TYPES}")
    return types


def texts() -> Iterator[str]:
    """All question and answer texts of both splits (for tokenizer / LM pretraining)."""
    for split in SPLITS:
        qs, ans, _, _ = _raw(split)
        yield from qs
        yield from ans


def type_counts(samples: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Count samples per question type.

    Args:
        samples: Samples with a ``question_type``.

    Returns:
        ``{question_type: count}``.
    """
    counts: dict[str, int] = {}
    for s in samples:
        counts[s["question_type"]] = counts.get(s["question_type"], 0) + 1
    return counts
