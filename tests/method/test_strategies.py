"""Diagnostics, regularizer, strategies and the CoMMIT facade."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from commit_mllm import (
    BalanceMeasurement,
    BalanceTracker,
    CoMMIT,
    CoMMITConfig,
    Components,
    EntropyRegularizer,
    mean_entropy,
)
from toy import TWO, ToyMLLM, make_batch, targets


def meas(kappa, step=0):
    D = {"encoder": 1e-4, "llm": 1e-4 * kappa}
    return BalanceMeasurement(step, D, kappa, {}, {}, {}, 5)


# ---- diagnostics -------------------------------------------------------------------------
def feed(tracker, kappas, start=0, every=1):
    """Estimates at steps start, start + every, ...; returns the last state."""
    st = None
    for i, k in enumerate(kappas):
        st = tracker.update(meas(k, start + i * every))
    return st


def test_kappa_bar_is_the_geometric_mean_and_states():
    tr = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=4)
    st = feed(tr, (2.0, 8.0, 0.5, 4.0))
    assert st.kappa_bar == pytest.approx((2 * 8 * 0.5 * 4) ** 0.25)
    assert st.bias_index == pytest.approx(abs(math.log(st.kappa_bar)))
    assert st.state == "balanced"  # log(2) < log(3)
    st = feed(tr, [50.0] * 4, start=4)
    assert st.state == "biased-to-llm" and not st.collapse
    st = feed(tr, [1e-3] * 4, start=8)
    assert st.state == "biased-to-encoder"
    st = feed(tr, [1e3] * 4, start=12)
    assert st.collapse  # log kappa_bar = 6.9 > 5


def test_window_is_counted_in_steps():
    """Every K steps the window of N steps holds ceil(N / K) estimates; N is not K-stretched."""
    tr = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=8, every=4)
    assert tr.needed == 2
    st = tr.update(meas(2.0, 3))
    assert st.state == "warming_up" and st.kappa_bar == pytest.approx(2.0)
    st = tr.update(meas(0.5, 7))
    assert st.state == "balanced" and st.kappa_bar == pytest.approx(1.0)
    st = tr.update(meas(8.0, 11))  # step 3 has left the window (11 - 8 = 3)
    assert st.kappa_bar == pytest.approx(2.0) and st.estimates == 3
    st = tr.update(meas(1.0, 30))  # after a gap only the newest remains
    assert st.kappa_bar == pytest.approx(1.0)


def test_oscillation_needs_swings_of_the_smoothed_value():
    rng = random.Random(0)
    noisy = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=10)
    st = feed(noisy, [math.exp(rng.gauss(0, 2.5)) for _ in range(200)])
    assert st.state == "balanced"  # raw flips from noise alone are not oscillation
    swing = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=5)
    st = feed(swing, [math.exp(4.0 if (t // 15) % 2 else -4.0) for t in range(200)])
    assert st.state == "oscillating" and st.flip_rate > 0.05 and st.oscillation_index > 1
    # The same swings sampled every 3 steps: flip rate per step, same verdict.
    sparse = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=6, every=3)
    kappas = [math.exp(4.0 if (3 * t // 15) % 2 else -4.0) for t in range(67)]
    st3 = feed(sparse, kappas, every=3)
    assert st3.state == "oscillating"
    assert st3.flip_rate == pytest.approx(st.flip_rate, rel=0.35)


def test_tracker_skips_estimates_without_signal_and_round_trips():
    tr = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=3)
    bad = BalanceMeasurement(
        0, {"encoder": 0.0, "llm": 1e-3}, 1e6, {}, {}, {"encoder": "zero_update"}, 5
    )
    tr.update(bad)
    assert tr.estimates == 0 and tr.last_z is None
    feed(tr, (2.0, 3.0, 5.0, 0.1), start=1)
    twin = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=3)
    twin.load_state_dict(copy.deepcopy(tr.state_dict()))
    assert twin.state == tr.state
    assert twin.update(meas(7.0, 5)) == tr.update(meas(7.0, 5))


def test_kappa_target_shifts_the_imbalance():
    tr = BalanceTracker(["encoder", "llm"], ("llm", "encoder"), window=1, kappa_target=4.0)
    st = tr.update(meas(4.0))
    assert st.z_bar["llm"] == pytest.approx(0.0, abs=1e-12) and st.bias_index < 1e-12


# ---- regularizer -------------------------------------------------------------------------
def test_entropy_bonus_matches_hand_computation():
    logits = torch.randn(5, 7, requires_grad=True)
    reg = EntropyRegularizer(alpha=0.2, tau=10.0)
    p = torch.softmax(logits.double(), -1)
    H = float(-(p * p.log()).sum(-1).mean().detach())
    assert float(mean_entropy(logits.detach())) == pytest.approx(H, rel=1e-6)
    assert reg.weight(math.log(100.0)) == 1.0
    assert reg.weight(0.5 * math.log(10.0)) == pytest.approx(0.5)
    assert float(reg.loss(logits, 0.5 * math.log(10.0))) == pytest.approx(-0.2 * 0.5 * H, rel=1e-6)
    assert float(EntropyRegularizer(alpha=0.0).loss(logits, 5.0)) == 0.0
    assert float(reg.loss(logits, 0.0)) == 0.0
    with pytest.raises(ValueError, match="tau must be > 1"):
        EntropyRegularizer(0.1, tau=1.0)


def test_lagging_only_sends_the_bonus_to_one_component():
    torch.manual_seed(0)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, 1e-3)
    batch = make_batch()
    reg = EntropyRegularizer(alpha=1.0, lagging_only=True)

    def grads(with_aux, lagging=None):
        model.zero_grad()
        logits = model(batch)
        ce = F.cross_entropy(logits, targets(batch))
        aux = reg.loss(logits, 10.0) if with_aux else logits.sum() * 0
        reg.backward(ce, aux, lagging)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ce_only = grads(False)
    only_enc = grads(True, comps["encoder"].params)
    for n in comps["llm"].names:
        assert torch.allclose(only_enc[n], ce_only[n], atol=1e-7)
    assert any(not torch.allclose(only_enc[n], ce_only[n]) for n in comps["encoder"].names)


# ---- strategies and the facade -----------------------------------------------------------
def run(strategy, steps=12, total=None, **cfg):
    cfg.setdefault("exact", "every" not in cfg and "rows" not in cfg)
    torch.manual_seed(0)
    model = ToyMLLM(dropout=0.1)
    comps = Components.from_model(model, TWO, lrs={"encoder": 1e-2, "llm": 1e-2})
    opt = torch.optim.AdamW(comps.param_groups())
    commit = CoMMIT(
        model, opt, comps, CoMMITConfig(strategy=strategy, **cfg), total_steps=total or steps
    )
    history = []
    for step in range(steps):
        batch = make_batch(seed=step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = copy.deepcopy(opt.state_dict()["state"])
        logits = commit.forward(batch)
        ce = F.cross_entropy(logits, targets(batch))
        commit.backward(ce, commit.aux_loss(logits))
        commit.after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        commit.before_step()
        opt.step()
        report = commit.after_step()
        opt.zero_grad()
        history.append((report, before, state_before, copy.deepcopy(opt.state_dict()["state"])))
    return model, comps, opt, commit, history


def test_feature_cd_freezes_the_other_side_and_its_optimizer_state():
    model, comps, opt, _, history = run("feature_cd", steps=8, cd_named_steps=3, cd_other_steps=2)
    idx = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    after = {n: p for n, p in model.named_parameters()}
    for step, (report, before, st_before, st_after) in enumerate(history):
        moving = "encoder" if step % 5 < 3 else "llm"
        still = "llm" if moving == "encoder" else "encoder"
        assert report.grad_coeffs == {moving: 1.0, still: 0.0}
        nxt = (
            history[step + 1][1]
            if step + 1 < len(history)
            else {n: p.detach() for n, p in after.items()}
        )
        for n, p in zip(comps[still].names, comps[still].params):
            assert torch.equal(before[n], nxt[n]), (step, n)
            i = idx[id(p)]
            if i in st_before:
                assert all(torch.equal(v, st_after[i][k]) for k, v in st_before[i].items())
        assert any(not torch.equal(before[n], nxt[n]) for n in comps[moving].names)
        assert report.measurement.flags == {still: "zero_update"}


def test_language_cd_starts_with_the_llm_block():
    *_, history = run("language_cd", steps=4, cd_named_steps=2, cd_other_steps=2)
    assert [h[0].grad_coeffs["llm"] for h in history] == [1.0, 1.0, 0.0, 0.0]


def test_ogm_ge_scales_the_dominant_gradient():
    *_, history = run("ogm_ge", steps=6, window=2, ogm_rho=1.0)
    last = history[-1][0]
    z = history[-2][0].balance.z_bar
    dom = max(z, key=z.get)
    assert last.grad_coeffs[dom] == pytest.approx(1 - math.tanh(z[dom] / 2))
    assert last.grad_coeffs[min(z, key=z.get)] == 1.0


def test_commit_logs_every_field_and_keeps_the_budget():
    *_, commit, history = run("commit", steps=12, window=3, gamma=0.1)
    rec = history[-1][0].as_log()
    for key in (
        "kappa",
        "kappa_bar",
        "state",
        "D/encoder",
        "D/llm",
        "lr/encoder",
        "lr/llm",
        "grad_norm/encoder",
        "update_norm/llm",
        "factor/encoder",
        "aux_weight",
    ):
        assert key in rec, key
    f = commit.scheduler.controller.factors
    assert f["encoder"] * f["llm"] == pytest.approx(1.0) and f["encoder"] != 1.0
    assert history[-1][0].aux_weight > 0


def test_constant_never_changes_factors_and_commit_clr_has_no_aux():
    *_, commit, history = run("constant", steps=6, window=1)
    assert commit.scheduler.controller.factors == {"encoder": 1.0, "llm": 1.0}
    *_, history = run("commit_clr", steps=6, window=1)
    assert all(h[0].aux_weight == 0 for h in history)


def test_facade_state_round_trip_continues_identically():
    *_, _commit_a, hist_a = run("commit", steps=10, window=3, gamma=0.1)
    *_, commit_b, _ = run("commit", steps=6, total=10, window=3, gamma=0.1)
    state = copy.deepcopy(commit_b.state_dict())
    assert state["step"] == 6
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs={"encoder": 1e-2, "llm": 1e-2})
    opt = torch.optim.AdamW(comps.param_groups())
    fresh = CoMMIT(model, opt, comps, CoMMITConfig(window=3, gamma=0.1, exact=True), total_steps=10)
    fresh.load_state_dict(state)
    assert fresh.scheduler.get_last_lr() == hist_a[6][0].lrs
    assert fresh.tracker.state == hist_a[5][0].balance


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"commit.strategy = 'sgd' is invalid: use one of commit"):
        CoMMITConfig(strategy="sgd")
    with pytest.raises(ValueError, match=r"commit.cd_other_steps = 9 is invalid"):
        CoMMITConfig(cd_named_steps=3, cd_other_steps=9)
    with pytest.raises(ValueError, match="commit_clr is CoMMIT without the regularizer"):
        CoMMITConfig(strategy="commit_clr", alpha=0.1)
    with pytest.raises(ValueError, match=r"commit.rows = 0 is invalid"):
        CoMMITConfig(rows=0)
    assert CoMMITConfig(strategy="commit").effective_alpha == 0.1
    assert CoMMITConfig(strategy="ogm_ge").effective_control == "none"


def test_every_k_steps_an_estimate_stands_for_k_steps():
    from commit_mllm.method.scheduler import integral_gain

    *_, commit, history = run("commit", steps=8, every=4, rows=None, window=1, gamma=0.05)
    reports = [h[0] for h in history]
    assert [r.step for r in reports if r.measurement is not None] == [3, 7]
    # Gradient norms are sampled with kappa; kappa_bar is held between estimates.
    assert [bool(r.grad_norms) for r in reports] == [False, False, False, True] * 2
    assert reports[5].balance == reports[4].balance == reports[3].balance
    log_f = 0.0
    for r in reports:
        if r.measurement is not None:
            log_f += integral_gain(0.05, 4) * math.log(r.measurement.kappa)
            assert math.log(r.factors["encoder"]) == pytest.approx(log_f, rel=1e-9)
    assert commit.state_dict()["last_estimate"] == 7


def test_measuring_frequency_per_strategy_and_off_switch():
    assert CoMMITConfig().effective_every == 16 and CoMMITConfig().effective_rows == 0.25
    assert CoMMITConfig(exact=True).effective_every == 1
    assert CoMMITConfig(exact=True).effective_rows is None
    assert CoMMITConfig(every=4, diagnostics_every=0).effective_every == 4  # commit steers
    assert CoMMITConfig(strategy="ogm_ge", diagnostics_every=0).effective_every == 16
    assert CoMMITConfig(strategy="constant", every=4).effective_every == 4
    assert CoMMITConfig(strategy="constant", every=4, diagnostics_every=2).effective_every == 2
    assert CoMMITConfig(strategy="feature_cd", diagnostics_every=0).effective_every == 0
    with pytest.raises(ValueError, match=r"commit.every = 0 is invalid"):
        CoMMITConfig(every=0)
    with pytest.raises(ValueError, match=r"commit.diagnostics_every = -1 is invalid"):
        CoMMITConfig(diagnostics_every=-1)
    # Switched off: no estimate ever (step 0 included), no snapshot, no gradient norms.
    _model, _, _, commit, history = run("constant", steps=10, every=1, diagnostics_every=0)
    assert all(h[0].measurement is None and not h[0].grad_norms for h in history)
    assert commit.meter.reference is None and not commit.meter.saved.alive
