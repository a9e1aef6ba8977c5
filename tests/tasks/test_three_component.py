"""tones-shapes (a task that needs an image and a sound) and a vision + audio + LLM model."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from commit_mllm.tasks.tones_shapes import QUESTION_TYPES, load_tones_shapes

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "three_component", ROOT / "benchmarks" / "three_component.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def _same(a: dict, b: dict) -> bool:
    return (
        a["conversations"] == b["conversations"]
        and np.array_equal(a["audio"], b["audio"])
        and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    )


def test_tones_shapes_is_deterministic_and_balanced():
    a, b = load_tones_shapes("train", 0, size=24), load_tones_shapes("train", 0, size=24)
    assert all(_same(a[i], b[i]) for i in range(24))
    other = load_tones_shapes("train", 1, size=24)
    assert not all(_same(a[i], other[i]) for i in range(24))
    test = load_tones_shapes("test", 0, size=24)
    assert not _same(a[0], test[0])  # train and test never share a stream
    s = a[0]
    first = s["conversations"][0]["value"]
    assert "<image>" in first and "<audio>" in first
    assert s["image"].size == (64, 64) and s["audio"].dtype == np.float32
    assert 1.0 * 16000 <= len(s["audio"]) <= 2.0 * 16000 + 1
    types = [a[i]["question_type"] for i in range(24)]
    assert set(types) == set(QUESTION_TYPES)
    answers = [
        a[i]["conversations"][1]["value"] for i in range(24) if a[i]["question_type"] != "select"
    ]
    assert answers.count("yes") == answers.count("no")


def test_count_clip_has_the_tones_it_claims():
    data = load_tones_shapes("train", 0, size=30, question_types="count")
    for s in data:
        x = np.abs(s["audio"])
        env = np.convolve(x, np.ones(160) / 160, mode="same") > 0.05
        onsets = int(np.sum(env[1:] & ~env[:-1]))
        assert onsets in (3, 4)


def test_vision_audio_llm_trains_three_steps_with_finite_kappa_c():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    bench = _bench()
    parts = bench.random_parts(n_train=16, n_test=4, seed=0)
    batch = parts.collator([parts.train[i] for i in range(4)])
    assert "pixel_values" in batch and "input_features" in batch
    ids = batch["input_ids"]
    assert (ids == parts.collator.image_token_id).sum() == 4
    assert (ids == parts.collator.audio_token_id).sum() == 4
    out = bench.train_run(
        parts, "commit", steps=3, seed=0, batch_size=4, log=lambda _m: None, exact=True
    )
    last = out["records"][-1]
    for c in ("vision", "audio", "llm"):
        assert math.isfinite(last[f"kappa_c/{c}"]) and last[f"kappa_c/{c}"] > 0
        assert math.isfinite(last[f"D/{c}"])
        assert 0.0 <= last[f"share/{c}"] <= 1.0
    assert math.isfinite(out["final_loss"])
