"""CoMMITTrainer on several processes (DDP) and under DeepSpeed ZeRO, on CPU (gloo).

Every rank measures its own micro-batch and the KL sums are summed over ranks, so all ranks
get the kappa of the global batch (and the same factors and rates). Under DeepSpeed the
engine updates inside backward; CoMMIT must snapshot theta_t before that (a hook on the
engine's step). Checked here for real: tiny LLaVA, 1 and 2 CPU processes (torchrun, and
DeepSpeed's CPU accelerator), kappa / D_c / per-component norms and rates equal to the
one-process run without DeepSpeed on the same global batches; ZeRO-3 with LLaVA-1.5's own
zero3.json (full and LoRA, gradient checkpointing, bf16, resume).

This file is also the training script the tests launch: ``python -m torch.distributed.run
--standalone --nproc_per_node 2 tests/hf/test_hf_distributed.py --stage 2 --out result.json``
(no ``--stage``: DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
STEPS, ROWS = 4, 4
KEYS = (
    "commit/kappa",
    "commit/D/encoder",
    "commit/D/llm",
    "grad_norm/encoder",
    "grad_norm/llm",
    "update_norm/encoder",
    "update_norm/llm",
    "lr/encoder",
    "lr/llm",
    "commit/factor/llm",
)


def train(
    out: str | None,
    stage: int | None = None,
    ga: int = 1,
    launcher: str = "torchrun",
    cuda: bool = False,
    save_steps: int | None = None,
    resume: str | None = None,
    lora: bool = False,
    checkpointing: bool = False,
    bf16: bool = False,
):
    """One run; every rank returns the CoMMIT history and a checksum of the weights.

    Args:
        out: Where rank 0 writes {"history", "weights"} as JSON (None: do not write).
        stage: ZeRO stage, or None for no DeepSpeed.
        ga: Gradient-accumulation steps.
        launcher: ``torchrun`` (config passed in TrainingArguments) or ``accelerate``
            (the DeepSpeed settings come from ``accelerate launch``).
        cuda: Train on the GPU (nccl) instead of the CPU (gloo).
        save_steps: Save a checkpoint every this many steps (None: no checkpoints).
        resume: Checkpoint folder to resume from.
        lora: LLaVA-1.5's LoRA recipe (vision tower frozen, projector full, LoRA on the LLM)
            instead of training every parameter.
        checkpointing: Gradient checkpointing on.
        bf16: bf16 training (DeepSpeed keeps bf16 parameters and fp32 master weights).
    """
    import torch
    import transformers as T

    from commit_mllm import CoMMITConfig
    from commit_mllm.hf import CoMMITCallback, CoMMITTrainer, build_components
    from test_hf import Batches, build, collate, make_batch

    torch.set_num_threads(1)
    T.logging.set_verbosity_error()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    extra: dict = {}
    if (stage is not None or launcher == "accelerate") and not cuda:
        # accelerate picks no backend for DeepSpeed on a machine without GPUs: configure
        # the state with gloo first, and let DeepSpeed's CPU accelerator skip its C++ op.
        import deepspeed.comm.torch  # noqa: F401  (the module; its name is shadowed by torch)
        from accelerate import PartialState

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        extra["accelerator_config"] = {"use_configured_state": True}
    if bf16 and not cuda and stage is not None:
        # TrainingArguments accepts bf16 only on a GPU or with use_cpu (which excludes
        # DeepSpeed); DeepSpeed's CPU accelerator trains in bf16: skip that check.
        import transformers.training_args as targs

        targs.is_torch_bf16_gpu_available = lambda: True
    if stage is not None and launcher == "torchrun":
        ds = ZERO3_CONFIG if stage == 3 else {**DS_CONFIG, "zero_optimization": {"stage": stage}}
        extra["deepspeed"] = ds
    if stage is None and launcher == "torchrun" and not cuda:
        extra["use_cpu"] = True
    model = build("llava")
    if lora:
        from commit_mllm.hf import configure_training

        model = configure_training(model, encoder="freeze", projector="full", llm=LORA)
    comps = build_components(model, lrs={"encoder": 2e-3})  # llm: args.learning_rate
    batches = [make_batch("llava", model, rows=ROWS, seed=s) for s in range(STEPS * ga)]
    if world > 1:  # accelerate hands item i to rank i % world: interleave the row slices
        per = ROWS // world
        batches = [
            {k: v[r * per : (r + 1) * per] for k, v in b.items()}
            for b in batches
            for r in range(world)
        ]
    cb = CoMMITCallback(
        comps, CoMMITConfig(strategy="commit", window=1, gamma=0.3, exact=True, snapshot="all")
    )
    args = T.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out or "."), "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=ga,
        learning_rate=1e-3,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        gradient_checkpointing=checkpointing,
        bf16=bf16,
        **extra,
    )
    trainer = CoMMITTrainer(
        model=model,
        args=args,
        train_dataset=Batches(batches),
        data_collator=collate,
        callbacks=[cb],
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(batches)
    trainer.train(resume_from_checkpoint=resume)
    result = {
        "history": [{k: h[k] for k in KEYS} for h in cb.history],
        "weights": _weights(model, stage == 3),
        "deepspeed": trainer.is_deepspeed_enabled,
        "partitioned": sum(getattr(p, "ds_tensor", None) is not None for p in model.parameters()),
        "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in model.parameters()),
        "world": trainer.accelerator.num_processes,
    }
    if out is not None and rank == 0:
        Path(out).write_text(json.dumps(result))
    return result


def _weights(model, zero3: bool) -> float:
    """Sum of every weight (gathered from the ZeRO-3 partitions when ``zero3``)."""
    import contextlib

    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return float(sum(p.detach().double().sum() for p in params))


# ---- the tests --------------------------------------------------------------------------------
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
ZERO3_CONFIG = {  # LLaVA-1.5's scripts/zero3.json, as docs/integrations.md shows it
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}
DS_CONFIG = {  # what docs/integrations.md shows
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def _launch(
    tmp_path, world: int, *script_args: str, head: list[str] | None = None, out: str = "result"
):
    """Run this file as a script under torchrun (default) or the launcher in ``head``."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS.parent / "src"), str(HERE), str(TESTS), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = tmp_path / f"{out}.json"
    if head is None:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        head += ["--nproc_per_node", str(world)]
    cmd = [*head, str(Path(__file__)), "--out", str(out), *script_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    return done, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def deepspeed():
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    if not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available here")


@pytest.fixture(scope="module")
def reference():
    """The same run without DeepSpeed, in this process (one process, the global batch)."""
    pytest.importorskip("transformers")
    runs: dict[tuple, dict] = {}

    def get(ga: int, lora: bool = False, checkpointing: bool = False) -> dict:
        key = (ga, lora, checkpointing)
        if key not in runs:
            runs[key] = train(None, None, ga, lora=lora, checkpointing=checkpointing)
        return runs[key]

    return get


def _assert_same(got: dict, ref: dict, world: int, deepspeed: bool = True, rel: float = 1e-4):
    assert got["deepspeed"] == deepspeed and got["world"] == world
    assert len(got["history"]) == len(ref["history"]) == STEPS
    for t, (a, b) in enumerate(zip(got["history"], ref["history"])):
        assert a["commit/D/encoder"] > 0 and a["commit/D/llm"] > 0, t
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), (t, key)
    assert got["weights"] == pytest.approx(ref["weights"], rel=rel / 100)
    assert got["history"][-1]["commit/factor/llm"] != 1.0


@pytest.mark.slow  # the 2-process ZeRO-2 test below runs the same all-reduce by default
def test_ddp_two_processes_equal_one(reference, tmp_path):
    """Without the summed KL each rank had its own kappa, factors and rates (diverging)."""
    done, got = _launch(tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same(got, reference(1), 2, deepspeed=False)


@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_zero2_equals_the_run_without_deepspeed(deepspeed, reference, tmp_path, world):
    done, got = _launch(tmp_path, world, "--stage", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same(got, reference(1), world)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "ga"), [(1, 1), (0, 1), (2, 2)])
def test_zero_stages_and_accumulation(deepspeed, reference, tmp_path, stage, ga):
    done, got = _launch(tmp_path, 2 if stage else 1, "--stage", str(stage), "--ga", str(ga))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same(got, reference(ga), 2 if stage else 1)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["zero_stage", "config_file", "accelerate_yaml", "deepspeed"])
def test_launchers_from_the_docs(deepspeed, reference, tmp_path, how):
    """accelerate launch with a DeepSpeed config (the plugin comes from the launcher, not
    from TrainingArguments), and the deepspeed launcher."""
    (tmp_path / "ds_zero2.json").write_text(json.dumps(DS_CONFIG))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    world, script = 2, ["--launcher", "accelerate"]
    if how == "zero_stage":
        world, head = 1, [*accelerate, "--use_deepspeed", "--zero_stage", "2"]
        head += ["--num_processes", "1", "--gradient_clipping", "1.0"]
    elif how == "config_file":
        head = [*accelerate, "--use_deepspeed", "--deepspeed_config_file", "ds_zero2.json"]
        head += ["--num_processes", "2"]
    elif how == "accelerate_yaml":
        (tmp_path / "zero2.yaml").write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
            "deepspeed_config:\n  deepspeed_config_file: ds_zero2.json\nnum_processes: 2\n"
        )
        head = [*accelerate, "--config_file", "zero2.yaml"]
    else:  # DeepSpeed's own launcher, TrainingArguments(deepspeed=...)
        head = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2"]
        script = ["--stage", "2"]
    done, got = _launch(tmp_path, world, *script, head=head)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same(got, reference(1), world)


@pytest.mark.slow
def test_zero2_resume_restores_the_balance_state(deepspeed, tmp_path):
    """A DeepSpeed checkpoint resumes with its commit_state.pt (factors, window, step)."""
    _assert_resume_continues(tmp_path, ["--stage", "2"])


def _assert_resume_continues(tmp_path, args: list[str]) -> None:
    """A run resumed from its step-2 checkpoint repeats the uninterrupted run's steps."""
    done, full = _launch(tmp_path, 2, *args, "--save-steps", "2", out="full")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "trainer" / "checkpoint-2"
    assert (ckpt / "commit_state.pt").is_file()
    done, resumed = _launch(tmp_path, 2, *args, "--resume", str(ckpt), out="resumed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(resumed["history"]) == STEPS - 2
    for a, b in zip(resumed["history"], full["history"][2:]):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-12), key
    assert resumed["weights"] == pytest.approx(full["weights"], rel=1e-7)


def _zero3_partitioned(got: dict) -> None:
    """Both kinds of ZeRO-3 parameters were measured: partitioned between forwards, and
    persistent (below stage3_param_persistence_threshold, kept gathered by the engine)."""
    assert 0 < got["persistent"] < got["partitioned"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_equals_the_run_without_deepspeed(deepspeed, reference, tmp_path, lora):
    """LLaVA-1.5's zero3.json, 2 processes, gradient checkpointing: kappa, D_c, gradient and
    update norms, rates and weights equal the one-process run without DeepSpeed."""
    args = ["--stage", "3", "--checkpointing", *(["--lora"] if lora else [])]
    done, got = _launch(tmp_path, 2, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    _zero3_partitioned(got)
    _assert_same(got, reference(1, lora=lora, checkpointing=True), 2)
    assert done.stderr.count("CoMMIT under ZeRO-3: theta_t kept as each rank's partition") == 2


@pytest.mark.slow
def test_zero3_bf16_follows_zero2_bf16(deepspeed, tmp_path):
    """bf16 on DeepSpeed's CPU accelerator (bf16 weights, fp32 master weights): the ZeRO-3
    estimate follows the ZeRO-2 one, whose measurement is exact (fp32 tests above). The two
    stages reduce bf16 gradients differently, so their trajectories drift apart slowly."""
    flags = ["--lora", "--checkpointing", "--bf16"]
    runs = {}
    for stage in ("2", "3"):
        done, runs[stage] = _launch(tmp_path, 2, "--stage", stage, *flags, out=f"bf16_{stage}")
        assert done.returncode == 0, done.stderr[-3000:]
    _zero3_partitioned(runs["3"])
    for t, (a, b) in enumerate(zip(runs["3"]["history"], runs["2"]["history"])):
        assert a["commit/D/encoder"] > 0 and a["commit/D/llm"] > 0, t
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-2 if t == 0 else 0.1), (t, key)


@pytest.mark.slow
def test_zero3_resume_restores_the_balance_state(deepspeed, tmp_path):
    """A ZeRO-3 checkpoint resumes with its commit_state.pt (factors, window, step)."""
    _assert_resume_continues(tmp_path, ["--stage", "3", "--lora", "--checkpointing"])


def test_zero3_accepted_and_nvme_offload_refused():
    from commit_mllm import CoMMITConfig
    from commit_mllm.hf import DeepSpeedSetupError
    from commit_mllm.hf.deepspeed import check_deepspeed

    check_deepspeed(ZERO3_CONFIG, CoMMITConfig())  # no error
    for strategy in ("commit_clr", "constant", "progress"):
        check_deepspeed(ZERO3_CONFIG, CoMMITConfig(strategy=strategy))
    nvme = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}
    with pytest.raises(DeepSpeedSetupError, match=r"offload_param.device to 'cpu' or 'none'"):
        check_deepspeed({"zero_optimization": nvme}, CoMMITConfig())
    with pytest.raises(DeepSpeedSetupError, match=r"'line_search' .* use ZeRO-2 or DDP for it"):
        check_deepspeed(ZERO3_CONFIG, CoMMITConfig(strategy="line_search"))
    check_deepspeed({"zero_optimization": {"stage": 2}}, CoMMITConfig(strategy="line_search"))


def test_zero3_refuses_strategies_that_edit_gradients(deepspeed, tmp_path):
    """Refused in one line at start, before DeepSpeed touches the model."""
    import torch
    import transformers as T
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from commit_mllm import CoMMITConfig
    from commit_mllm.hf import CoMMITCallback, CoMMITTrainer, DeepSpeedSetupError
    from commit_mllm.hf import build_components as components
    from test_hf import Batches, build, collate, make_batch

    model = build("llava")
    before = [p.detach().clone() for p in model.parameters()]
    environ = dict(os.environ)
    try:
        args = T.TrainingArguments(
            output_dir=str(tmp_path / "z3"),
            max_steps=2,
            report_to=[],
            remove_unused_columns=False,
            deepspeed={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1},
        )
        trainer = CoMMITTrainer(
            model=model,
            args=args,
            train_dataset=Batches([make_batch("llava", model)]),
            data_collator=collate,
            callbacks=[CoMMITCallback(components(model), CoMMITConfig(strategy="ogm_ge"))],
        )
        with pytest.raises(DeepSpeedSetupError, match=r"strategy 'ogm_ge' edits .*use DDP") as err:
            trainer.train()
        assert "\n" not in str(err.value)
    finally:  # DeepSpeed settings are process-global: later Trainers must not see them
        from accelerate.state import AcceleratorState

        unset_hf_deepspeed_config()
        os.environ.clear()
        os.environ.update(environ)  # the plugin sets ACCELERATE_USE_DEEPSPEED=true
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_on_gpu_equals_the_run_without_deepspeed(tmp_path, stage):
    """Opt-in (``-m gpu``): ZeRO-2 / ZeRO-3 on one CUDA device (nccl) against the plain run."""
    import torch

    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent / "src"), str(HERE), str(TESTS)])
    results = {}
    for name, extra in (("plain", ["--cuda"]), ("zero", ["--stage", stage, "--cuda"])):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "1", str(Path(__file__)), "--out", str(out), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads(out.read_text())
    _assert_same(results["zero"], results["plain"], 1, rel=1e-3)  # CUDA kernels' order


def main() -> None:
    """Script mode (what the tests launch)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=None)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--launcher", default="torchrun", choices=["torchrun", "accelerate"])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher's
    ns = parser.parse_args()
    train(
        ns.out,
        ns.stage,
        ns.ga,
        ns.launcher,
        ns.cuda,
        ns.save_steps,
        ns.resume,
        ns.lora,
        ns.checkpointing,
        ns.bf16,
    )
    # An orderly teardown: left to interpreter exit, the process group's C++ threads can abort
    # the process ("terminate called without an active exception") on a loaded machine.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Under ZeRO-3 a DeepSpeed helper thread still alive at interpreter shutdown aborts the
    # process now and then, after the results are written: leave without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
