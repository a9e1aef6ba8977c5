"""Synthetic media for the encoders' pretext tasks: PIL shape scenes and tone / chirp clips.

Neither generator ever touches a task's own images, clips or answers: they draw from their
own random streams, so a linear probe on the task afterwards measures transfer.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

__all__ = [
    "AUDIO_HEADS",
    "AUDIO_RATE",
    "EASY_VQA_RGB",
    "IMAGE_SIZE",
    "SHAPES",
    "VISION_HEADS",
    "synth_audio_scene",
    "synth_scene",
]

IMAGE_SIZE = 64
AUDIO_RATE = 16_000
# The 8 easy-vqa fill colours (measured from its PNGs); half of the synthetic shapes use
# one of them so the pretext covers the target palette, the rest use random colours.
EASY_VQA_RGB = (
    (0, 0, 0),
    (0, 0, 255),
    (165, 42, 42),
    (128, 128, 128),
    (0, 255, 0),
    (255, 0, 0),
    (0, 128, 128),
    (255, 255, 0),
)
SHAPES = ("circle", "rectangle", "triangle", "pentagon", "cross", "diamond")
VISION_HEADS = {"shape": 6, "hue": 13, "value": 3, "size": 3, "quadrant": 4}
"""Pretext targets of the vision encoder -> number of classes (hue: 12 bins + achromatic)."""
AUDIO_HEADS = {
    "count": 4,
    "first_pitch": 5,
    "first_dir": 3,
    "first_level": 3,
    "first_dur": 3,
    "last_pitch": 5,
    "last_dir": 3,
    "last_level": 3,
    "last_dur": 3,
}
"""Pretext targets of the audio encoder -> classes (pitch: 4 bins + noise; dir: flat/up/down)."""


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list:
    angles = rot + np.arange(n) * 2 * np.pi / n
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]


def _draw_shape(
    draw: Any, shape: str, cx: float, cy: float, r: float, rng: Any, fill: tuple
) -> None:
    """Draws one filled shape of "radius" ``r`` centred at (cx, cy) (2x canvas units)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "rectangle":
        aspect = float(np.exp(rng.uniform(-0.6, 0.6)))
        w, h = r * aspect**0.5, r / aspect**0.5
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rng.uniform(0, 2 * np.pi)), fill=fill)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, rng.uniform(0, 2 * np.pi)), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)
    else:  # cross: two bars
        t = r * rng.uniform(0.25, 0.4)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def _colour_labels(rgb: tuple[int, int, int]) -> tuple[int, int]:
    """(hue bin 0..11 or 12 = achromatic, value bin 0..2) of a fill colour."""
    h, sat, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    hue = 12 if sat < 0.25 or v < 0.15 else int(h * 12) % 12
    return hue, min(2, int(v * 3))


def synth_scene(
    rng: np.random.Generator, coverage: bool = False
) -> tuple[Any, dict[str, int]] | tuple[Any, dict[str, int], np.ndarray]:
    """One synthetic 64x64 scene for the vision pretext and its targets.

    A single filled shape (6 classes: circle, rectangle, triangle, pentagon, cross,
    diamond) of random size, position, rotation and colour (half the time one of the 8
    easy-vqa colours, otherwise uniform RGB) on a background like easy-vqa's (a light
    pastel, 80%) or a random mid/dark colour, drawn at 2x and downsampled (anti-aliased
    edges like the task's PNGs). No easy-vqa image is used.

    Args:
        rng: Random generator (all randomness comes from it).
        coverage: Also return the shape's coverage of a 32x32 grid (2x2-pixel cells).

    Returns:
        ``(PIL image RGB 64x64, targets)`` with keys of :data:`VISION_HEADS`, plus the
        float32 [32, 32] coverage in [0, 1] when ``coverage``.
    """
    from PIL import Image, ImageDraw

    big = 2 * IMAGE_SIZE
    if rng.random() < 0.8:
        bg = tuple(int(v) for v in rng.integers(220, 256, 3))
    else:
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
        fill = EASY_VQA_RGB[int(rng.integers(len(EASY_VQA_RGB)))]
    else:
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    size = int(rng.integers(3))
    r = rng.uniform(*((8, 16), (16, 30), (30, 48))[size])  # radius on the 2x canvas
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    shape = int(rng.integers(len(SHAPES)))
    img = Image.new("RGB", (big, big), bg)
    _draw_shape(ImageDraw.Draw(img), SHAPES[shape], cx, cy, r, rng, fill)
    # Pixels that differ from the background are the shape (read before downsampling).
    cover = np.any(np.asarray(img) != np.asarray(bg, dtype=np.uint8), axis=-1)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    hue, value = _colour_labels(fill)
    quadrant = int(cx >= big / 2) + 2 * int(cy >= big / 2)
    targets = {"shape": shape, "hue": hue, "value": value, "size": size, "quadrant": quadrant}
    if not coverage:
        return img, targets
    return img, targets, cover.reshape(32, big // 32, 32, big // 32).mean((1, 3), dtype=np.float32)


_PITCH_EDGES = np.log([200.0, 400.0, 800.0, 1600.0, 3200.0])
_LEVEL_EDGES = (0.2, 0.45)  # peak amplitude bins: soft / medium / loud
_DUR_EDGES = (0.2, 0.4)  # seconds: short / medium / long


def _event(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """One sound event (tone, chirp or noise burst) and its property labels."""
    from commit_mllm.tasks.tones_aqa import _fade

    dur = rng.uniform(0.08, 0.6)
    amp = float(np.exp(rng.uniform(np.log(0.05), np.log(0.9))))
    t = np.arange(int(dur * AUDIO_RATE)) / AUDIO_RATE
    kind = rng.choice(3, p=[0.45, 0.35, 0.2])
    if kind == 2:  # noise
        x = rng.standard_normal(t.size)
        x = x / (np.abs(x).max() + 1e-9)
        pitch, direction = 4, 0
    else:
        f0 = float(np.exp(rng.uniform(_PITCH_EDGES[0], _PITCH_EDGES[-1] - 1e-3)))
        if kind == 0:
            x, direction = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)), 0
        else:
            f1 = f0 * 2 ** (rng.choice([-1, 1]) * rng.uniform(0.7, 2.0))
            k = np.log(f1 / f0) / dur
            x, direction = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k), 1 if f1 > f0 else 2
        # The pitch bin is the geometric mean frequency (start for tones).
        mid = np.log(f0) if kind == 0 else 0.5 * (np.log(f0) + np.log(f1))
        pitch = int(np.clip(np.searchsorted(_PITCH_EDGES, mid) - 1, 0, 3))
    labels = {
        "pitch": pitch,
        "dir": direction,
        "level": int(np.searchsorted(_LEVEL_EDGES, amp)),
        "dur": int(np.searchsorted(_DUR_EDGES, dur)),
    }
    return _fade(amp * x), labels


def synth_audio_scene(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """One synthetic 1-2 s clip for the audio pretext and its targets.

    1-4 events in sequence (pure tones 200-3200 Hz, exponential chirps up or down, or
    white-noise bursts; 0.08-0.6 s; peak 0.05-0.9), random gaps and faint background
    noise. Targets (:data:`AUDIO_HEADS`): the number of events and, for the first and the
    last event, pitch bin (4 log bins or noise), direction (flat / up / down), level bin
    and duration bin. Generated from its own stream, never the tones-aqa clips.

    Args:
        rng: Random generator.

    Returns:
        ``(clip float32 [n] at 16 kHz, targets)``.
    """
    n = int(rng.integers(1, 5))
    events = [_event(rng) for _ in range(n)]
    gaps = [int(rng.uniform(0.05, 0.25) * AUDIO_RATE) for _ in range(n - 1)]
    body = sum(len(e) for e, _ in events) + sum(gaps)
    total = max(int(rng.uniform(1.0, 2.0) * AUDIO_RATE), body + AUDIO_RATE // 20)
    total = min(total, max(body, 2 * AUDIO_RATE))  # stay within one 2 s window when possible
    pos = int(rng.integers(0, total - body + 1))
    clip = rng.standard_normal(total) * rng.uniform(0.0, 0.01)
    for k, (e, _) in enumerate(events):
        clip[pos : pos + len(e)] += e
        pos += len(e) + (gaps[k] if k < len(gaps) else 0)
    first, last = events[0][1], events[-1][1]
    targets = {"count": n - 1}
    targets.update({f"first_{k}": v for k, v in first.items()})
    targets.update({f"last_{k}": v for k, v in last.items()})
    return np.clip(clip, -1, 1).astype(np.float32), targets
