"""train.optimizer: the classes it names, layer-wise DoG's rates as multipliers, its error."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

from commit_mllm.cli import main
from commit_mllm.training.config import ConfigError, load_config
from commit_mllm.training.startup import optimizer_class

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def test_each_name_gives_its_class():
    dog = pytest.importorskip("dog")
    assert optimizer_class("adamw") is torch.optim.AdamW
    assert optimizer_class("sgd") is torch.optim.SGD
    assert optimizer_class("ldog") is dog.LDoG


def test_an_unknown_optimizer_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"train\.optimizer = 'lion' is invalid: use adamw, sgd"):
        load_config(TINY, ["train.optimizer=lion"])


def test_ldog_without_its_package_says_what_to_install(monkeypatch):
    real = builtins.__import__

    def no_dog(name, *args, **kwargs):
        if name == "dog":
            raise ModuleNotFoundError("No module named 'dog'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dog)
    with pytest.raises(
        ValueError, match=r"train\.optimizer=ldog needs .*pip install dog-optimizer"
    ):
        optimizer_class("ldog")


def test_ldog_trains_with_the_rates_as_its_multipliers(tmp_path):
    pytest.importorskip("dog")
    out = tmp_path / "run"
    argv = ["train", "--config", TINY, f"run.output_dir={out}", "train.steps=4"]
    argv += ["train.save_every=0", "train.optimizer=ldog", "train.weight_decay=0.0"]
    argv += ["train.lr=1.0", "train.encoder_lr=1.0", "train.llm_lr=1.0"]
    assert main(argv) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ces = [r["ce"] for r in recs if "ce" in r]
    assert len(ces) == 4 and all(c == c for c in ces)  # finite every step
    assert ces[-1] != ces[0]  # DoG's first step moves the weights by reps_rel, then grows
