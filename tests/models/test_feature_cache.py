"""The frozen-tower feature cache (train.cache_frozen_features): same training, fewer forwards."""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from commit_mllm.models import LoRASettings, MultimodalLM, VisionEncoderConfig
from commit_mllm.training.config import ConfigError, load_config
from commit_mllm.training.startup import setup
from commit_mllm.training.tracking import read_jsonl
from commit_mllm.training.trainer import train
from test_models import CLIP, audio_batch, audio_config, vision_batch, vision_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Regime A on the tiny config: tower frozen, fresh projector and LoRA (with dropout, so the
# RNG stream matters) train; 16 samples in batches of 4 = every image seen again from step 4.
REGIME_A = [
    "run.progress=false",
    "run.tensorboard=false",
    "model.mllm.vision.freeze=true",
    "model.mllm.llm.lora={r: 4, alpha: 8, dropout: 0.1}",
    "data.max_train_samples=16",
    "data.max_eval_samples=8",
    "train.steps=10",
    "train.save_every=0",
    "train.warmup_steps=2",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _count_tower_rows(model: MultimodalLM) -> list[int]:
    """Rows the vision tower runs on, counted by a forward pre-hook."""
    rows = [0]
    model.vision_encoder.register_forward_pre_hook(
        lambda _m, args: rows.__setitem__(0, rows[0] + args[0].shape[0])
    )
    return rows


def _run(tmp_path: Path, name: str, *extra: str) -> tuple[dict, list[dict], dict, int, list]:
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / name}", *REGIME_A, *extra])
    logs: list[str] = []
    s = setup(cfg, log=logs.append)
    rows = _count_tower_rows(s.parts.model)
    summary = train(cfg, session=s)
    params = load_file(
        str(tmp_path / name / "checkpoints" / "step-00000010" / "trainable.safetensors")
    )
    return summary, read_jsonl(tmp_path / name / "metrics.jsonl"), params, rows[0], logs


def test_cached_and_uncached_runs_train_identically(tmp_path):
    plain, recs_plain, params_plain, rows_plain, _ = _run(tmp_path, "plain")
    cached, recs_cached, params_cached, rows_cached, logs = _run(
        tmp_path, "cached", "train.cache_frozen_features=true"
    )
    # Every step's loss, kappa and D_c (exact: every step, every row) and the final weights.
    assert len(recs_plain) == 10
    for a, b in zip(recs_plain, recs_cached, strict=True):
        for key in ("loss", "grad_norm", "kappa", "kappa_bar", "D/encoder", "D/llm", "state"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        assert a["kappa"] is not None
    assert params_plain.keys() == params_cached.keys()
    assert all(torch.equal(params_plain[k], params_cached[k]) for k in params_plain)
    # The final evaluation (generation through encode) is the same too.
    assert plain["accuracy"] == cached["accuracy"] and plain["final_loss"] == cached["final_loss"]
    # The cache was hit: every distinct image ran through the tower once.
    stats = cached["feature_cache"]
    assert stats["computed"] == stats["items"] <= 16 + 8
    assert stats["hits"] > 0 and stats["not_stored"] == 0
    assert rows_cached == stats["computed"]  # (the start-up forward ran before the hook)
    # Every row the uncached run sent through the tower was a hit or a computation here.
    assert rows_plain == stats["hits"] + stats["computed"] > 3 * rows_cached
    (line,) = [m for m in logs if m.startswith("feature cache:")]
    assert "on for the frozen vision tower" in line and "KiB" in line and "2048 MiB" in line
    assert "feature_cache" not in plain


def test_same_image_twice_and_two_images_under_one_id():
    torch.manual_seed(0)
    model = MultimodalLM(vision_config()).eval()
    batch = vision_batch(bsz=3)
    batch["pixel_values"][2] = batch["pixel_values"][0]  # the same image twice
    batch["id"] = ["same-id"] * 3  # ids play no part: rows 0 and 1 differ
    with torch.no_grad():
        expected = model.encode(batch)["vision"]
    for m in (model.vision_encoder, model.vision_projector):
        m.requires_grad_(m is model.vision_projector)
    cache = model.enable_feature_cache()
    with torch.no_grad():
        got = model.encode(batch)["vision"]
        assert torch.equal(got, expected)
        assert (cache.computed, cache.hits, len(cache)) == (2, 1, 2)
        assert not torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
        again = model.encode(batch)["vision"]  # a later step: all hits
    assert torch.equal(again, expected)
    assert (cache.computed, cache.hits) == (2, 4)


def test_the_projector_still_trains_on_cached_features():
    model = MultimodalLM(vision_config())
    model.vision_encoder.requires_grad_(False)
    model.enable_feature_cache()
    batch = vision_batch(bsz=2)
    for _ in range(2):  # the second forward is all hits
        model.zero_grad()
        model(**batch).loss.backward()
        grads = [p.grad for p in model.vision_projector.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.feature_cache.hits == 2


def test_audio_rows_are_cached_with_their_padding():
    torch.manual_seed(0)
    model = MultimodalLM(audio_config()).eval()
    model.audio_encoder.requires_grad_(False)
    batch = audio_batch()
    with torch.no_grad():
        expected = model.encode(batch)
        cache = model.enable_feature_cache()
        first, second = model.encode(batch), model.encode(batch)
    for got in (first, second):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (cache.computed, cache.hits) == (2, 2)


def test_the_cap_stops_storing_and_later_items_are_recomputed(caplog):
    torch.manual_seed(0)
    model = MultimodalLM(vision_config()).eval()
    model.vision_encoder.requires_grad_(False)
    batch = vision_batch(bsz=4)
    with torch.no_grad():
        expected = model.encode(batch)["vision"]
    with torch.no_grad():  # the tower's output row: 16 patches x 32 float32
        per_item = model.vision_encoder(batch["pixel_values"][:1])[0].numel() * 4
    cache = model.enable_feature_cache(max_bytes=2 * per_item)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        assert torch.equal(model.encode(batch)["vision"], expected)
        assert (len(cache), cache.bytes, cache.not_stored) == (2, 2 * per_item, 2)
        assert torch.equal(model.encode(batch)["vision"], expected)
    # Stored items are hit; the two that did not fit are computed again (and still not kept).
    assert (cache.hits, cache.computed, cache.not_stored) == (2, 6, 4)
    full = [r.getMessage() for r in caplog.records if "feature cache full" in r.getMessage()]
    assert len(full) == 1 and "2 items" in full[0] and "train.feature_cache_max_mb" in full[0]


def test_the_cap_is_a_setting_of_the_run(tmp_path):
    summary = train(
        load_config(
            TINY,
            [
                f"run.output_dir={tmp_path}",
                *REGIME_A,
                "train.steps=2",
                "train.cache_frozen_features=true",
                "train.feature_cache_max_mb=0.0005",  # 512 B: no tiny item (4 x 64 float32) fits
            ],
        ),
        log=lambda _: None,
    )
    stats = summary["feature_cache"]
    assert stats["items"] == 0 and stats["hits"] == 0 and stats["not_stored"] > 0


def test_refusals_name_the_key(tmp_path):
    def refused(model: MultimodalLM) -> str:
        with pytest.raises(ValueError) as e:
            model.enable_feature_cache()
        assert model.feature_cache is None
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("train.cache_frozen_features = true is invalid")
        return msg

    # A tower that trains: unfrozen, or frozen with LoRA on it.
    assert "vision tower is not frozen" in refused(MultimodalLM(vision_config()))
    lora = LoRASettings(r=2, target_modules=["q_proj"])
    tower = VisionEncoderConfig(config=CLIP, freeze=True, lora=lora)
    cfg = vision_config()
    cfg.vision = tower
    assert "not frozen" in refused(MultimodalLM(cfg))
    # A frozen tower that draws dropout in training mode.
    cfg = vision_config()
    cfg.vision = VisionEncoderConfig(config={**CLIP, "attention_dropout": 0.1}, freeze=True)
    assert "not deterministic in training mode (attention_dropout=0.1)" in refused(
        MultimodalLM(cfg)
    )
    # Through the trainer and the config.
    with pytest.raises(ValueError, match=r"^train\.cache_frozen_features = true is invalid: the "):
        setup(
            load_config(
                TINY,
                [
                    f"run.output_dir={tmp_path}",
                    "run.progress=false",
                    "train.cache_frozen_features=true",
                ],
            ),
            log=lambda _: None,
        )
    with pytest.raises(ConfigError, match=r"train\.cache_frozen_features = true is invalid with"):
        load_config(TINY, ["train.cache_frozen_features=true", "train.fsdp=true"])
    with pytest.raises(ConfigError, match=r"train\.feature_cache_max_mb = 0\.0 is invalid"):
        load_config(TINY, ["train.feature_cache_max_mb=0"])


def test_resume_may_switch_the_cache():
    from commit_mllm.training.config_values import to_dict
    from commit_mllm.training.resume import changed_settings

    before = to_dict(load_config(TINY))
    after = to_dict(
        load_config(TINY, ["train.cache_frozen_features=true", "train.feature_cache_max_mb=64"])
    )
    assert changed_settings(before, after) == ([], [])  # it does not change what is computed


def test_docs_quote_the_measured_figures():
    """docs/real_parts.md's cache table is speed_real.json's entry, figure for figure."""
    import json

    entry = json.loads((ROOT / "benchmarks" / "results" / "speed_real.json").read_text())[
        "vision-A-real+feature_cache"
    ]
    doc = (ROOT / "docs" / "real_parts.md").read_text()
    section = doc.split("## Frozen-tower feature cache", 1)[1].split("\n## ", 1)[0]
    for part in ("plain", "trainer"):
        arms = entry[part]
        row = (
            f"| {part} | {arms['uncached']['cpu_s']} ({arms['uncached']['wall_s']}) "
            f"| {arms['cached']['cpu_s']} ({arms['cached']['wall_s']}) "
            f"| {arms['speedup']['cpu_s']}x ({arms['speedup']['wall_s']}x) |"
        )
        assert row in section, row
    assert f"{entry['plain']['bytes_per_item'] // 1024} KiB" in section
