"""Tests of the built-in tasks (easy-vqa, tones-aqa) and the task registry."""

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from commit_mllm.data import load_llava
from commit_mllm.tasks import (
    MODALITY,
    TASKS,
    load_task,
    task_answers,
    task_question_types,
    task_texts,
)
from commit_mllm.tasks.easy_vqa import question_type, type_counts
from commit_mllm.tasks.tones_aqa import SAMPLING_RATE, TonesAQA, export_wavs


def _digest(samples):
    h = hashlib.sha256()
    for s in samples:
        h.update(repr((s["id"], s["conversations"], s["question_type"])).encode())
        if isinstance(s["audio"], np.ndarray):
            h.update(s["audio"].tobytes())
        else:
            h.update(str(s["image"]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- easy-vqa
@pytest.mark.parametrize(
    ("question", "qtype"),
    [
        ("is there a red shape?", "yes/no"),
        ("does the image contain a circle?", "yes/no"),
        ("is there not a blue shape in the image?", "negation"),
        ("is no triangle present?", "negation"),
        ("does the image not contain a gray shape?", "negation"),
        ("what color is the shape?", "colour"),
        ("what is the color of the circle?", "colour"),
        ("what is the red shape?", "shape"),
        ("what shape does the image contain?", "shape"),
    ],
)
def test_easy_vqa_question_type_rule(question, qtype):
    assert question_type(question) == qtype


def test_easy_vqa_full_train_split_counts_and_answers():
    train = load_task("easy-vqa", "train")
    assert len(train) == 38_575
    assert type_counts(train) == {
        "yes/no": 14_187,
        "negation": 14_220,
        "colour": 5_166,
        "shape": 5_002,
    }
    answers = Counter((s["question_type"], s["conversations"][1]["value"]) for s in train)
    assert {a for (t, a) in answers if t in ("yes/no", "negation")} == {"yes", "no"}
    assert {a for (t, a) in answers if t == "shape"} == {"circle", "rectangle", "triangle"}
    assert len({a for (t, a) in answers if t == "colour"}) == 8
    # The language prior: presence questions are mostly "no", negations mostly "yes".
    assert answers["yes/no", "no"] == 11_608 and answers["negation", "yes"] == 11_650
    sample = train[0]
    assert sample["conversations"][0]["value"].startswith("<image>\n")
    assert Path(sample["image"]).is_file() and sample["audio"] is None
    assert len(load_task("easy-vqa", "test")) == 9_673


def test_easy_vqa_subsampling_and_type_selection():
    a = load_task("easy-vqa", "train", seed=3, max_samples=200)
    b = load_task("easy-vqa", "train", seed=3, max_samples=200)
    c = load_task("easy-vqa", "train", seed=4, max_samples=200)
    assert len(a) == 200 and _digest(a) == _digest(b) != _digest(c)
    colour = load_task("easy-vqa", "test", question_types=["colour"])
    assert len(colour) == 1_280 and {s["question_type"] for s in colour} == {"colour"}
    assert len(load_task("easy-vqa", "test", question_types="color", max_samples=10)) == 10
    with pytest.raises(ValueError, match="unknown easy-vqa question types"):
        load_task("easy-vqa", question_types=["size"])
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("easy-vqa", "val")


# --------------------------------------------------------------------------- tones-aqa
def _events(clip, frame=80, threshold=0.02):
    """(start, end, rms-peak, zero-crossing rates of both halves) of sounds in a clip."""
    n = len(clip) // frame
    rms = np.sqrt((clip[: n * frame].reshape(n, frame) ** 2).mean(axis=1))
    active = np.concatenate([[False], rms > threshold, [False]])
    edges = np.flatnonzero(np.diff(active.astype(int)))
    out = []
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        seg = clip[start * frame : end * frame]
        half = len(seg) // 2
        zcr = [np.mean(np.abs(np.diff(np.sign(p))) > 0) for p in (seg[:half], seg[half:])]
        out.append((start, end, rms[start:end].max(), zcr))
    return out


def test_tones_aqa_clips_match_their_answers():
    ds = TonesAQA("test", seed=0, size=120)
    words = {"one": 1, "two": 2, "three": 3, "four": 4}
    for s in ds:
        clip, question = s["audio"], s["conversations"][0]["value"]
        answer, qtype = s["conversations"][1]["value"], s["question_type"]
        assert clip.dtype == np.float32 and s["sampling_rate"] == SAMPLING_RATE
        assert SAMPLING_RATE <= len(clip) <= 2 * SAMPLING_RATE and np.abs(clip).max() <= 1
        assert question.startswith("<audio>\n")
        ev = _events(clip)
        if qtype == "count":
            assert len(ev) == words[answer], s["id"]
            continue
        if qtype == "pitch":
            assert len(ev) == 1
            assert (ev[0][3][1] > ev[0][3][0]) == (answer == "up"), s["id"]
            continue
        assert len(ev) == 2, s["id"]
        first, second = ev
        if "second" in question.split("than")[0]:  # "is the second ... than the first?"
            first, second = second, first
        if qtype == "loudness":
            first_bigger = first[2] > second[2]
        else:
            first_bigger = (first[1] - first[0]) > (second[1] - second[0])
        assert first_bigger == (answer == "yes"), s["id"]


def test_tones_aqa_is_deterministic_and_seeded():
    a = [TonesAQA("train", seed=0, size=40)[i] for i in range(40)]
    b = list(load_task("tones-aqa", "train", seed=0, max_samples=40))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(list(TonesAQA("train", seed=1, size=40)))
    assert _digest(a) != _digest(list(TonesAQA("test", seed=0, size=40)))
    assert not np.array_equal(a[0]["audio"], a[4]["audio"])  # same type, different clip


def test_tones_aqa_split_sizes_types_and_balanced_answers():
    assert len(load_task("tones-aqa", "train")) == 2000
    test = load_task("tones-aqa", "test")
    assert len(test) == 400 and len(load_task("tones-aqa", "test", size=50)) == 50
    counts = Counter((s["question_type"], s["conversations"][1]["value"]) for s in test)
    assert counts == {
        ("count", "one"): 25,
        ("count", "two"): 25,
        ("count", "three"): 25,
        ("count", "four"): 25,
        ("pitch", "up"): 50,
        ("pitch", "down"): 50,
        ("loudness", "yes"): 50,
        ("loudness", "no"): 50,
        ("duration", "yes"): 50,
        ("duration", "no"): 50,
    }
    pitch = load_task("tones-aqa", "train", question_types=["pitch"], max_samples=10)
    assert {s["question_type"] for s in pitch} == {"pitch"}
    with pytest.raises(ValueError, match="unknown tones-aqa question types"):
        load_task("tones-aqa", question_types=["timbre"])


def test_tones_aqa_export_wavs_roundtrip(tmp_path):
    ds = TonesAQA("test", seed=5, size=4)
    path = export_wavs(ds, tmp_path)
    loaded = load_llava(path, load_media=True)
    assert len(loaded) == 4
    for orig, back in zip(ds, loaded, strict=True):
        assert back["conversations"] == orig["conversations"] and back["id"] == orig["id"]
        assert np.abs(back["audio"] - orig["audio"]).max() < 1e-3  # 16-bit quantisation


# --------------------------------------------------------------------------- registry
def test_registry_texts_answers_and_errors():
    assert TASKS[:3] == ("easy-vqa", "tones-aqa", "tones-shapes")
    assert MODALITY["tones-aqa"] == "audio"
    assert MODALITY["tones-shapes"] == "image+audio"
    # "all" stays the two single-modality tasks: the cached tiny tokenizer is trained on them.
    assert list(task_texts("all")) == [*task_texts("easy-vqa"), *task_texts("tones-aqa")]
    shapes = load_task("tones-shapes", "test", max_samples=6)
    assert len(shapes) == 6 and shapes[0]["image"] is not None and shapes[0]["audio"] is not None
    assert task_question_types("tones-shapes") == ("and", "select", "count")
    assert {shapes[i]["conversations"][1]["value"] for i in range(6)} <= set(
        task_answers("tones-shapes")
    )
    texts = list(task_texts("tones-aqa"))
    assert "how many tones are there?" in texts and "four" in texts
    assert not any("<audio>" in t for t in texts)
    vqa = set(task_texts("easy-vqa"))
    assert "what color is the shape?" in vqa and "teal" in vqa
    assert len(task_answers("easy-vqa")) == 13
    assert task_answers("tones-aqa") == ["down", "four", "no", "one", "three", "two", "up", "yes"]
    assert task_question_types("easy-vqa") == ("yes/no", "negation", "colour", "shape")
    with pytest.raises(ValueError, match="unknown task 'mnist'; available: easy-vqa, tones-aqa, "):
        load_task("mnist")


def test_a_must_learn_variant_reads_its_base_tasks_data_and_names_what_its_encoder_lacks():
    from commit_mllm.tasks import VARIANTS, base_task, withheld_feature

    assert set(VARIANTS) <= set(TASKS)
    for name, (base, feature) in VARIANTS.items():
        assert base_task(name) == base and withheld_feature(name) == feature
        assert MODALITY[name] == MODALITY[base]
        assert task_answers(name) == task_answers(base)
        assert task_question_types(name) == task_question_types(base)
        a, b = load_task(name, "test", max_samples=4), load_task(base, "test", max_samples=4)
        assert [a[i]["conversations"] for i in range(4)] == [
            b[i]["conversations"] for i in range(4)
        ]
    assert base_task("easy-vqa") == "easy-vqa" and withheld_feature("easy-vqa") is None
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        base_task("mnist")
