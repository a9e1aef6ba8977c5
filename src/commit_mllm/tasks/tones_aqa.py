"""Built-in audio task ``tones-aqa``: synthetic audio question answering.

Clips are synthesized with numpy at 16 kHz (1-2 s each). Four question types:

* ``count``: 1-4 pure tones in sequence; "how many tones are there?" -> one..four.
* ``pitch``: one exponential chirp sweeping up or down; "does the pitch go up or down?"
  -> up / down.
* ``loudness``: two tones at different levels (>= 8 dB apart); "is the first tone louder
  than the second?" (or the reverse wording) -> yes / no.
* ``duration``: two sounds (tone or noise burst each) of different lengths (ratio >= 2);
  "is the first sound longer than the second?" (or the reverse) -> yes / no.

Sample ``i`` of a split has type ``TYPES[i % 4]`` and its answer cycles through that type's
answers, so any prefix of a split is balanced; every other parameter is drawn from
``np.random.default_rng([seed, split_index, i])``. Same seed -> identical samples; train and
test use different streams. Audio is synthesized on access (a 2,000-clip split would be
~200 MB of float32 otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from commit_mllm.data.sample import make_sample

SAMPLING_RATE = 16_000
COUNT, PITCH, LOUDNESS, DURATION = "count", "pitch", "loudness", "duration"
QUESTION_TYPES = (COUNT, PITCH, LOUDNESS, DURATION)
"""Question types; sample ``i`` has type ``QUESTION_TYPES[i % 4]``."""
ANSWERS = {
    COUNT: ("one", "two", "three", "four"),
    PITCH: ("up", "down"),
    LOUDNESS: ("yes", "no"),
    DURATION: ("yes", "no"),
}
"""Possible answers per question type."""
QUESTIONS = {
    COUNT: ("how many tones are there?", "how many tones do you hear?"),
    PITCH: ("does the pitch go up or down?", "is the sweep going up or down?"),
    LOUDNESS: (
        "is the first tone louder than the second?",
        "is the second tone louder than the first?",
    ),
    DURATION: (
        "is the first sound longer than the second?",
        "is the second sound longer than the first?",
    ),
}
"""Question wordings per type; for loudness / duration the second wording reverses the order."""
SPLIT_SIZES = {"train": 2000, "test": 400}
_SPLIT_INDEX = {"train": 0, "test": 1}

# Generator parameters (seconds, Hz, linear amplitude); documented in docs/tasks.md.
CLIP_SECONDS = (1.0, 2.0)
TONE_HZ = (220.0, 1760.0)
FADE_SECONDS = 0.01
BACKGROUND_NOISE = (0.0, 0.01)


def _tone(
    rng: np.random.Generator, seconds: float, amp: float, freq: float | None = None
) -> np.ndarray:
    """A sine tone with 10 ms raised-cosine fades (fades avoid clicks that sound like onsets)."""
    freq = freq if freq is not None else float(np.exp(rng.uniform(*np.log(TONE_HZ))))
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    return _fade(amp * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)))


def _noise(rng: np.random.Generator, seconds: float, amp: float) -> np.ndarray:
    """A white-noise burst with fades, scaled to peak ``amp``."""
    x = rng.standard_normal(int(seconds * SAMPLING_RATE))
    return _fade(amp * x / (np.abs(x).max() + 1e-9))


def _chirp(rng: np.random.Generator, seconds: float, up: bool) -> np.ndarray:
    """An exponential sweep spanning at least 1.5 octaves, rising if ``up``."""
    lo = float(np.exp(rng.uniform(np.log(200.0), np.log(500.0))))
    hi = lo * 2 ** rng.uniform(1.5, 2.5)
    f0, f1 = (lo, hi) if up else (hi, lo)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    k = np.log(f1 / f0) / seconds
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    return _fade(rng.uniform(0.3, 0.8) * np.sin(phase))


def _fade(x: np.ndarray) -> np.ndarray:
    """Apply raised-cosine fade-in and fade-out."""
    n = min(int(FADE_SECONDS * SAMPLING_RATE), len(x) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
    x = x.copy()
    x[:n] *= ramp
    x[len(x) - n :] *= ramp[::-1]
    return x


def _place(
    rng: np.random.Generator, events: list[np.ndarray], gap: tuple[float, float]
) -> np.ndarray:
    """Lay events out in order with random gaps inside a 1-2 s clip plus faint noise."""
    gaps = [int(rng.uniform(*gap) * SAMPLING_RATE) for _ in events[1:]]
    body = sum(len(e) for e in events) + sum(gaps)
    total = max(int(rng.uniform(*CLIP_SECONDS) * SAMPLING_RATE), body + SAMPLING_RATE // 20)
    pos = int(rng.integers(0, total - body + 1))
    clip = rng.standard_normal(total) * rng.uniform(*BACKGROUND_NOISE)
    for k, event in enumerate(events):
        clip[pos : pos + len(event)] += event
        pos += len(event) + (gaps[k] if k < len(gaps) else 0)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def synthesize(qtype: str, answer: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Synthesize a clip whose correct answer is ``answer``.

    Args:
        qtype: One of :data:`QUESTION_TYPES`.
        answer: One of ``ANSWERS[qtype]``.
        rng: Random generator for all parameters.

    Returns:
        ``(clip, question)``: float32 ``[n_samples]`` at 16 kHz (1-2 s) and the question text.
    """
    wording = int(rng.integers(0, 2))
    question = QUESTIONS[qtype][wording]
    if qtype == COUNT:
        n = ANSWERS[COUNT].index(answer) + 1
        events = [_tone(rng, rng.uniform(0.12, 0.25), rng.uniform(0.3, 0.8)) for _ in range(n)]
        return _place(rng, events, (0.08, 0.2)), question
    if qtype == PITCH:
        return _place(rng, [_chirp(rng, rng.uniform(0.5, 1.2), answer == "up")], (0, 0)), question
    # Two-event comparisons: "first > second" is true iff the answer and wording agree.
    first_bigger = (answer == "yes") == (wording == 0)
    if qtype == LOUDNESS:
        loud = rng.uniform(0.5, 0.9)
        quiet = loud * 10 ** (-rng.uniform(8, 20) / 20)  # 8-20 dB softer
        amps = (loud, quiet) if first_bigger else (quiet, loud)
        events = [_tone(rng, rng.uniform(0.25, 0.45), a) for a in amps]
        return _place(rng, events, (0.1, 0.3)), question
    long_s = rng.uniform(0.45, 0.8)
    short_s = long_s / rng.uniform(2.0, 3.5)
    durs = (long_s, short_s) if first_bigger else (short_s, long_s)
    amp = rng.uniform(0.3, 0.7)  # same level so loudness does not hint at length
    events = [_noise(rng, d, amp) if rng.random() < 0.5 else _tone(rng, d, amp) for d in durs]
    return _place(rng, events, (0.1, 0.25)), question


class TonesAQA(Dataset):
    """A split of tones-aqa; samples are synthesized deterministically on access.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: Generator seed (train and test of one seed never share a stream).
        size: Number of samples; default 2000 (train) / 400 (test).
        question_types: Keep only these types; ``None`` = all four (balanced).
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        question_types: list[str] | tuple[str, ...] | str | None = None,
    ) -> None:
        types = check_split_and_types("tones-aqa", split, question_types, QUESTION_TYPES)
        self.split, self.seed, self.types = split, seed, types
        self.size = SPLIT_SIZES[split] if size is None else size

    def __len__(self) -> int:
        """Number of samples."""
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index``: ``audio`` is float32 ``[n_samples]`` at 16 kHz."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        qtype = self.types[index % len(self.types)]
        answers = ANSWERS[qtype]
        answer = answers[(index // len(self.types)) % len(answers)]
        rng = np.random.default_rng([self.seed, _SPLIT_INDEX[self.split], index])
        clip, question = synthesize(qtype, answer, rng)
        sample_id = f"tones-aqa-{self.split}-{self.seed}-{index}"
        return make_sample(
            sample_id, question, answer, qtype, audio=clip, sampling_rate=SAMPLING_RATE
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Iterate over all samples."""
        return (self[i] for i in range(self.size))


def load_tones_aqa(
    split: str = "train",
    seed: int = 0,
    max_samples: int | None = None,
    size: int | None = None,
    question_types: list[str] | tuple[str, ...] | str | None = None,
) -> TonesAQA:
    """Load a tones-aqa split.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: Generator seed.
        max_samples: Cap on the number of samples (a balanced prefix of the split).
        size: Split size before the cap; default 2000 train / 400 test.
        question_types: Subset of :data:`QUESTION_TYPES`; ``None`` = all.

    Returns:
        A :class:`TonesAQA` dataset.
    """
    return TonesAQA(split, seed, capped_size(SPLIT_SIZES, split, size, max_samples), question_types)


def check_split_and_types(
    task: str,
    split: str,
    question_types: Sequence[str] | str | None,
    all_types: tuple[str, ...],
) -> tuple[str, ...]:
    """Validate a synthetic task's split and question types (shared with tones-shapes).

    Returns:
        The question types to cycle through (``all_types`` for ``None``).

    Raises:
        ValueError: Unknown split or question type, naming the task and what is allowed.
    """
    if split not in _SPLIT_INDEX:
        raise ValueError(f"{task} split must be 'train' or 'test', got {split!r}")
    if isinstance(question_types, str):
        question_types = [question_types]
    types = tuple(question_types) if question_types is not None else all_types
    unknown = set(types) - set(all_types)
    if unknown:
        raise ValueError(f"unknown {task} question types {sorted(unknown)}; use {all_types}")
    return types


def capped_size(
    sizes: dict[str, int], split: str, size: int | None, max_samples: int | None
) -> int:
    """A split's size (``size`` or the default of ``sizes``), capped at ``max_samples``."""
    n = sizes.get(split, 0) if size is None else size
    return n if max_samples is None else min(n, max_samples)


def texts() -> Iterator[str]:
    """Every question wording and answer of the task (for the tiny tokenizer / LM)."""
    for qtype in QUESTION_TYPES:
        yield from QUESTIONS[qtype]
        yield from ANSWERS[qtype]


def export_wavs(dataset: TonesAQA, folder: str | os.PathLike, json_name: str | None = None) -> Path:
    """Write every clip as a 16-bit WAV plus a LLaVA JSON list referencing them.

    Args:
        dataset: The split to export.
        folder: Output folder (created); WAVs go to ``folder/audio/<id>.wav``.
        json_name: Name of the JSON file; default ``"<split>.json"``.

    Returns:
        Path of the JSON file, loadable with :func:`commit_mllm.data.load_llava`.
    """
    from commit_mllm.data.llava_json import save_llava_json
    from commit_mllm.data.media import write_wav

    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in dataset:
        rel = f"audio/{sample['id']}.wav"
        write_wav(folder / rel, sample["audio"], SAMPLING_RATE)
        rows.append({**sample, "audio": rel, "sampling_rate": None})
    out = folder / (json_name or f"{dataset.split}.json")
    save_llava_json(rows, out)
    return out
