"""The command line as a newcomer meets it: help texts, strategy lists, key=value everywhere."""

from pathlib import Path

import pytest

from commit_mllm.cli import main
from commit_mllm.demo import DEMO_TASKS
from commit_mllm.formats import FORMATS
from commit_mllm.method.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("command", ["train", "demo", "compare"])
def test_help_lists_every_strategy(capsys, command):
    text = _help(capsys, command)
    assert ", ".join(STRATEGIES) in text


def test_help_shows_defaults_and_no_repository_paths(capsys):
    top = _help(capsys)
    assert "train.lr=1e-4" in top and ", ".join(STRATEGIES) in top
    train = _help(capsys, "train")
    assert "configs/" not in train  # a pip user has no configs/ folder
    assert "validate-config FILE" in train and "README" in train
    demo = _help(capsys, "demo")
    assert "(default: easy-vqa)" in demo and "(default: constant,commit,progress)" in demo
    assert "{" + ",".join(DEMO_TASKS) + "}" in demo
    assert "(default: runs/demo)" in demo and "--resume" in demo and "--update-readme" in demo
    compare = _help(capsys, "compare")
    assert "(default: constant,commit_clr,commit)" in compare and "(default: 0)" in compare
    convert = _help(capsys, "convert")
    assert "{" + ",".join(FORMATS) + "}" in convert and "--coco-dir" in convert
    evaluate = _help(capsys, "eval")
    assert "LLaVA-style JSON list or JSONL" in evaluate and "exact match" in evaluate
    validate = _help(capsys, "validate-config")
    assert "CONFIG_OR_KEY=VALUE" in validate and "--set" in validate


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_unknown_strategies_fail_before_anything_runs(capsys, tmp_path, command):
    args = [command, "--strategies", "constant,comit", "--output-dir", str(tmp_path)]
    if command == "compare":
        args += ["--config", str(ROOT / "configs" / "tiny.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--strategies: unknown 'comit'; use {', '.join(STRATEGIES)}" in err
    assert not any(tmp_path.iterdir())  # nothing trained


def test_compare_seeds_must_be_integers(capsys, tmp_path):
    args = ["compare", "--config", str(ROOT / "configs" / "tiny.yaml"), "--seeds", "0,one"]
    assert main([*args, "--output-dir", str(tmp_path)]) == 2
    assert "--seeds: expected integers like 0,1,2, got '0,one'" in capsys.readouterr().err
