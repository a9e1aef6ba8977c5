"""What a default kappa estimate costs under DeepSpeed ZeRO-3 (issue 23), used by overhead.py.

``python benchmarks/overhead.py --zero3`` runs it. A LLaVA-1.5-shaped model (CLIP tower,
MLP projector, Llama LM; small widths so that 2 CPU processes run it) trains under
``transformers.Trainer`` with LLaVA-1.5's ``zero3.json`` on 2 processes (torchrun, gloo,
DeepSpeed's CPU accelerator), in two arms:

* ``plain``: ``transformers.Trainer``, no CoMMIT;
* ``default``: ``CoMMITTrainer`` with ``CoMMITConfig()`` as a user gets it (an estimate every
  K = 16 steps on a quarter of the rows).

Each launch is one arm in fresh processes: it trains ``warmup`` steps (ZeRO-3 records its
trace, the first estimate is taken) and then ``steps`` timed steps (a multiple of K, so the
mean step time is the amortized cost). The launches alternate ``plain, default, plain,
default, ...``; each default launch's mean step time is divided by the mean of the plain
launches around it, so drifts of the machine's load cancel; reported: medians over rounds.
The time of the estimate steps alone, over the plain mean step, is reported beside it.

Memory: each rank's peak resident set size over the timed steps minus its resident size
before the model was built (glibc's mmap threshold fixed at 128 KiB, as in overhead.py),
the larger of the two ranks, median over the launches of an arm.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ZERO3_JSON = {  # LLaVA-1.5's scripts/zero3.json
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    },
}  # fmt: skip
SHAPE = {"vision_hidden": 64, "vision_layers": 2, "image": 32, "patch": 8,
         "hidden": 128, "layers": 2, "vocab": 1024, "rows": 4, "text": 16, "answer": 8}  # fmt: skip
IMAGE_TOKEN = 5


def build_model(mode: str):
    """The LLaVA-shaped model; ``lora``: LLaVA-1.5's LoRA recipe (tower frozen)."""
    import torch
    import transformers as T

    from commit_mllm.hf import configure_training

    s = SHAPE
    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=4,
        image_size=s["image"], patch_size=s["patch"],
    )  # fmt: skip
    text = T.LlamaConfig(
        hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=4, num_key_value_heads=4, vocab_size=s["vocab"],
        max_position_embeddings=512, pad_token_id=0,
    )  # fmt: skip
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                        vision_feature_layer=-1)  # fmt: skip
    model = T.LlavaForConditionalGeneration(cfg)
    if mode == "lora":
        lora = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
        model = configure_training(model, encoder="freeze", projector="full", llm=lora)
    else:
        model = configure_training(model, encoder="freeze", projector="full", llm="full")
    return model


def make_batches(n: int, seed: int) -> list[dict]:
    """``n`` batches of this rank's rows: image tokens, prompt, supervised answer."""
    import torch

    s = SHAPE
    g = torch.Generator().manual_seed(seed)
    n_img = (s["image"] // s["patch"]) ** 2
    length = 1 + n_img + s["text"] + s["answer"]
    out = []
    for _ in range(n):
        ids = torch.randint(10, s["vocab"], (s["rows"], length), generator=g)
        ids[:, 0], ids[:, 1 : 1 + n_img] = 1, IMAGE_TOKEN
        labels = torch.full_like(ids, -100)
        labels[:, -s["answer"] :] = ids[:, -s["answer"] :]
        pixels = torch.randn(s["rows"], 3, s["image"], s["image"], generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": labels, "pixel_values": pixels})  # fmt: skip
    return out


def worker(arm: str, mode: str, warmup: int, steps: int, out: str) -> None:
    """One arm on this rank (run under torchrun); rank 0 writes the JSON result."""
    import torch
    import transformers as T

    import overhead_memory as memory

    torch.set_num_threads(1)
    T.logging.set_verbosity_error()
    rank = int(os.environ.get("RANK", "0"))
    memory.tune_malloc()
    import deepspeed.comm.torch  # noqa: F401  (the module; its name is shadowed by torch)
    from accelerate import PartialState

    from commit_mllm import CoMMITConfig
    from commit_mllm.hf import CoMMITCallback, CoMMITTrainer, build_components

    # accelerate picks no backend for DeepSpeed without GPUs: gloo, and no C++ shm op.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    base = memory.memory_start(torch.device("cpu"))
    model = build_model(mode)
    batches = make_batches(warmup + steps, seed=rank)
    times: list[float] = []

    class Clock(T.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:  # the peak counts from the timed steps on
                memory.memory_start(torch.device("cpu"))
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t0)

    args = T.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out), "trainer"), max_steps=warmup + steps,
        per_device_train_batch_size=1, learning_rate=2e-4, report_to=[], save_strategy="no",
        logging_steps=10_000, remove_unused_columns=False, disable_tqdm=True,
        gradient_checkpointing=True, deepspeed=ZERO3_JSON,
        accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    callbacks: list[Any] = [Clock()]
    cls = T.Trainer
    if arm == "default":
        comps = build_components(model, projector_side="encoder", lrs={"encoder": 2e-5})
        callbacks.append(CoMMITCallback(comps, CoMMITConfig()))
        cls = CoMMITTrainer
    trainer = cls(model=model, args=args, train_dataset=_Items(batches),
                  data_collator=lambda items: dict(items[0]), callbacks=callbacks)  # fmt: skip
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(batches)
    trainer.train()
    used = memory.memory_peak(torch.device("cpu"))
    mine = torch.tensor([float((used or 0) - (base or 0))])
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        k = CoMMITConfig().effective_every
        estimate = [t for i, t in enumerate(times) if (warmup + i + 1) % k == 0]
        Path(out).write_text(json.dumps({
            "arm": arm, "mode": mode, "times": times, "estimate_times": estimate,
            "peak_bytes": float(mine), "baseline_bytes": base,
        }))  # fmt: skip
    torch.distributed.barrier()


class _Items:
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def launch(arm: str, mode: str, warmup: int, steps: int, tmp: Path) -> dict[str, Any]:
    """One fresh 2-process torchrun launch of :func:`worker`."""
    here = Path(__file__).resolve().parent
    out = tmp / f"{arm}_{mode}_{time.time_ns()}.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), arm, mode, str(warmup), str(steps), str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if not out.exists():
        raise RuntimeError(f"zero3 launch {arm}/{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def run(modes: tuple[str, ...], rounds: int, warmup: int, steps: int, tmp: Path, log=print):
    """Alternating launches per mode; returns the results dict (raw and summaries)."""
    results: dict[str, Any] = {"shape": SHAPE, "zero3_json": ZERO3_JSON, "processes": 2,
                               "warmup": warmup, "steps": steps, "rounds": rounds,
                               "modes": {}}  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        runs: list[dict] = []
        for r in range(rounds):
            for arm in ("plain", "default"):
                log(f"zero3 {mode} round {r} {arm}")
                runs.append(launch(arm, mode, warmup, steps, tmp))
        runs.append(launch("plain", mode, warmup, steps, tmp))
        results["modes"][mode] = summarize(runs)
    return results


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Paired time ratios (default over the plain launches around it) and memory ratios."""
    mean = [statistics.fmean(r["times"]) for r in runs]
    ratios, est = [], []
    for i in range(1, len(runs) - 1, 2):
        plain = (mean[i - 1] + mean[i + 1]) / 2
        ratios.append(mean[i] / plain)
        est.append(statistics.fmean(runs[i]["estimate_times"]) / plain)
    plain_mem = statistics.median(r["peak_bytes"] for r in runs if r["arm"] == "plain")
    commit_mem = statistics.median(r["peak_bytes"] for r in runs if r["arm"] == "default")
    return {
        "time_ratio_paired_median": statistics.median(ratios),
        "time_ratios": ratios,
        "estimate_step_ratio_median": statistics.median(est),
        "plain_step_s_median": statistics.median(
            m for m, r in zip(mean, runs) if r["arm"] == "plain"
        ),
        "memory_ratio": commit_mem / plain_mem if plain_mem else None,
        "peak_bytes": {"plain": plain_mem, "default": commit_mem},
        "raw": runs,
    }


def merge_headline(path: Path, results: dict[str, Any], source: dict[str, Any]) -> None:
    """``overhead.zero3.hf_llava_<mode>`` and ``memory.zero3.hf_llava_<mode>``; others kept.

    The time is a step with a default estimate over a plain ZeRO-3 step (the amortized
    ratio over K steps, 1 + (that - 1) / K at best, stays in the results file: on a loaded
    2-core machine its noise exceeds it).
    """
    data = json.loads(path.read_text()) if path.exists() else {}
    for mode, s in results["modes"].items():
        key = f"hf_llava_{mode}"
        data.setdefault("overhead", {}).setdefault("zero3", {})[key] = round(
            s["estimate_step_ratio_median"], 3
        )
        if s["memory_ratio"] is not None:
            data.setdefault("memory", {}).setdefault("zero3", {})[key] = round(s["memory_ratio"], 3)
    data["zero3_source"] = source
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/hf/test_hf_distributed.py: a DeepSpeed thread can abort the exit
