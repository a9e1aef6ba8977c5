"""Resume after any kill or stop: every file a run writes equals an uninterrupted run's.

Real child processes are killed (SIGKILL) or stopped (SIGTERM / SIGINT) at named points
through the test hooks of ``commit_mllm.training.checkpoint.fault_point``, then resumed until done.
Evaluation and checkpoint cadences coincide (both every 2 steps), dropout is on, and
TensorBoard is written, so every ordering question between eval, save and logs is exercised.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from commit_mllm.training.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ARGS = [
    "train.steps=6",
    "train.save_every=2",
    "train.eval_every=2",
    "model.mllm.vision_projector.dropout=0.1",
    "run.progress=false",
]
HOOKS = ("COMMIT_MLLM_KILL_AT", "COMMIT_MLLM_SIGNAL_AT", "COMMIT_MLLM_SIGNAL")
HOOKS += ("COMMIT_MLLM_SIGNAL_COUNT", "COMMIT_MLLM_FAULT_RANK", "COMMIT_MLLM_SIGNAL_GROUP")
TIMING = ("seconds", "ms_per_step")


def _env(**hooks):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in HOOKS:
        env.pop(name, None)
    env.update({k: str(v) for k, v in hooks.items()})
    return env


def _cli(out_dir, *extra, resume=False, **hooks):
    cmd = [sys.executable, "-m", "commit_mllm.cli", "train", "--config", TINY]
    cmd += [f"run.output_dir={out_dir}", *ARGS, *extra]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(**hooks))


def _tb_scalars(run_dir: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    out = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            for v in event.summary.value:
                value = (
                    tensor_util.make_ndarray(v.tensor).item()
                    if v.HasField("tensor")
                    else v.simple_value
                )
                out.append((v.tag, event.step, value))
    return sorted(out)


def _weights_hash(run_dir: Path, step: int = 6) -> str:
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"
    tensors = load_file(str(ckpt))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def outputs(run_dir: Path) -> dict:
    """Everything a run writes that must not depend on kills (timing fields aside)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (*TIMING, "run_dir"):
        summary.pop(key)
    preds = {p.name: p.read_text() for p in sorted((run_dir / "predictions").iterdir())}
    return {
        "metrics": read_jsonl(run_dir / "metrics.jsonl"),
        "eval": read_jsonl(run_dir / "eval.jsonl"),
        "predictions": preds,
        "tb": _tb_scalars(run_dir),
        "summary": summary,
        "weights": _weights_hash(run_dir),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    }


def _assert_same_as(run_dir: Path, reference) -> None:
    got = outputs(run_dir)
    for key, want in reference.outputs.items():
        assert got[key] == want, key
    tb = got["tb"]
    assert len({(tag, step) for tag, step, _ in tb}) == len(tb)  # no (tag, step) twice


class Reference:
    """The uninterrupted run: its folder and :func:`outputs`."""

    def __init__(self, path: Path):
        self.path, self.outputs = path, outputs(path)

    def copy(self, to: Path) -> Path:
        shutil.copytree(self.path, to)
        return to


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    res = _cli(out)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = Reference(out)
    assert [r["step"] for r in ref.outputs["eval"]] == [2, 4, 6]
    assert [r["step"] for r in ref.outputs["metrics"]] == list(range(6))
    assert ref.outputs["checkpoints"] == ["step-00000004", "step-00000006"]
    return ref


# Each chain: a fresh run killed at the first point, then --resume killed at the next ...,
# then a last --resume to the end. The number is the step the following resume starts from.
CHAINS = {
    "before-and-during-publish": [
        ("step:2", 2),  # after step index 2 (3 done): checkpoint 2 is the newest
        ("eval:4", 2),  # eval of step 4 written, checkpoint 4 not: eval 4 is redone
        ("save:4:weights", 2),  # checkpoint 4 half written
        ("save:4:manifest", 2),  # complete, not yet renamed into place
    ],
    "after-publish-and-at-the-end": [
        ("save:4:published", 4),  # renamed into place, older ones not yet pruned
        ("step:4", 4),  # a step after checkpoint 4: its eval (written before it) is kept
        ("save:6:manifest", 4),  # the final checkpoint, unpublished
        ("finish", 6),  # the final checkpoint published, summary.json not yet written
    ],
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_sigkill_at_every_point_then_resume_equals_an_uninterrupted_run(reference, tmp_path, chain):
    out = tmp_path / "run"
    resumes_from = None
    for point, next_from in CHAINS[chain]:
        res = _cli(out, resume=resumes_from is not None, COMMIT_MLLM_KILL_AT=point)
        assert res.returncode == -signal.SIGKILL, (point, res.stderr[-3000:])
        if resumes_from is not None:
            assert f"(step {resumes_from})" in res.stdout, (point, res.stdout)
        resumes_from = next_from
    res = _cli(out, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"(step {resumes_from})" in res.stdout
    _assert_same_as(out, reference)
    assert not list((out / "checkpoints").glob(".*"))  # no temp or set-aside folder left
    assert not list(out.glob(".tb-rewind"))
    if resumes_from == 6:  # the chain ended on a finished run: resuming it again is a no-op
        final = out / "checkpoints" / "step-00000006" / "trainable.safetensors"
        before = final.stat()
        res = _cli(out, resume=True)
        assert res.returncode == 0 and "(step 6)" in res.stdout, res.stderr[-3000:]
        _assert_same_as(out, reference)
        after = final.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_damaged_checkpoint_is_skipped_and_its_resave_can_be_killed(reference, tmp_path):
    out = reference.copy(tmp_path / "run")
    weights = out / "checkpoints" / "step-00000006" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    res = _cli(out, resume=True, COMMIT_MLLM_KILL_AT="save:6:aside")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert "step-00000006: trainable.safetensors does not match its SHA-256" in res.stderr
    assert "(step 4)" in res.stdout
    assert [p.name for p in (out / "checkpoints").glob(".old-*")]  # the damaged one, aside
    res = _cli(out, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(step 4)" in res.stdout
    _assert_same_as(out, reference)


# ---- preemption: SIGTERM / SIGINT finish the step, save, say how to resume -------------------
def test_sigterm_saves_and_says_how_to_resume_a_second_sigint_stops_at_once(reference, tmp_path):
    out = tmp_path / "run"
    res = _cli(out, COMMIT_MLLM_SIGNAL_AT="step:2")  # during step index 2: 3 steps done
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    notice, last = res.stderr.strip().splitlines()[-2:]
    assert notice == (
        "commit-mllm: SIGTERM: stopping after the current step, with a checkpoint "
        "(send it again to stop at once)"
    )
    assert last.startswith("commit-mllm train: stopped by SIGTERM after step 3 of 6; checkpoint ")
    assert "step-00000003 is written. Continue with: commit-mllm train --config " in last
    assert last.endswith(" --resume")
    assert (out / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]

    hooks = {"COMMIT_MLLM_SIGNAL": "INT", "COMMIT_MLLM_SIGNAL_COUNT": 2}
    res = _cli(out, resume=True, COMMIT_MLLM_SIGNAL_AT="step:4", **hooks)
    assert res.returncode == 128 + signal.SIGINT, res.stderr[-3000:]
    assert "(step 3)" in res.stdout and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "commit-mllm: SIGINT again: stopping now, without a new checkpoint "
        "(--resume continues from the last one)"
    )
    # Checkpoint 4 (the cadence) is the newest: no checkpoint of step 5 was started.
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000004"
    res = _cli(out, resume=True)
    assert res.returncode == 0 and "(step 4)" in res.stdout, res.stderr[-3000:]
    _assert_same_as(out, reference)


def test_a_signal_in_the_last_step_saves_it_and_resume_does_the_final_evaluation(
    reference, tmp_path
):
    out = tmp_path / "run"
    res = _cli(out, COMMIT_MLLM_SIGNAL_AT="step:5")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "stopped by SIGTERM after step 6 of 6; checkpoint " in res.stderr
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [2, 4]  # left to --resume
    res = _cli(out, resume=True)
    assert res.returncode == 0 and "(step 6)" in res.stdout, res.stderr[-3000:]
    _assert_same_as(out, reference)


def test_a_signal_during_setup_stops_before_the_first_step(tmp_path, capsys, monkeypatch, request):
    import commit_mllm.training.startup as startup
    from commit_mllm.cli import main

    # Python's own Ctrl-C handler, also when this process was started with SIGINT ignored
    # (a background job of a non-interactive shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    real = startup.assemble

    def slow_to_build(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the model is being built
        return real(*args, **kwargs)

    monkeypatch.setattr(startup, "assemble", slow_to_build)
    args = ["train", "--config", TINY, f"run.output_dir={tmp_path}", "run.progress=false"]
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "commit-mllm train: stopped by SIGINT after step 0 of 5; no checkpoint yet. Continue "
        f"with: commit-mllm train --config {TINY} run.output_dir={tmp_path} "
        "run.progress=false --resume"
    )
    assert not (tmp_path / "checkpoints").exists() and not read_jsonl(tmp_path / "metrics.jsonl")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_loader_workers(reference, tmp_path):
    # Ctrl-C in a terminal signals every process of the group, DataLoader workers included.
    out = tmp_path / "run"
    hooks = {"COMMIT_MLLM_SIGNAL_AT": "step:2", "COMMIT_MLLM_SIGNAL": "INT"}
    cmd = [sys.executable, "-m", "commit_mllm.cli", "train", "--config", TINY]
    cmd += [f"run.output_dir={out}", *ARGS, "data.num_workers=2"]
    env = _env(**hooks, COMMIT_MLLM_SIGNAL_GROUP=1)
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, start_new_session=True
    )
    assert res.returncode == 128 + signal.SIGINT, res.stderr[-3000:]
    assert "stopped by SIGINT after step 3 of 6" in res.stderr
    res = _cli(out, "data.num_workers=2", resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_as(out, reference)


def _torchrun(out_dir, *extra, **hooks):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--standalone", "-m", "commit_mllm.cli", "train", "--config", TINY]
    cmd += [f"run.output_dir={out_dir}", *ARGS, "run.tensorboard=false", "train.batch_size=2"]
    return subprocess.run(
        [*cmd, *extra], capture_output=True, text=True, timeout=300, env=_env(**hooks)
    )


@pytest.mark.parametrize("sharding", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_stop_together_when_one_gets_sigterm(reference, tmp_path, sharding):
    import torch.distributed as dist

    if not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available here")
    extra = ["train.fsdp=true"] if sharding == "fsdp" else []
    out = tmp_path / "run"
    hooks = {"COMMIT_MLLM_SIGNAL_AT": "step:2", "COMMIT_MLLM_FAULT_RANK": "1"}
    res = _torchrun(out, *extra, **hooks)
    assert res.returncode != 0
    assert res.stderr.count("stopped by SIGTERM after step 3 of 6") == 1, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000003"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    res = _torchrun(out, *extra, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(step 3)" in res.stdout
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [2, 4, 6]
    if sharding == "fsdp":  # against an uninterrupted two-process FSDP run: bit-identical
        full = tmp_path / "full"
        assert _torchrun(full, *extra).returncode == 0
        assert got == read_jsonl(full / "metrics.jsonl")
        assert read_jsonl(out / "eval.jsonl") == read_jsonl(full / "eval.jsonl")
        assert _weights_hash(out) == _weights_hash(full)
        return
    # 2 ranks x batch 2 = the reference's batch 4
    # (equal to 1e-5, tests/training/test_distributed.py).
    want = reference.outputs["metrics"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)


# ---- what a resume may change ------------------------------------------------------------
def _resume_in_process(reference, tmp_path: Path, *overrides: str):
    from commit_mllm.cli import main

    out = reference.copy(tmp_path / "run")
    args = ["train", "--config", TINY, f"run.output_dir={out}", *ARGS, *overrides]
    return main([*args, "--resume"]), out


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "train.batch_size=2",
            "samples per optimizer step (train.batch_size x train.grad_accum x processes) would "
            "go from 4 to 2",
        ),
        ("commit.strategy=constant", "commit.strategy: 'commit' -> 'constant' (the checkpoint"),
        (
            "model.mllm.vision_projector.type=qformer",
            "model.mllm.vision_projector.type: 'mlp' -> 'qformer'",
        ),
        ("train.optimizer=sgd", "train.optimizer: 'adamw' -> 'sgd'"),
        ("train.steps=5", "train.steps = 5 is below the step of "),
    ],
)
def test_a_resume_that_cannot_take_a_setting_is_a_one_line_error(
    reference, tmp_path, capsys, override, message
):
    code, _ = _resume_in_process(reference, tmp_path, override)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("commit-mllm train: error: ") and message in err


def test_settings_that_can_change_on_resume_take_effect(reference, tmp_path, caplog):
    code, out = _resume_in_process(
        reference,
        tmp_path,
        "train.steps=8",
        "train.eval_every=3",
        "train.llm_lr=0.0005",
        "train.batch_size=2",
        "train.grad_accum=2",  # the same 4 samples per step, split in two
        "run.tensorboard=false",
    )
    assert code == 0
    assert (
        "resume: changed settings take effect from step 6: run.tensorboard True -> False; "
        "train.batch_size 4 -> 2; train.eval_every 2 -> 3; train.grad_accum 1 -> 2; "
        "train.steps 6 -> 8"
    ) in caplog.text
    assert (
        "optimizer settings replace the checkpoint's from step 6: llm base_lr 0.001 -> 0.0005"
    ) in caplog.text
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(8))
    assert recs[:6] == reference.outputs["metrics"]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [2, 4, 6, 8]

    # From step 6 the LLM's base rate is halved and the encoder's is kept: the ratio of the
    # two rates over their CoMMIT factors halves (the schedule, now to step 8, is shared).
    # The rate of step i uses the factors logged with step i - 1.
    def base_ratio(i):
        now, prev = recs[i], recs[i - 1]
        return (now["lr/llm"] / prev["factor/llm"]) / (now["lr/encoder"] / prev["factor/encoder"])

    assert base_ratio(5) == pytest.approx(1.0, rel=1e-9)
    assert base_ratio(6) == pytest.approx(0.5, rel=1e-9)
    assert base_ratio(7) == pytest.approx(0.5, rel=1e-9)
