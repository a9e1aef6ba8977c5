"""CoMMIT inside transformers.Trainer, as a Hugging Face user meets it.

Metrics in log_history and the real TensorBoard reporter (any callback order), the
TrainingArguments learning rate, the Trainer's weight-decay split, and the one-line errors
for a wrong set-up. Tiny LLaVA from config, offline, fixed seeds.
"""

from __future__ import annotations

import glob
import math

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
import transformers as T  # noqa: E402

from commit_mllm import CoMMITConfig  # noqa: E402
from commit_mllm.hf import (  # noqa: E402
    CoMMITCallback,
    CoMMITTrainer,
    DeepSpeedSetupError,
    TrainerSetupError,
    build_components,
    commit_optimizer,
    decay_parameter_names,
)
from commit_mllm.hf.deepspeed import check_deepspeed  # noqa: E402
from commit_mllm.method.components import ComponentError, check_param_groups  # noqa: E402
from test_hf import Batches, Recorder, args, build, collate, make_batch  # noqa: E402


def trainer_for(tmp_path, model, cb, steps=3, callbacks=None, batches=None, **kw):
    batches = batches or [make_batch("llava", model, seed=s) for s in range(steps)]
    tr = CoMMITTrainer(
        model=model,
        args=args(tmp_path, steps=steps, **kw),
        train_dataset=Batches(batches),
        data_collator=collate,
        callbacks=[cb] if callbacks is None else callbacks,
    )
    tr._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(batches)
    return tr


def numeric(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


# ---- metrics reach log_history and every reporter ---------------------------------------------
def test_metrics_reach_log_history_and_tensorboard(tmp_path):
    """The docs' report_to=["tensorboard"]: every CoMMIT metric is in the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = build("llava")
    comps = build_components(model, lrs={"encoder": 2e-3, "llm": 1e-3})
    cb = CoMMITCallback(comps, CoMMITConfig(strategy="commit", window=1, every=1))
    tr = trainer_for(tmp_path, model, cb, report_to=["tensorboard"])
    assert any(type(c).__name__ == "TensorBoardCallback" for c in tr.callback_handler.callbacks)
    tr.train()

    logged = [r for r in tr.state.log_history if "loss" in r]
    assert len(logged) == len(cb.history) == 3
    for rec, hist in zip(logged, cb.history):
        for key, value in hist.items():
            assert rec[key] == value, key  # log_history: every metric, this step's value
    assert {"commit/kappa", "commit/kappa_bar", "commit/D/encoder", "commit/D/llm"} <= set(
        logged[0]
    )
    assert {"lr/llm", "grad_norm/encoder", "update_norm/llm", "commit/factor/llm"} <= set(logged[0])

    (events,) = glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for key in numeric(cb.history[0]):
        tag = f"train/{key}"
        assert tag in scalars, tag
        got = [e.value for e in acc.Scalars(tag)]
        want = [float(h[key]) for h in cb.history]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-30), tag
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3]
    # The state is text in TensorBoard (and its numeric code a scalar).
    assert any(t.startswith("train/commit/state") for t in acc.Tags()["tensors"])


def test_metrics_reach_reporters_registered_first(tmp_path):
    """HF's own order: reporting callbacks first, the CoMMIT callback last."""
    model = build("llava")
    comps = build_components(model, lrs={"encoder": 2e-3, "llm": 1e-3})
    cb, first, last = (
        CoMMITCallback(comps, CoMMITConfig(strategy="commit_clr", window=1, every=2)),
        Recorder(),
        Recorder(),
    )
    tr = trainer_for(tmp_path, model, cb, steps=4, callbacks=[first, cb], logging_steps=2)
    tr.callback_handler.callbacks.insert(0, last)  # even before DefaultFlowCallback
    tr.train()
    for rec in (first, last):
        steps = [r for r in rec.logs if "loss" in r]
        assert len(steps) == 2  # logging_steps=2: the Trainer logs steps 2 and 4
        for r, hist in zip(steps, (cb.history[1], cb.history[3])):
            # The logged step's own values; kappa from the newest estimate (every=2).
            assert r["lr/encoder"] == hist["lr/encoder"]
            assert r["grad_norm/llm"] == hist["grad_norm/llm"]
        # every=2 estimates at the last step of each block: global steps 2 and 4
        assert steps[0]["commit/kappa"] == cb.history[1]["commit/kappa"]
        assert steps[0]["commit/estimate_step"] == 2
        assert steps[1]["commit/kappa"] == cb.history[3]["commit/kappa"]
        assert steps[1]["commit/estimate_step"] == 4
    evals = [r for r in tr.state.log_history if "loss" not in r]
    assert all(not any(k.startswith("commit/") for k in r) for r in evals)


# ---- learning rates ------------------------------------------------------------------------------
def test_learning_rate_is_the_default_base_rate(tmp_path):
    """Components left out of lrs take TrainingArguments.learning_rate; the logged
    learning_rate is that rate through the Trainer's schedule."""
    steps = 6
    model = build("llava")
    comps = build_components(model, lrs={"encoder": 3e-3})
    assert math.isnan(comps["llm"].lr) and "unset" in comps.table()
    cb = CoMMITCallback(comps, CoMMITConfig(strategy="commit_clr", window=1, gamma=0.5, every=1))
    tr = trainer_for(
        tmp_path,
        model,
        cb,
        steps=steps,
        learning_rate=7e-4,
        lr_scheduler_type="cosine",
        warmup_steps=2,
    )
    tr.train()
    assert comps["llm"].lr == 7e-4 and comps["encoder"].lr == 3e-3
    assert {g["name"]: g["base_lr"] for g in tr.optimizer.param_groups} == {
        "encoder": 3e-3,
        "llm": 7e-4,
    }
    sched = T.get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), 2, steps)
    logged = [r for r in tr.state.log_history if "loss" in r]
    prev = None
    for t, (rec, hist) in enumerate(zip(logged, cb.history)):
        s = sched.get_last_lr()[0]
        sched.step()
        assert rec["learning_rate"] == pytest.approx(7e-4 * s, rel=1e-9, abs=1e-15), t
        f_llm = prev["commit/factor/llm"] if prev else 1.0
        assert hist["lr/llm"] == pytest.approx(7e-4 * s * f_llm, rel=1e-9, abs=1e-15), t
        prev = hist
    assert cb.history[-1]["commit/factor/llm"] != 1.0
    # Step 1 trains at rate 0 (warmup): flagged; later estimates do not carry the stale flag.
    assert logged[0]["commit/flag/llm"] == "zero_update"
    assert not any(k.startswith("commit/flag/") for k in logged[-1])


def test_unset_rates_need_training_arguments():
    model = build("llava")
    comps = build_components(model, lrs={"encoder": 1e-3})
    with pytest.raises(ComponentError, match=r"\['llm'\].*pass lrs="):
        commit_optimizer(comps, model=model)
    with pytest.raises(ComponentError, match=r"unknown component\(s\) \['vision'\]"):
        build_components(model, lrs={"vision": 1e-3})


# ---- weight decay as the Trainer splits it ---------------------------------------------------
def test_weight_decay_split_per_component(tmp_path):
    """Biases and norm weights get no decay; two groups per component share name, base
    rate and factor."""
    steps = 4
    model = build("llava")
    comps = build_components(
        model, lrs={"encoder": 2e-3, "llm": 1e-3}, weight_decay={"encoder": 0.05}
    )
    cb = CoMMITCallback(comps, CoMMITConfig(strategy="commit_clr", window=1, gamma=0.5, every=1))
    tr = trainer_for(tmp_path, model, cb, steps=steps, weight_decay=0.1)
    opt = tr.create_optimizer()
    check_param_groups(opt, comps)  # every trainable parameter in exactly one group

    # Same split as the plain Trainer's own optimizer.
    plain = T.Trainer(model=model, args=args(tmp_path, weight_decay=0.1)).create_optimizer()
    plain_decay = {id(p) for g in plain.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    ours_decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert ours_decay == plain_decay

    named = dict(model.named_parameters())
    no_decay = set(named) - decay_parameter_names(model)
    assert any(n.endswith(".bias") for n in no_decay)
    assert any("layernorm" in n or "layer_norm" in n or "pre_layrnorm" in n for n in no_decay)
    assert "model.language_model.norm.weight" in no_decay
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    owner = {n: c.name for c in comps for n in c.names}
    for n, p in named.items():
        want = 0.0 if n in no_decay else (0.05 if owner[n] == "encoder" else 0.1)
        assert wd_of[id(p)] == want, n
    assert [(g["name"], g["base_lr"]) for g in opt.param_groups] == [
        ("encoder", 2e-3),
        ("encoder", 2e-3),
        ("llm", 1e-3),
        ("llm", 1e-3),
    ]

    tr.train()
    assert cb.history[-1]["commit/factor/encoder"] != 1.0
    f = cb.commit.scheduler.controller.factors
    for g in opt.param_groups:  # both groups of a component: scheduler rate * f_c
        assert g["lr"] == pytest.approx(g["base_lr"] * f[g["name"]], rel=1e-12)


# ---- one-line errors for a wrong set-up ----------------------------------------------------------
def test_plain_trainer_says_how_to_fix(tmp_path):
    model = build("llava")
    before = [p.detach().clone() for p in model.parameters()]
    cb = CoMMITCallback(build_components(model, lrs=1e-3), CoMMITConfig(window=1, every=1))
    plain = T.Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=Batches([make_batch("llava", model)]),
        data_collator=collate,
        callbacks=[cb],
    )
    with pytest.raises(TrainerSetupError) as err:
        plain.train()
    msg = str(err.value)
    assert "\n" not in msg and "CoMMITTrainer" in msg and "commit_optimizer" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_foreign_optimizer_and_missing_callback(tmp_path):
    model = build("llava")
    cb = CoMMITCallback(build_components(model, lrs=1e-3), CoMMITConfig(window=1, every=1))
    data = Batches([make_batch("llava", model)])
    tr = CoMMITTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=data,
        data_collator=collate,
        callbacks=[cb],
        optimizers=(torch.optim.AdamW(model.parameters()), None),
    )
    with pytest.raises(TrainerSetupError, match=r"not CoMMIT's .*commit_optimizer\(") as err:
        tr.train()
    assert "\n" not in str(err.value)
    bare = CoMMITTrainer(
        model=model, args=args(tmp_path), train_dataset=data, data_collator=collate
    )
    with pytest.raises(TrainerSetupError, match=r"callbacks=\[CoMMITCallback"):
        bare.train()


def test_own_commit_optimizer_is_accepted(tmp_path):
    model = build("llava")
    comps = build_components(model, lrs={"encoder": 2e-3})
    cb = CoMMITCallback(comps, CoMMITConfig(window=1, every=1))
    opt = commit_optimizer(comps, args(tmp_path, learning_rate=5e-4), model=model)
    tr = trainer_for(tmp_path, model, cb, steps=2)
    tr.optimizer = opt
    tr.train()
    assert tr.optimizer.optimizer is opt or tr.optimizer is opt
    assert cb.history[0]["lr/llm"] == 5e-4 and math.isfinite(cb.history[-1]["commit/kappa"])


def test_fsdp_is_refused_before_the_first_step(tmp_path):
    # transformers ignores fsdp= on a CPU-only run, so the Trainer's flag is set by hand.
    model = build("llava")
    cb = CoMMITCallback(build_components(model, lrs=1e-3), CoMMITConfig(window=1, every=1))
    tr = trainer_for(tmp_path, model, cb, steps=1)
    tr.is_fsdp_enabled = True
    with pytest.raises(TrainerSetupError, match=r"does not support FSDP: use DDP or DeepSpeed"):
        tr.train()
    assert tr.state.global_step == 0 and cb.commit is None


@pytest.mark.parametrize(
    ("config", "commit", "match"),
    [
        ({"zero_optimization": {"stage": 3}}, {"strategy": "line_search"}, r"use ZeRO-2 or DDP"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            {},
            r"offload_param\.device to 'cpu' or 'none'",
        ),
        ({"optimizer": {"type": "AdamW"}}, {}, r"remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, {}, r"remove the 'scheduler' section"),
        ({"zero_optimization": {"stage": 2}}, {"strategy": "ogm_ge"}, r"'ogm_ge' edits grad"),
        ({}, {"strategy": "feature_cd"}, r"use DDP for it"),
        ({}, {"lagging_only": True}, r"lagging_only edits gradients"),
    ],
)
def test_deepspeed_refusals_are_one_line(config, commit, match):
    with pytest.raises(DeepSpeedSetupError, match=match) as err:
        check_deepspeed(config, CoMMITConfig(**commit))
    assert "\n" not in str(err.value)
    check_deepspeed({"zero_optimization": {"stage": 2}}, CoMMITConfig())  # accepted
