"""Resume a finished run from one of its checkpoints, in a fresh folder, and compare.

The pattern of several resume tests: train ``full``; copy its checkpoint of step S into
``part`` with metrics.jsonl cut to the steps before S (what a run killed after that
checkpoint leaves); resume ``part``; it must write the same records and the same final
weights as the uninterrupted run.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from commit_mllm.training.config import load_config
from commit_mllm.training.tracking import read_jsonl
from commit_mllm.training.trainer import train


def resume_a_copy(
    full: Path,
    part: Path,
    config: str,
    overrides: Sequence[str],
    step: int,
    extra_lines: Sequence[str] = (),
) -> list[str]:
    """Copy checkpoint ``step`` of ``full`` into ``part``, cut metrics.jsonl there, resume.

    Args:
        full: The finished run's folder.
        part: A fresh folder for the resumed run.
        config: The run's YAML file.
        overrides: Its overrides, without ``run.output_dir``.
        step: The checkpoint to resume from; metrics.jsonl keeps the records of the steps
            before it.
        extra_lines: Lines appended to the cut metrics.jsonl (records the resume must drop).

    Returns:
        The resumed run's startup lines.
    """
    name = f"step-{step:08d}"
    (part / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(full / "checkpoints" / name, part / "checkpoints" / name)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join([*lines[:step], *extra_lines]) + "\n")
    logs: list[str] = []
    train(load_config(config, [f"run.output_dir={part}", *overrides]), resume=True, log=logs.append)
    return logs


def assert_same_run(full: Path, part: Path, final_step: int) -> None:
    """The same metrics.jsonl records and bit-identical final trainable weights."""
    assert read_jsonl(part / "metrics.jsonl") == read_jsonl(full / "metrics.jsonl")
    name = f"step-{final_step:08d}"
    a = load_file(str(full / "checkpoints" / name / "trainable.safetensors"))
    b = load_file(str(part / "checkpoints" / name / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
