"""Coordinated scheduler: exact rates for a given kappa sequence, controls, clipping, state."""

import math

import pytest
import torch

from commit_mllm import CoordinatedLR, FactorController, project_log_factors, shared_schedule
from commit_mllm.method.diagnostics import BalanceTracker, imbalance
from commit_mllm.method.scheduler import RESPONSE_SLOPE, integral_gain


def make_opt(enc_lr=1e-3, llm_lr=1e-4):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD(
        [
            {"params": [a], "name": "encoder", "lr": enc_lr},
            {"params": [b], "name": "llm", "lr": llm_lr},
        ]
    )


def run(
    control, kappas, gamma=0.1, N=2, m=10.0, warmup=0, total=100, schedule="constant", caps=None
):
    opt = make_opt()
    ctrl = FactorController(
        ["encoder", "llm"], control, gamma=gamma, max_factor=m, min_estimates=N, factor_caps=caps
    )
    sched = CoordinatedLR(opt, total, warmup, schedule, controller=ctrl)
    tracker = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=N)
    lrs = [sched.get_last_lr()]
    for step, k in enumerate(kappas):
        D = {"encoder": 1e-4, "llm": 1e-4 * k}
        st = tracker.update(_measure(D, step))
        sched.observe(tracker.last_z, st.z_bar, tracker.estimates)
        sched.step()
        lrs.append(sched.get_last_lr())
    return lrs, sched


def _measure(D, step=0):
    from commit_mllm import BalanceMeasurement

    return BalanceMeasurement(step, D, D["llm"] / D["encoder"], {}, {}, {}, 10)


def test_integral_exact_rates():
    e = math.e
    lrs, _ = run("integral", [e, e, e**2, 1 / e], gamma=0.1, N=2)
    # estimate 1: no adjustment (< N); estimate 2: log f_enc = 0.1; 3: 0.3; 4: 0.2
    expect = [0.0, 0.0, 0.1, 0.3, 0.2]
    for lr, lf in zip(lrs, expect):
        assert lr["encoder"] == pytest.approx(1e-3 * math.exp(lf), rel=1e-12)
        assert lr["llm"] == pytest.approx(1e-4 * math.exp(-lf), rel=1e-12)
        assert (lr["encoder"] / 1e-3) * (lr["llm"] / 1e-4) == pytest.approx(1.0, rel=1e-12)


def test_integral_gain_compounds_the_per_step_gain():
    assert integral_gain(0.02, 1) == 0.02
    assert integral_gain(0.02, 8) == pytest.approx((1 - 0.92**8) / 4, rel=1e-12)
    assert integral_gain(0.02, 8) < 0.02 * 8 and integral_gain(0.02, 1000) <= 0.25
    assert integral_gain(0.3, 5) == pytest.approx(1.5)  # 4 gamma >= 1: no compounding


@pytest.mark.parametrize("k", [1, 4, 16])
def test_k_does_not_change_the_integral_dynamics(k):
    """On log kappa = e0 - 4 log f_enc (slope 2 in the LR ratio), K-step control lands where
    the per-step controller does after the same number of steps, whatever K."""
    e0, gamma, steps = 3.0, 0.03, 48

    def final(every):
        ctrl = FactorController(["encoder", "llm"], gamma=gamma, max_factor=1e9, min_estimates=1)
        for t in range(every - 1, steps, every):
            e = e0 - RESPONSE_SLOPE * ctrl.log_f["encoder"]
            ctrl.update({"llm": e, "encoder": -e}, {}, t + 1, dt=every)
        return ctrl.log_f["encoder"]

    assert final(k) == pytest.approx(final(1), rel=1e-9)
    naive = 0.0  # gamma * K per estimate instead: overshoots for K = 16
    for _ in range(steps // k):
        naive += gamma * k * (e0 - RESPONSE_SLOPE * naive)
    if k == 16:
        assert abs(naive - final(1)) > 0.1


def test_proportional_exact_rates():
    e = math.e
    lrs, _ = run("proportional", [e, e**3, e**3, 1.0], gamma=0.5, N=2)
    # window means of log kappa: -, 2, 3, 1.5  -> log f_enc = 0.5 * mean
    expect = [0.0, 0.0, 1.0, 1.5, 0.75]
    for lr, lf in zip(lrs, expect):
        assert lr["encoder"] == pytest.approx(1e-3 * math.exp(lf), rel=1e-12)
        assert lr["llm"] == pytest.approx(1e-4 * math.exp(-lf), rel=1e-12)


def test_clipping_and_caps():
    _, sched = run("integral", [1e6] * 40, gamma=1.0, N=1, m=10.0)
    assert sched.controller.factors["encoder"] == pytest.approx(10.0)
    assert sched.controller.factors["llm"] == pytest.approx(0.1)
    _lrs, sched = run("integral", [1e6] * 40, gamma=1.0, N=1, m=10.0, caps={"encoder": 2.0})
    f = sched.controller.factors
    assert f["encoder"] == pytest.approx(2.0) and f["llm"] == pytest.approx(0.5)


def test_projection_keeps_sum_zero_with_three_components():
    out = project_log_factors({"a": 5.0, "b": -1.0, "c": -0.5}, {"a": 1.0, "b": 2.0, "c": 2.0})
    assert sum(out.values()) == pytest.approx(0.0, abs=1e-9)
    assert out["a"] == pytest.approx(1.0)
    assert all(abs(v) <= 2.0 + 1e-12 for v in out.values())
    ctrl = FactorController(["v", "a", "l"], "integral", gamma=0.1, min_estimates=1)
    z = imbalance({"v": 1e-3, "a": 1e-5, "l": 1e-4}, {"v": 0, "a": 0, "l": 0})
    ctrl.update(z, z, 1)
    assert math.prod(ctrl.factors.values()) == pytest.approx(1.0, rel=1e-12)
    assert ctrl.factors["a"] > 1 > ctrl.factors["v"]  # the lagging audio side is boosted


def test_warmup_and_schedules():
    assert shared_schedule(0, 100, 10) == 0.0
    assert shared_schedule(5, 100, 10) == pytest.approx(0.5)
    assert shared_schedule(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert shared_schedule(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert shared_schedule(55, 100, 10, "linear") == pytest.approx(0.5)
    assert shared_schedule(100, 100, 10, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert shared_schedule(70, 100, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        shared_schedule(0, 10, 0, "step")
    # No adjustment during warmup even with enough estimates.
    lrs, sched = run(
        "integral", [math.e] * 4, gamma=0.1, N=1, warmup=3, total=10, schedule="cosine"
    )
    assert sched.controller.factors["encoder"] == pytest.approx(math.exp(0.1))  # only step 3 acted
    assert lrs[1]["encoder"] == pytest.approx(1e-3 * 1 / 3)
    assert lrs[2]["encoder"] == pytest.approx(1e-3 * 2 / 3)


def test_state_round_trip_gives_identical_next_rates():
    kappas = [2.0, 0.5, 3.0, 4.0, 0.1]
    lrs_full, _ = run("integral", [*kappas, 5.0, 0.2], N=2, schedule="cosine", total=20, warmup=1)
    _, sched = run("integral", kappas, N=2, schedule="cosine", total=20, warmup=1)
    state = sched.state_dict()
    opt = make_opt()
    ctrl = FactorController(["encoder", "llm"], "integral", gamma=0.1, min_estimates=2)
    resumed = CoordinatedLR(opt, 20, 1, "cosine", controller=ctrl)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == lrs_full[len(kappas)]


def test_replay_and_none_controls():
    opt = make_opt()
    ctrl = FactorController(["encoder", "llm"], "replay", replay={1: {"encoder": 2.0, "llm": 0.5}})
    sched = CoordinatedLR(opt, 10, 0, "constant", controller=ctrl)
    assert sched.get_last_lr() == {"encoder": 1e-3, "llm": 1e-4}
    sched.step()
    assert sched.get_last_lr() == pytest.approx({"encoder": 2e-3, "llm": 5e-5})
    sched.step()  # no record for step 2: factors kept
    assert sched.get_last_lr() == pytest.approx({"encoder": 2e-3, "llm": 5e-5})
    none = FactorController(["encoder", "llm"], "none", min_estimates=0)
    none.update({"encoder": -5, "llm": 5}, {}, 100)
    assert none.factors == {"encoder": 1.0, "llm": 1.0}


def test_base_lr_never_overwritten_and_errors():
    opt = make_opt()
    sched = CoordinatedLR(opt, 10, 2, "cosine")
    for _ in range(5):
        sched.step()
    assert [g["base_lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    bad = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="has no 'name'"):
        CoordinatedLR(bad, 10)
    with pytest.raises(ValueError, match="control must be one of"):
        FactorController(["a", "b"], "pid")
    with pytest.raises(ValueError, match="max_factor"):
        FactorController(["a", "b"], max_factor=0.5)
    with pytest.raises(ValueError, match="factor_caps names unknown components"):
        FactorController(["a", "b"], factor_caps={"c": 2.0})
    with pytest.raises(ValueError, match="replay"):
        FactorController(["a", "b"], "replay")
