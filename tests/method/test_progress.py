"""Held-out progress (dL_c, D_c on the next batch) and the efficiency controller."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from commit_mllm import BalanceMeter, CoMMIT, CoMMITConfig, Components
from commit_mllm.method.efficiency import EfficiencyController
from commit_mllm.method.progress import ProgressMeasurement, measure_progress
from resume_helpers import assert_same_run, resume_a_copy
from toy import TWO, NoCacheWrapper, ToyMLLM, make_batch, targets


def _step(model, comps, meter, batch, lr=0.05):
    opt = torch.optim.Adam(comps.param_groups(), lr=lr)
    F.cross_entropy(meter.forward(batch), targets(batch)).backward()
    meter.snapshot(0)
    opt.step()
    return opt


def brute_force(old, new, batch, names):
    """D_c and dL_c by hand: eval mode, theta_t with only component c moved to theta_{t+1}."""
    new_state = dict(new.named_parameters())
    out = {}
    with torch.no_grad():
        old.eval()
        ref = old(batch).double()
        ce_ref = float(F.cross_entropy(ref, targets(batch)))
        lp = torch.log_softmax(ref, -1)
        for name in names:
            moved = copy.deepcopy(old)
            for pname, p in moved.named_parameters():
                if any(pname.startswith(pref + ".") for pref in TWO[name]):
                    p.copy_(new_state[pname])
            q = moved(batch).double()
            lq = torch.log_softmax(q, -1)
            D = float((lp.exp() * (lp - lq)).sum(-1).mean())
            out[name] = (D, float(F.cross_entropy(q, targets(batch))) - ce_ref)
    return ce_ref, out


@pytest.mark.parametrize("wrapped", [False, True], ids=["cached", "plain-forward"])
def test_progress_matches_brute_force_in_eval_mode(wrapped):
    torch.manual_seed(0)
    inner = ToyMLLM(dropout=0.3)
    model = NoCacheWrapper(inner) if wrapped else inner
    patterns = {k: [("inner." if wrapped else "") + p for p in v] for k, v in TWO.items()}
    comps = Components.from_model(model, patterns, lrs=0.05)
    forward = (lambda m, b: m(b)) if wrapped else None
    meter = BalanceMeter(model, comps, forward, snapshot="all", keep_snapshot=True)
    old = copy.deepcopy(inner)
    _step(model, comps, meter, make_batch(seed=0))
    heldout = make_batch(rows=5, seed=1)
    pm = measure_progress(meter, heldout, step=0)
    ce_ref, want = brute_force(old, inner, heldout, comps.names)
    assert pm.tokens == targets(heldout).numel()
    assert pm.ce == pytest.approx(ce_ref, rel=1e-9)
    for name in comps.names:
        assert pm.D[name] > 1e-8
        assert pm.D[name] == pytest.approx(want[name][0], rel=1e-6)
        assert pm.dL[name] == pytest.approx(want[name][1], rel=1e-6, abs=1e-12)
    e = pm.efficiency()
    assert e["llm"] == pytest.approx(-pm.dL["llm"] / pm.D["llm"])


def test_progress_leaves_weights_grads_mode_and_rng_untouched():
    torch.manual_seed(0)
    model = ToyMLLM(dropout=0.3)
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, snapshot="all", keep_snapshot=True)
    _step(model, comps, meter, make_batch())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    measure_progress(meter, make_batch(seed=3), step=0, rows=3)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert torch.equal(p.grad, grads[n]), n
        assert p.data_ptr() == storage[n], n


def test_progress_rows_measure_the_first_rows_only():
    torch.manual_seed(0)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, snapshot="all", keep_snapshot=True)
    _step(model, comps, meter, make_batch())
    full = make_batch(rows=6, seed=4)
    first = {k: v[:2] for k, v in full.items()}
    a = measure_progress(meter, full, step=0, rows=2)
    b = measure_progress(meter, first, step=0)
    assert a.tokens == b.tokens == targets(first).numel()
    for c in comps.names:
        assert a.D[c] == pytest.approx(b.D[c], rel=1e-9)
        assert a.dL[c] == pytest.approx(b.dL[c], rel=1e-9, abs=1e-15)


def test_progress_flags_a_component_that_did_not_move():
    torch.manual_seed(0)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs={"encoder": 0.0, "llm": 0.05})
    meter = BalanceMeter(model, comps, snapshot="all", keep_snapshot=True)
    _step(model, comps, meter, make_batch())
    pm = measure_progress(meter, make_batch(seed=2), step=0)
    assert pm.flags == {"encoder": "zero_update"}
    assert pm.D["encoder"] == 0.0 and pm.dL["encoder"] == 0.0
    assert "encoder" not in pm.efficiency()


def test_progress_without_snapshot_is_none():
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    assert measure_progress(BalanceMeter(model, comps), make_batch(), step=0) is None


EQUAL_STEP = {"encoder": 1e-4, "llm": 1e-3}


def _pm(dL, D, step=0, flags=None):
    return ProgressMeasurement(step, dict(D), dict(dL), tokens=10, ce=1.0, flags=flags or {})


def test_efficiency_controller_moves_rate_towards_the_more_efficient_component():
    g = torch.Generator().manual_seed(0)
    ctl = EfficiencyController(["encoder", "llm"], "llm", gamma=0.05, horizon=20)
    for t in range(200):
        noise = 0.2 * float(torch.randn((), generator=g))
        # encoder: e = 4 per nat; llm: e = 1 per nat (both noisy)
        ctl.observe(
            _pm({"encoder": -4e-4 * (1 + noise), "llm": -1e-3}, {"encoder": 1e-4, "llm": 1e-3}, t),
            1,
        )
    assert ctl.factors["llm"] == 1.0  # the anchor keeps the rate the user set
    assert ctl.factors["encoder"] > 5.0
    assert ctl.efficiency()["encoder"] == pytest.approx(4.0, rel=0.1)
    assert ctl.efficiency()["llm"] == pytest.approx(1.0, rel=1e-6)


def test_efficiency_controller_cuts_an_inefficient_component_past_a_raise_cap():
    ctl = EfficiencyController(
        ["encoder", "llm"], "llm", gamma=0.05, horizon=20, max_cut=50, factor_caps={"encoder": 4.0}
    )
    g = torch.Generator().manual_seed(1)
    for t in range(300):
        n = float(torch.randn((), generator=g))
        ctl.observe(
            _pm(
                {"encoder": -1e-4 * (1 + 0.3 * n), "llm": -2e-3}, {"encoder": 1e-3, "llm": 1e-3}, t
            ),
            1,
        )
    # a cap set for raises (CoMMIT's) does not stop the cut: it goes to 1 / max_cut
    assert ctl.factors["encoder"] == pytest.approx(1 / 50)
    assert ctl.limits["encoder"] == pytest.approx((-math.log(50), math.log(4.0)))


def test_efficiency_controller_holds_still_within_noise():
    g = torch.Generator().manual_seed(2)
    ctl = EfficiencyController(["encoder", "llm"], "llm", gamma=0.05, horizon=50, confidence=2.0)
    for t in range(400):
        a, b = (float(x) for x in torch.randn(2, generator=g))
        # equal efficiency (1 per nat) under heavy noise
        ctl.observe(
            _pm(
                {"encoder": -1e-3 * (1 + a), "llm": -1e-3 * (1 + b)},
                {"encoder": 1e-3, "llm": 1e-3},
                t,
            ),
            1,
        )
    assert abs(math.log(ctl.factors["encoder"])) < 0.5


def test_efficiency_controller_gain_is_per_step_of_training():
    """Estimating every 4 steps moves the factor as far per step as estimating every step."""
    results = []
    for every in (1, 4):
        ctl = EfficiencyController(["encoder", "llm"], "llm", gamma=0.01, horizon=40)
        for _ in range(0, 200, every):
            ctl.observe(_pm({"encoder": -3e-4, "llm": -1e-3}, EQUAL_STEP), every)
        results.append(math.log(ctl.factors["encoder"]))
    assert results[0] > 0.5
    assert results[1] == pytest.approx(results[0], rel=0.1)


def test_efficiency_controller_state_round_trip_and_adjusting_flag():
    ctl = EfficiencyController(["encoder", "llm"], "llm", horizon=10)
    for t in range(20):
        ctl.observe(
            _pm({"encoder": -5e-4, "llm": -1e-3}, {"encoder": 1e-4, "llm": 1e-3}),
            1,
            adjusting=t >= 10,
        )
    other = EfficiencyController(["encoder", "llm"], "llm", horizon=10)
    other.load_state_dict(ctl.state_dict())
    for c in (ctl, other):
        c.observe(_pm({"encoder": -5e-4, "llm": -1e-3}, {"encoder": 1e-4, "llm": 1e-3}), 1)
    assert other.factors == ctl.factors
    assert other.efficiency() == ctl.efficiency()
    frozen = EfficiencyController(["encoder", "llm"], "llm", horizon=10)
    for _ in range(20):
        frozen.observe(
            _pm({"encoder": -5e-4, "llm": -1e-3}, {"encoder": 1e-4, "llm": 1e-3}),
            1,
            adjusting=False,
        )
    assert frozen.factors == {"encoder": 1.0, "llm": 1.0}
    with pytest.raises(ValueError, match="anchor component 'lm'"):
        EfficiencyController(["encoder", "llm"], "lm")


def _loop(heldout_now: bool, steps: int = 8):
    torch.manual_seed(0)
    model = ToyMLLM(dropout=0.2)
    comps = Components.from_model(model, TWO, lrs=0.02)
    opt = torch.optim.AdamW(comps.param_groups())
    cfg = CoMMITConfig(strategy="progress", progress_horizon=5)
    commit = CoMMIT(model, opt, comps, cfg, total_steps=steps)
    batches = [make_batch(seed=s) for s in range(steps + 1)]
    reports = []
    for t in range(steps):
        logits = commit.forward(batches[t])
        commit.backward(F.cross_entropy(logits, targets(batches[t])), commit.aux_loss(logits))
        commit.after_backward()
        commit.before_step()
        opt.step()
        reports.append(commit.after_step(batches[t + 1] if heldout_now else None))
        opt.zero_grad(set_to_none=True)
    return model, reports


def test_coordinator_measures_on_the_next_batch_now_or_at_the_next_forward():
    model_a, now = _loop(True)
    model_b, later = _loop(False)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    # now: step t's report carries step t's measurement; later: step t+1's report does
    assert [r.progress.step for r in now] == list(range(8))
    assert later[0].progress is None
    assert [r.progress.step for r in later[1:]] == list(range(7))
    for a, b in zip(now[:-1], later[1:]):
        assert a.progress.D == b.progress.D and a.progress.dL == b.progress.dL
    log = now[-1].as_log()
    assert {"dL/encoder", "dL/llm", "efficiency/encoder", "efficiency_z/encoder"} <= set(log)
    assert log["kappa"] == pytest.approx(now[-1].progress.D["llm"] / now[-1].progress.D["encoder"])


def test_efficiency_controller_without_anchor_steers_each_component_to_efficiency_one():
    ctl = EfficiencyController(["encoder", "llm"], None, gamma=0.05, cut_gain=0.05, horizon=20)
    for _ in range(100):  # encoder e = 3 (too slow), llm e = 0.2 (too fast)
        ctl.observe(_pm({"encoder": -3e-4, "llm": -2e-4}, EQUAL_STEP), 1)
    assert set(ctl.last_z) == {"encoder", "llm"}
    assert ctl.factors["encoder"] > 2.0 and ctl.factors["llm"] < 0.5


def test_trainer_progress_strategy_resumes_bit_identically(tmp_path):
    from pathlib import Path

    from commit_mllm.training.config import load_config
    from commit_mllm.training.tracking import read_jsonl
    from commit_mllm.training.trainer import train

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    ovr = [
        "run.progress=false",
        "run.tensorboard=false",
        "commit.strategy=progress",
        "commit.progress_horizon=3",
        "train.steps=8",
        "train.save_every=4",
        "model.mllm.vision_projector.dropout=0.1",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(tiny, [f"run.output_dir={full}", *ovr]), log=lambda _: None)
    recs = read_jsonl(full / "metrics.jsonl")
    assert any(r.get("dL/encoder") for r in recs) and recs[-1]["step"] == 7
    resume_a_copy(full, part, tiny, ovr, step=4)
    assert_same_run(full, part, final_step=8)


def test_guard_cuts_at_once_by_the_rate_that_matches_the_anchors_output_change():
    ctl = EfficiencyController(["encoder", "llm"], "llm", guard=1.0)
    # first estimate: the encoder moved the output 36x more than the LLM for less return
    ctl.observe(_pm({"encoder": -0.9, "llm": -0.2}, {"encoder": 0.72, "llm": 0.02}), 1)
    assert ctl.factors["encoder"] == pytest.approx(1 / 6)  # sqrt(0.72 / 0.02) = 6
    assert ctl.factors["llm"] == 1.0
    # next step matches the anchor's output change: no further guard cut
    ctl.observe(_pm({"encoder": -0.01, "llm": -0.02}, {"encoder": 0.02, "llm": 0.02}), 1)
    assert ctl.factors["encoder"] == pytest.approx(1 / 6)


def test_guard_leaves_a_component_alone_that_buys_more_per_nat_or_is_off():
    ctl = EfficiencyController(["encoder", "llm"], "llm", guard=1.0)
    ctl.observe(_pm({"encoder": -2.0, "llm": -0.01}, {"encoder": 0.5, "llm": 0.02}), 1)
    assert ctl.factors["encoder"] == 1.0  # moves more, but buys more per nat
    off = EfficiencyController(["encoder", "llm"], "llm", guard=None)
    off.observe(_pm({"encoder": -0.9, "llm": -0.2}, {"encoder": 0.72, "llm": 0.02}), 1)
    assert off.factors["encoder"] == 1.0
