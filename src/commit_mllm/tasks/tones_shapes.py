"""tones-shapes: a synthetic task that needs both an image and a sound to answer.

Every sample pairs a 64x64 easy-vqa-style picture (one filled circle, rectangle or triangle
in one of the 8 easy-vqa colours on a white background, drawn with PIL) with a tones clip
(numpy, 16 kHz, 1-2 s, from the tones-aqa generators). Three question types, each
unanswerable from one modality alone:

==========  ==========================================================  ==================
type        question                                                    answers
==========  ==========================================================  ==================
``and``     "is the shape red and does the pitch go up?" (chirp clip)   yes / no
``select``  "if the pitch goes up say the color, else say the shape"    8 colours, 3 shapes
``count``   "are there as many tones as the shape has corners?"         yes / no
==========  ==========================================================  ==================

Single-modality ceilings (the best a model that only looks, or only listens, can do):

* ``and``: half yes (colour and direction as asked); the no answers are half wrong colour,
  half wrong direction. One modality alone: 0.75 (blind: 0.5).
* ``select``: half the clips sweep up (answer: one of 8 colours), half down (one of 3
  shapes). Image only: 0.5 (it must guess which attribute); audio only: ~0.23.
* ``count``: a triangle (3 corners) or rectangle (4 corners) with 3 or 4 tones, half
  matching. Image only and audio only: 0.5.

Sample ``i`` has type ``QUESTION_TYPES[i % 3]``; its answer cycles through the type's
balanced answer list, and every other parameter comes from
``numpy.random.default_rng([seed, split, i])`` (train 0, test 1): deterministic per seed,
train and test never share a stream. Samples have both ``image`` (a PIL image) and
``audio`` keys, and both ``<image>`` and ``<audio>`` in the first human turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from commit_mllm.data.sample import make_sample
from commit_mllm.tasks.tones_aqa import (
    _SPLIT_INDEX,
    SAMPLING_RATE,
    _chirp,
    _place,
    _tone,
    capped_size,
    check_split_and_types,
)

__all__ = [
    "COLOURS",
    "QUESTION_TYPES",
    "SHAPES",
    "TonesShapes",
    "load_tones_shapes",
    "render_shape",
    "texts",
]

AND, SELECT, COUNT = "and", "select", "count"
QUESTION_TYPES = (AND, SELECT, COUNT)
"""Question types; sample ``i`` has type ``QUESTION_TYPES[i % 3]``."""
COLOURS = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "green": (0, 255, 0),
    "red": (255, 0, 0),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
}
"""The easy-vqa colours (names as easy-vqa spells them)."""
SHAPES = ("circle", "rectangle", "triangle")
CORNERS = {"triangle": 3, "rectangle": 4}
SPLIT_SIZES = {"train": 3000, "test": 300}
IMAGE_SIZE = 64
_DIRECTION = {True: "up", False: "down"}
_SELECT_Q = "if the pitch goes up say the color of the shape, else say the shape"
_COUNT_Q = "are there as many tones as the shape has corners?"
# Balanced answer cycles: "and" = (yes, no-colour, yes, no-pitch); "select" alternates an
# up sweep (8 colours, 3 times) and a down sweep (3 shapes, 8 times): 48 cases.
_AND_CASES = ("yes", "no-colour", "yes", "no-pitch")
_SELECT_CASES = tuple(
    case
    for pair in zip([("up", c) for c in COLOURS] * 3, [("down", s) for s in SHAPES] * 8)
    for case in pair
)


def render_shape(shape: str, colour: str, rng: np.random.Generator) -> Any:
    """A 64x64 RGB picture of one filled ``shape`` in ``colour`` on white (easy-vqa style).

    Args:
        shape: One of :data:`SHAPES`.
        colour: One of :data:`COLOURS`.
        rng: Random generator for size, position and rotation.

    Returns:
        A ``PIL.Image.Image``.
    """
    from PIL import Image, ImageDraw

    big = 2 * IMAGE_SIZE
    img = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(18, 44)
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "rectangle":
        aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
        w, h = r * aspect**0.5, r / aspect**0.5
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    else:
        rot = rng.uniform(0, 2 * np.pi)
        angles = rot + 2 * np.pi * np.arange(3) / 3
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=fill)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _other(rng: np.random.Generator, options: Sequence[str], not_this: str) -> str:
    rest = [o for o in options if o != not_this]
    return rest[int(rng.integers(len(rest)))]


def _and_sample(case: str, rng: np.random.Generator) -> tuple[str, str, np.ndarray, str, str]:
    """(shape, colour, clip, question, answer) of an ``and`` question."""
    asked_colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    asked_up = bool(rng.integers(2))
    colour_ok = case in ("yes", "no-pitch")  # the no cases: one conjunct false
    pitch_ok = case in ("yes", "no-colour")
    colour = asked_colour if colour_ok else _other(rng, list(COLOURS), asked_colour)
    up = asked_up if pitch_ok else not asked_up
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    clip = _place(rng, [_chirp(rng, rng.uniform(0.5, 1.2), up)], (0, 0))
    question = f"is the shape {asked_colour} and does the pitch go {_DIRECTION[asked_up]}?"
    return shape, colour, clip, question, "yes" if case == "yes" else "no"


def _select_sample(case: tuple[str, str], rng: np.random.Generator) -> tuple:
    """(shape, colour, clip, question, answer) of a ``select`` question."""
    direction, answer = case
    if direction == "up":
        colour, shape = answer, SHAPES[int(rng.integers(len(SHAPES)))]
    else:
        shape, colour = answer, list(COLOURS)[int(rng.integers(len(COLOURS)))]
    clip = _place(rng, [_chirp(rng, rng.uniform(0.5, 1.2), direction == "up")], (0, 0))
    return shape, colour, clip, _SELECT_Q, answer


def _count_sample(index: int, rng: np.random.Generator) -> tuple:
    """(shape, colour, clip, question, answer) of a ``count`` question."""
    yes = index % 2 == 0
    shape = ("triangle", "rectangle")[(index // 2) % 2]
    corners = CORNERS[shape]
    n = corners if yes else _other_count(corners)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    events = [_tone(rng, rng.uniform(0.1, 0.18), rng.uniform(0.3, 0.8)) for _ in range(n)]
    return shape, colour, _place(rng, events, (0.06, 0.14)), _COUNT_Q, "yes" if yes else "no"


def _other_count(corners: int) -> int:
    """The near miss: 4 tones for a triangle, 3 for a rectangle (so counts alone say nothing)."""
    return 7 - corners


class TonesShapes(Dataset):
    """A split of tones-shapes; samples are synthesized deterministically on access.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: Generator seed.
        size: Number of samples; default 3000 (train) / 300 (test).
        question_types: Keep only these types; ``None`` = all three.
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        question_types: Sequence[str] | str | None = None,
    ) -> None:
        types = check_split_and_types("tones-shapes", split, question_types, QUESTION_TYPES)
        self.split, self.seed, self.types = split, seed, types
        self.size = SPLIT_SIZES[split] if size is None else size

    def __len__(self) -> int:
        """Number of samples."""
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` with ``image`` (PIL) and ``audio`` (float32, 16 kHz)."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        qtype = self.types[index % len(self.types)]
        k = index // len(self.types)
        rng = np.random.default_rng([self.seed, _SPLIT_INDEX[self.split], index])
        if qtype == AND:
            shape, colour, clip, question, answer = _and_sample(
                _AND_CASES[k % len(_AND_CASES)], rng
            )
        elif qtype == SELECT:
            case = _SELECT_CASES[k % len(_SELECT_CASES)]
            shape, colour, clip, question, answer = _select_sample(case, rng)
        else:
            shape, colour, clip, question, answer = _count_sample(k, rng)
        return make_sample(
            f"tones-shapes-{self.split}-{self.seed}-{index}",
            question,
            answer,
            qtype,
            image=render_shape(shape, colour, rng),
            audio=clip,
            sampling_rate=SAMPLING_RATE,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Iterate over all samples."""
        return (self[i] for i in range(self.size))


def load_tones_shapes(
    split: str = "train",
    seed: int = 0,
    max_samples: int | None = None,
    size: int | None = None,
    question_types: Sequence[str] | str | None = None,
) -> TonesShapes:
    """Load a tones-shapes split (``max_samples`` takes a balanced prefix)."""
    n = capped_size(SPLIT_SIZES, split, size, max_samples)
    return TonesShapes(split, seed, n, question_types)


def texts() -> Iterator[str]:
    """Every question and answer text of the task (for tokenizers and LM pretraining)."""
    for colour in COLOURS:
        for d in _DIRECTION.values():
            yield f"is the shape {colour} and does the pitch go {d}?"
    yield _SELECT_Q
    yield _COUNT_Q
    yield from ("yes", "no", *COLOURS, *SHAPES)
