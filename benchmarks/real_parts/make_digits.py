"""Spoken-digit audio questions made with espeak-ng (LLaVA-style JSONL + 16 kHz WAV files).

Three question types, one clip per sample:

* ``number``: one number 0-20 is said; "what number is said?" -> "7"
* ``parity``: one number 0-20 is said; "is the number even?" -> "yes" / "no"
* ``sum``:    two numbers 0-9 are said ("three, five"); "what is the sum of the two
  numbers?" -> "8"

Voices (espeak-ng's own, no mbrola), speaking rate and pitch vary per clip; the same clip
never appears in both splits (clips are drawn independently and the split is by seed).
Needs ``espeak-ng`` on the PATH (``apt-get install -y espeak-ng``).

Usage::

    python benchmarks/real_parts/make_digits.py --out runs/real_parts/digits \
        --train 1200 --test 240 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
VOICES = ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en+m3", "en-us+f2"]
QUESTIONS = {
    "number": "what number is said?",
    "parity": "is the number even?",
    "sum": "what is the sum of the two numbers?",
}
SR = 16000


def espeak_clip(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """Speaks ``text`` with espeak-ng; returns a 16 kHz float32 mono clip."""
    import soundfile as sf

    from commit_mllm.data.media import resample

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found: apt-get update && apt-get install -y espeak-ng")
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", f.name, text],
            check=True,
            capture_output=True,
        )
        audio, rate = sf.read(f.name, dtype="float32")
    if audio.ndim == 2:
        audio = audio.mean(1)
    # Trim espeak's leading/trailing silence (keeps 50 ms), then resample to 16 kHz.
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    if loud.size:
        pad = int(0.05 * rate)
        audio = audio[max(0, loud[0] - pad) : loud[-1] + pad]
    return resample(audio, rate, SR)


def make_sample(kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """(spoken text, answer) of one sample of question type ``kind``."""
    if kind == "sum":
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        return f"{WORDS[a]}, {WORDS[b]}", str(a + b)
    n = int(rng.integers(0, 21))
    if kind == "number":
        return WORDS[n], str(n)
    return WORDS[n], "yes" if n % 2 == 0 else "no"


def build(
    out: Path, n_train: int, n_test: int, seed: int, kinds: tuple[str, ...] = tuple(QUESTIONS)
) -> dict:
    """Writes ``out/{train,test}.jsonl`` and ``out/audio/*.wav``; returns a summary."""
    from commit_mllm.data.media import write_wav

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    n = n_train + n_test
    order = rng.permutation(n)  # the split by seed: which drawn samples are test
    test_ids = set(order[:n_test].tolist())
    rows = {"train": [], "test": []}
    for i in range(n):
        kind = kinds[i % len(kinds)]
        text, answer = make_sample(kind, rng)
        voice = VOICES[int(rng.integers(len(VOICES)))]
        speed, pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
        clip = espeak_clip(text, voice, speed, pitch)
        rel = f"audio/{i:05d}.wav"
        write_wav(out / rel, clip, SR)
        rows["test" if i in test_ids else "train"].append(
            {
                "id": f"{i:05d}",
                "audio": rel,
                "question_type": kind,
                "conversations": [
                    {"from": "human", "value": f"<audio>\n{QUESTIONS[kind]}"},
                    {"from": "gpt", "value": answer},
                ],
                "spoken": text,
                "voice": voice,
                "speed": speed,
                "pitch": pitch,
                "seconds": round(clip.size / SR, 3),
            }
        )
    for split, items in rows.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
    secs = [r["seconds"] for r in rows["train"] + rows["test"]]
    summary = {
        "train": len(rows["train"]),
        "test": len(rows["test"]),
        "seed": seed,
        "kinds": list(kinds),
        "voices": VOICES,
        "clip_seconds_mean": float(np.mean(secs)),
        "clip_seconds_max": float(np.max(secs)),
        "seconds_to_make": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="spoken-digit questions with espeak-ng")
    ap.add_argument("--out", default="runs/real_parts/digits")
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(QUESTIONS))
    args = ap.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("espeak-ng not found: apt-get update && apt-get install -y espeak-ng")
        return 2
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    summary = build(out, args.train, args.test, args.seed, tuple(args.kinds.split(",")))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
