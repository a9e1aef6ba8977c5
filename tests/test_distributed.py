"""Two CPU processes (torchrun, gloo) against one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from commit_mllm.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ARGS = ["run.progress=false", "run.tensorboard=false", "train.save_every=2"]


def _run(cmd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _torchrun(out_dir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "commit_mllm.cli",
        "train",
        "--config",
        TINY,
        f"run.output_dir={out_dir}",
        "train.batch_size=2",
        *ARGS,
        *extra,
    ]
    return _run(cmd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        import torch.distributed as dist

        assert dist.is_gloo_available()
    except (ImportError, AssertionError):
        pytest.skip("torch.distributed with gloo is not available here")
    root = tmp_path_factory.mktemp("dist")
    _torchrun(root / "two")
    _run(
        [
            sys.executable,
            "-m",
            "commit_mllm.cli",
            "train",
            "--config",
            TINY,
            f"run.output_dir={root / 'one'}",
            "train.batch_size=4",
            *ARGS,
        ]
    )
    return root


def test_two_processes_equal_one_process_with_the_global_batch(runs):
    two, one = (
        read_jsonl(runs / "two" / "metrics.jsonl"),
        read_jsonl(runs / "one" / "metrics.jsonl"),
    )
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(5))
    for a, b in zip(two, one):
        for key in ("ce", "kappa", "D/encoder", "D/llm", "lr/encoder", "lr/llm", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-12), (a["step"], key)
    assert two[-1]["kappa"] != 1.0


def test_only_the_main_process_writes(runs):
    recs = read_jsonl(runs / "two" / "metrics.jsonl")
    assert len(recs) == 5  # one writer: no duplicated lines
    ckpts = sorted(p.name for p in (runs / "two" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000005"]


def test_resume_works_with_two_processes(runs, tmp_path):
    import shutil

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        runs / "two" / "checkpoints" / "step-00000004", part / "checkpoints" / "step-00000004"
    )
    out = _torchrun(part, "--resume")
    assert "resume: from" in out.stdout
    full = read_jsonl(runs / "two" / "metrics.jsonl")
    assert read_jsonl(part / "metrics.jsonl") == full[4:]
