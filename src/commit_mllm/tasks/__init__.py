"""Built-in tasks behind one registry.

``easy-vqa`` (vision), ``tones-aqa`` (audio) and ``tones-shapes`` (an image and a sound per
question: vision + audio + LLM, three components).

Must-learn variants (:data:`VARIANTS`) keep a base task's data and questions but come with
tiny parts whose encoder was pretrained blind to one feature the questions need:
``easy-vqa-colourblind`` (the vision tower's stem reads one luminance channel and its pretext
has no colour targets) and ``tones-aqa-pitchblind`` (the audio encoder's stem reads one
energy value per frame and its pretext has no pitch or sweep targets). A frozen encoder cannot
answer those questions; training it can (:mod:`commit_mllm.parts.encoder_pretraining`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from commit_mllm.tasks import easy_vqa, tones_aqa, tones_shapes

VARIANTS = {
    "easy-vqa-colourblind": ("easy-vqa", "colour"),
    "tones-aqa-pitchblind": ("tones-aqa", "pitch"),
}
"""Must-learn variant -> (base task, the feature its pretrained encoder withholds)."""
TEXT_TASKS = ("easy-vqa", "tones-aqa")
"""The tasks whose texts train the one tiny tokenizer (``task_texts("all")``)."""
TASKS = ("easy-vqa", "tones-aqa", "tones-shapes", *VARIANTS)
"""Names accepted by :func:`load_task`."""
PRETRAIN_TASKS = ("easy-vqa", "tones-aqa", *VARIANTS)
"""Tasks with tiny pretrained parts (one per encoder); ``tones-shapes`` combines both."""
MODALITY = {
    "easy-vqa": "image",
    "tones-aqa": "audio",
    "tones-shapes": "image+audio",
    **{name: "image" if base == "easy-vqa" else "audio" for name, (base, _) in VARIANTS.items()},
}
"""The input modality of each task."""
_MODULES = {"easy-vqa": easy_vqa, "tones-aqa": tones_aqa, "tones-shapes": tones_shapes}


def _check(name: str) -> None:
    """Raise a clear error for an unknown task name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")


def base_task(name: str) -> str:
    """The task whose data a task name reads (a variant's base; else the name itself)."""
    _check(name)
    return VARIANTS[name][0] if name in VARIANTS else name


def withheld_feature(name: str) -> str | None:
    """The feature a must-learn variant's pretrained encoder lacks (``None`` for others)."""
    _check(name)
    return VARIANTS[name][1] if name in VARIANTS else None


def load_task(
    name: str,
    split: str = "train",
    seed: int = 0,
    max_samples: int | None = None,
    question_types: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> Sequence[dict[str, Any]]:
    """Load the samples of a built-in task.

    Args:
        name: A name of :data:`TASKS` (a variant loads its base task's samples).
        split: ``"train"`` or ``"test"``.
        seed: Subsampling seed (easy-vqa) or generator seed (tones-aqa).
        max_samples: Cap on the number of samples; ``None`` = whole split.
        question_types: Keep only these question types; ``None`` = the full mix.
        **kwargs: Task-specific options (tones-aqa, tones-shapes: ``size``).

    Returns:
        A sequence of samples (easy-vqa: a list; tones-aqa and tones-shapes: a ``torch``
        Dataset whose samples are synthesized on access). All support ``len`` and indexing.
    """
    name = base_task(name)
    if name == "easy-vqa":
        return easy_vqa.load_easy_vqa(split, seed, max_samples, question_types, **kwargs)
    if name == "tones-shapes":
        return tones_shapes.load_tones_shapes(
            split, seed, max_samples, question_types=question_types, **kwargs
        )
    return tones_aqa.load_tones_aqa(
        split, seed, max_samples, question_types=question_types, **kwargs
    )


def task_texts(name: str) -> Iterator[str]:
    """All question and answer texts of a task (no placeholders).

    Use them to train the tiny tokenizer and to pretrain a tiny language model.

    Args:
        name: Task name, or ``"all"`` for the :data:`TEXT_TASKS` (the texts the tiny
            tokenizer is trained on, so cached pretrained parts stay valid).

    Yields:
        Question and answer strings.
    """
    if name == "all":
        for task in TEXT_TASKS:
            yield from task_texts(task)
        return
    yield from _MODULES[base_task(name)].texts()


def task_answers(name: str) -> list[str]:
    """The closed answer set of a task.

    Args:
        name: Task name.

    Returns:
        Sorted possible answers.
    """
    name = base_task(name)
    if name == "easy-vqa":
        return sorted(easy_vqa.answers())
    if name == "tones-shapes":
        return sorted({"yes", "no", *tones_shapes.COLOURS, *tones_shapes.SHAPES})
    return sorted({a for answers in tones_aqa.ANSWERS.values() for a in answers})


def task_question_types(name: str) -> tuple[str, ...]:
    """The question types of a task.

    Args:
        name: Task name.

    Returns:
        The task's question types in a fixed order.
    """
    return tuple(_MODULES[base_task(name)].QUESTION_TYPES)


__all__ = [
    "MODALITY",
    "PRETRAIN_TASKS",
    "TASKS",
    "TEXT_TASKS",
    "VARIANTS",
    "base_task",
    "load_task",
    "task_answers",
    "task_question_types",
    "task_texts",
    "withheld_feature",
]
