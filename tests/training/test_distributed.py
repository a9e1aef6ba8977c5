"""Two CPU processes (torchrun, gloo) against one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from commit_mllm.training.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ARGS = ["run.progress=false", "run.tensorboard=false", "train.save_every=2"]


def _run(cmd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _one(out_dir, *extra, batch_size=4, check=True):
    """One process (the reference for the two-process runs)."""
    cmd = [sys.executable, "-m", "commit_mllm.cli", "train", "--config", TINY]
    return _run(
        [*cmd, f"run.output_dir={out_dir}", f"train.batch_size={batch_size}", *ARGS, *extra],
        check,
    )


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
    _one(root / "one")
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


# ---- FSDP (use_orig_params, full shard) on two CPU ranks ------------------------------------
FSDP_ARGS = ["train.fsdp=true", "train.eval_every=2"]


@pytest.fixture(scope="module")
def fsdp_runs(runs):
    root = runs / "fsdp"
    _torchrun(root / "two", *FSDP_ARGS)
    _one(root / "one", "train.eval_every=2")
    # Coordinate descent leaves the gated side without optimizer state at the checkpoint.
    _torchrun(root / "cd-two", *FSDP_ARGS, "commit.strategy=feature_cd")
    _one(root / "cd-one", "train.eval_every=2", "commit.strategy=feature_cd")
    return root


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "step-00000005" / "trainable.safetensors"))


@pytest.mark.parametrize("name", ["", "cd-"])
def test_fsdp_equals_one_process_with_the_global_batch(fsdp_runs, name):
    two = read_jsonl(fsdp_runs / f"{name}two" / "metrics.jsonl")
    one = read_jsonl(fsdp_runs / f"{name}one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(5))
    keys = ["ce", "kappa", "D/encoder", "D/llm", "lr/encoder", "lr/llm", "grad_norm"]
    keys += ["grad_norm/encoder", "grad_norm/llm", "update_norm/encoder", "update_norm/llm"]
    for a, b in zip(two, one):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
    # Evaluation generates from the gathered parameters: the same answers.
    assert read_jsonl(fsdp_runs / f"{name}two" / "eval.jsonl") == read_jsonl(
        fsdp_runs / f"{name}one" / "eval.jsonl"
    )
    # The checkpoint holds full tensors under the unwrapped names.
    w2, w1 = _weights(fsdp_runs / f"{name}two"), _weights(fsdp_runs / f"{name}one")
    assert sorted(w2) == sorted(w1)
    for key in w1:
        assert w2[key].shape == w1[key].shape
        assert float((w2[key] - w1[key]).abs().max()) < 1e-5, key


@pytest.mark.parametrize("name", ["", "cd-"])
def test_fsdp_resume_is_bit_identical(fsdp_runs, tmp_path, name):
    import shutil

    import torch

    full = fsdp_runs / f"{name}two"
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000004", part / "checkpoints" / "step-00000004")
    strategy = ["commit.strategy=feature_cd"] if name else []
    out = _torchrun(part, *FSDP_ARGS, *strategy, "--resume")
    assert "resume: from" in out.stdout
    assert read_jsonl(part / "metrics.jsonl") == read_jsonl(full / "metrics.jsonl")[4:]
    a, b = _weights(part), _weights(full)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_fsdp_checkpoint_resumed_without_fsdp_says_how_it_was_written(fsdp_runs, tmp_path):
    import shutil

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        fsdp_runs / "two" / "checkpoints" / "step-00000004",
        part / "checkpoints" / "step-00000004",
    )
    out = _one(part, "--resume", check=False)
    assert out.returncode != 0
    assert "step-00000004: the optimizer state was written with FSDP but this run is " in (
        out.stderr
    )
    assert "without it" in out.stderr and "resume the way it was written" in out.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["train.mixed_precision=fp16"],
            r"train\.mixed_precision = 'fp16' is invalid with train\.fsdp = true: use bf16 or no",
        ),
        (
            ["commit.lagging_only=true"],
            r"commit\.lagging_only = true is invalid with train\.fsdp = true .*: use false",
        ),
    ],
)
def test_fsdp_config_conflicts_name_the_key(extra, message):
    from commit_mllm.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["train.fsdp=true", *extra])


def test_fsdp_units_are_the_parts_transformer_layers():
    from commit_mllm.training.assembly import assemble
    from commit_mllm.training.config import load_config
    from commit_mllm.training.sharding import clean_name, layer_classes

    cfg = load_config(TINY, ["run.output_dir=/nonexistent"])
    model = assemble(cfg, lambda _: None).model
    names = sorted(c.__name__ for c in layer_classes(model))
    assert names == ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "LlamaDecoderLayer"], names
    assert clean_name("inner._fsdp_wrapped_module.llm.layers.0.w") == "inner.llm.layers.0.w"


def test_fsdp_optimizer_shards_need_the_same_number_of_processes(tmp_path):
    import torch
    import torch.distributed as dist

    from commit_mllm.training.sharding import load_optimizer_state

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        state = {"world_size": 2, "shards": [opt.state_dict(), opt.state_dict()]}
        with pytest.raises(
            ValueError,
            match=r"sharded over 2 processes; this run has 1: resume with 2 processes",
        ):
            load_optimizer_state(opt, state)
        load_optimizer_state(opt, {"world_size": 1, "shards": [opt.state_dict()]})
    finally:
        dist.destroy_process_group()
