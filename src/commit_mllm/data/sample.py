"""The sample dict every task yields: one question about an image and/or a clip, one answer."""

from __future__ import annotations

from typing import Any

from commit_mllm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN


def make_sample(
    sample_id: str,
    question: str,
    answer: str,
    question_type: str | None,
    *,
    image: Any = None,
    audio: Any = None,
    sampling_rate: int | None = None,
) -> dict[str, Any]:
    """One single-turn sample in the layout :class:`~commit_mllm.data.Collator` reads.

    The placeholders come first in the human turn, ``<image>`` before ``<audio>``, one for each
    medium given, so a task cannot put them anywhere the collator would not look.

    Args:
        sample_id: Unique id of the sample.
        question: The question text, without placeholders.
        answer: The reference answer (the gpt turn).
        question_type: The task's type label, or ``None``.
        image: A path or a ``PIL.Image``, or ``None``.
        audio: A path or a float32 waveform ``[n_samples]``, or ``None``.
        sampling_rate: The waveform's rate in Hz (``None`` for a path or no audio).

    Returns:
        ``{"id", "image", "audio", "sampling_rate", "conversations", "question_type"}``.
    """
    tokens = [t for t, media in ((IMAGE_TOKEN, image), (AUDIO_TOKEN, audio)) if media is not None]
    return {
        "id": sample_id,
        "image": image,
        "audio": audio,
        "sampling_rate": sampling_rate,
        "conversations": [
            {"from": "human", "value": "\n".join([*tokens, question])},
            {"from": "gpt", "value": answer},
        ],
        "question_type": question_type,
    }
