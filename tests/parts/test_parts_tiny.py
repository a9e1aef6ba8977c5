"""Tests for commit_mllm.parts (tiny parts): cache, determinism, loading, progress."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from commit_mllm.data import Collator, load_tokenizer
from commit_mllm.models import (
    AudioEncoderConfig,
    LLMConfig,
    MLLMConfig,
    MultimodalLM,
    ProjectorConfig,
    VisionEncoderConfig,
)
from commit_mllm.parts import (
    AUDIO_HEADS,
    VISION_HEADS,
    PretrainSettings,
    cache_key,
    content_hash,
    linear_probe,
    load_media_processor,
    prepare_tiny_parts,
    segment_means,
    synth_audio_scene,
    synth_scene,
    tiny_mllm_config,
)
from commit_mllm.tasks import load_task

SCALE = 0.01  # a few optimizer steps per part: seconds, not a minute


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(msg)

    def trained(self):
        return any("step" in line for line in self.lines)


VQA_LOG = Log()


@pytest.fixture(scope="module")
def vqa_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    folder = prepare_tiny_parts("easy-vqa", cache_dir=root, steps_scale=SCALE, log=VQA_LOG)
    assert VQA_LOG.trained()
    return root, folder


@pytest.fixture(scope="module")
def aqa_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_audio")
    return prepare_tiny_parts("tones-aqa", cache_dir=root, steps_scale=SCALE, log=None)


def test_layout_and_manifest(vqa_parts):
    root, folder = vqa_parts
    assert folder.parent == root and folder.name.startswith("easy-vqa-")
    for sub in ("tokenizer", "llm", "encoder"):
        assert (folder / sub).is_dir()
    assert (folder / "llm" / "model.safetensors").is_file()
    assert (folder / "encoder" / "preprocessor_config.json").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left
    m = json.loads((folder / "manifest.json").read_text())
    for key in ("task", "seed", "settings", "versions", "timings_s", "metrics", "content_hash"):
        assert key in m
    assert m["task"] == "easy-vqa" and m["modality"] == "vision" and m["seed"] == 0
    assert m["content_hash"] == content_hash(folder)
    assert m["cache_key"] in folder.name
    assert {"final_train_loss", "final_train_ppl", "heldout_ppl"} <= set(m["metrics"]["llm"])
    probe = m["metrics"]["encoder"]["probe"]
    assert {"colour_meanpool", "shape_meanpool"} <= set(probe)
    assert all(0.0 <= v <= 1.0 for v in probe.values())
    assert set(m["metrics"]["encoder"]["pretext_train_acc"]) == set(VISION_HEADS)


def test_cache_is_reused_without_training(vqa_parts):
    root, folder = vqa_parts
    before = (folder / "manifest.json").read_bytes()
    log = Log()
    t0 = time.perf_counter()
    again = prepare_tiny_parts("easy-vqa", cache_dir=root, steps_scale=SCALE, log=log)
    assert time.perf_counter() - t0 < 1.0
    assert again == folder and not log.trained()
    assert (folder / "manifest.json").read_bytes() == before


def test_force_retrains_identically(vqa_parts):
    root, folder = vqa_parts
    first = json.loads((folder / "manifest.json").read_text())
    log = Log()
    again = prepare_tiny_parts("easy-vqa", cache_dir=root, steps_scale=SCALE, force=True, log=log)
    assert again == folder and log.trained()
    second = json.loads((folder / "manifest.json").read_text())
    # Same seed and settings: bit-identical weights and tokenizer.
    assert second["content_hash"] == first["content_hash"] == content_hash(folder)
    assert (
        second["metrics"]["llm"]["final_train_loss"] == first["metrics"]["llm"]["final_train_loss"]
    )
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1


def test_settings_change_the_cache_key():
    base = PretrainSettings()
    assert cache_key(base) == cache_key(PretrainSettings())
    assert cache_key(base) != cache_key(PretrainSettings(seed=1))
    assert cache_key(base) != cache_key(PretrainSettings(steps_scale=0.5))
    assert cache_key(base) != cache_key(PretrainSettings(task="tones-aqa"))


def test_vision_parts_load_and_train(vqa_parts):
    _, folder = vqa_parts
    tok = load_tokenizer(str(folder / "tokenizer"))
    collator = Collator(tok, image_processor=load_media_processor(folder))
    cfg = MLLMConfig(
        llm=LLMConfig(name_or_path=str(folder / "llm")),
        vision=VisionEncoderConfig(name_or_path=str(folder / "encoder"), feature_layer=-1),
        vision_projector=ProjectorConfig(type="mlp"),
        image_token_id=collator.image_token_id,
    )
    assert not collator.placeholder_info.needs_resize
    torch.manual_seed(0)
    model = MultimodalLM(cfg)
    batch = collator(list(load_task("easy-vqa", "train", max_samples=4)))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # The stored recommendation builds the same architecture.
    rec = MultimodalLM(tiny_mllm_config(folder))
    assert rec.vision_encoder.feature_index == -1
    assert torch.isfinite(rec(**batch).loss)


def test_audio_parts_load_and_run(aqa_parts):
    folder = aqa_parts
    m = json.loads((folder / "manifest.json").read_text())
    assert m["modality"] == "audio"
    assert set(m["metrics"]["encoder"]["pretext_train_acc"]) == set(AUDIO_HEADS)
    tok = load_tokenizer(str(folder / "tokenizer"))
    collator = Collator(tok, feature_extractor=load_media_processor(folder))
    cfg = MLLMConfig(
        llm=LLMConfig(name_or_path=str(folder / "llm")),
        audio=AudioEncoderConfig(name_or_path=str(folder / "encoder")),
        audio_projector=ProjectorConfig(type="mlp", stride=2),
        audio_token_id=collator.audio_token_id,
    )
    model = MultimodalLM(cfg)
    assert model.audio_encoder.window_frames == 200  # 2 s, not Whisper's 30 s
    data = load_task("tones-aqa", "train", max_samples=4)
    batch = collator([data[i] for i in range(4)])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(MultimodalLM(tiny_mllm_config(folder))(**batch).loss)


def test_synthetic_media_are_deterministic():
    a, ta = synth_scene(np.random.default_rng(3))
    b, tb = synth_scene(np.random.default_rng(3))
    assert a.size == (64, 64) and ta == tb
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert set(ta) == set(VISION_HEADS)
    assert all(0 <= ta[k] < n for k, n in VISION_HEADS.items())
    clip, t = synth_audio_scene(np.random.default_rng(5))
    clip2, _ = synth_audio_scene(np.random.default_rng(5))
    assert clip.dtype == np.float32 and np.array_equal(clip, clip2)
    assert 0.9 * 16_000 <= len(clip) <= 2.5 * 16_000
    assert all(0 <= t[k] < n for k, n in AUDIO_HEADS.items())


def test_segment_means():
    x = torch.arange(8.0).view(1, 8, 1).repeat(2, 1, 1)  # tokens 0..7
    out = segment_means(x, torch.tensor([8, 2]), 4)
    assert out[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert out[1, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # short row: nearest valid token


def test_linear_probe_separates_and_guesses():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=gen)
    x = torch.randn(300, 5, generator=gen) + 4 * torch.nn.functional.one_hot(y, 5).float()
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) > 0.95
    noise = torch.randn(300, 5, generator=gen)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        prepare_tiny_parts("nope", cache_dir=tmp_path)


def test_cache_key_is_the_sha256_of_settings_and_versions():
    """Folders built before the parts subpackage existed keep their key (no silent rebuild)."""
    import hashlib
    from dataclasses import asdict

    import transformers

    import commit_mllm

    blob = json.dumps(
        {
            "settings": asdict(PretrainSettings()),
            "versions": {
                "commit_mllm": commit_mllm.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        },
        sort_keys=True,
    )
    assert cache_key(PretrainSettings()) == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_every_phase_says_what_and_how_long(vqa_parts):
    root, folder = vqa_parts
    lines = VQA_LOG.lines
    assert "building the tiny easy-vqa parts" in lines[0] and "(~45 s" in lines[0]
    announced = [line for line in lines if "(usually" in line]
    phases = ["tokenizer", "tiny LLM", "vision encoder", "linear probes"]
    for name in phases:
        assert any(name in line for line in announced), (name, lines)
    assert sum("done in" in line for line in lines) == len(phases)
    log = Log()
    prepare_tiny_parts("easy-vqa", cache_dir=root, steps_scale=SCALE, log=log)
    assert log.lines == [f"[prepare] using cached tiny parts {folder}"]


def test_phase_prints_a_bar_on_stderr(capsys):
    from commit_mllm.parts.progress import phase, stderr_say

    with phase(stderr_say, "counting", "~1 s", total=3) as bar:
        for _ in range(3):
            bar.update()
    err = capsys.readouterr().err
    assert "[prepare] counting (usually ~1 s)" in err
    assert "3/3" in err and "[prepare] counting: done in" in err
    with phase(None, "silent", total=3) as bar:
        bar.update()
    assert capsys.readouterr().err == ""


def test_a_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    from commit_mllm.parts import tiny

    def boom(*_args):
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny, "pretrain_vision", boom)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_tiny_parts("easy-vqa", cache_dir=tmp_path, steps_scale=SCALE, log=None)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_folders_are_removed(tmp_path):
    from commit_mllm.parts.cache import remove_stale_temps

    old, new, keep = tmp_path / ".tmp-x-1", tmp_path / ".tmp-y-2", tmp_path / "easy-vqa-k"
    for p in (old, new, keep):
        p.mkdir()
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    assert remove_stale_temps(tmp_path) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-y-2", "easy-vqa-k"]
