"""The cheap default (kappa every K steps on a row subset) through the trainer: resume, logs."""

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from commit_mllm.training.config import load_config
from commit_mllm.training.tracking import read_jsonl
from commit_mllm.training.trainer import train
from resume_helpers import resume_a_copy

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# The test config measures exactly; these put the library's defaults back, with K = 3 so that
# a short run has several estimates (LoRA-free tiny parts with projector dropout: the
# reference on the row subset is rerun, LLM part only or whole).
CHEAP = [
    "commit.exact=false",
    "commit.snapshot=needed",
    "commit.every=3",
    "commit.rows=0.5",
    "commit.window=4",
    "run.progress=false",
    "run.tensorboard=false",
    "train.steps=9",
    "train.save_every=5",
    "model.mllm.vision_projector.dropout=0.1",
]


def test_k_step_estimates_resume_bit_identically(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(TINY, [f"run.output_dir={full}", *CHEAP]), log=lambda _: None)
    recs = read_jsonl(full / "metrics.jsonl")
    measured = [r["step"] for r in recs if "kappa" in r]
    assert measured == [2, 5, 8]
    assert all(math.isfinite(r["kappa_bar"]) for r in recs if r["step"] >= 2)
    assert all(("grad_norm/llm" in r) == (r["step"] in measured) for r in recs)
    resume_a_copy(full, part, TINY, CHEAP, step=5)
    # The estimate after the resume (step 8) integrates the same dt and window as before.
    assert read_jsonl(part / "metrics.jsonl") == recs
