"""The balance meter against brute-force computations written here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from commit_mllm import BalanceMeter, Components, kl_sum
from toy import THREE, TWO, NoCacheWrapper, ToyMLLM, make_batch, targets


def brute_force_D(old_model, new_model, comp_patterns, batch, names, forward=None):
    """D_c by hand: copy theta_t, move only component c to theta_{t+1}, KL in float64."""
    forward = forward or (lambda m, b: m(b))
    new_state = dict(new_model.named_parameters())
    with torch.no_grad():
        p = torch.log_softmax(forward(old_model, batch).double(), -1)
        out = {}
        for name in names:
            moved = copy.deepcopy(old_model)
            for pname, param in moved.named_parameters():
                if any(pname.startswith(pref + ".") for pref in comp_patterns[name]):
                    param.copy_(new_state[pname])
            q = torch.log_softmax(forward(moved, batch).double(), -1)
            out[name] = float((p.exp() * (p - q)).sum(-1).mean())
    return out


def train_step(model, comps, batch, meter, lr=0.05, opt_cls=torch.optim.Adam, step=0):
    opt = opt_cls(comps.param_groups(), lr=lr)
    logits = meter.forward(batch)
    F.cross_entropy(logits, targets(batch)).backward()
    meter.snapshot(step)
    opt.step()
    return opt, meter.measure(step)


@pytest.mark.parametrize("patterns,audio", [(TWO, False), (THREE, True)], ids=["two", "three"])
def test_D_and_kappa_match_brute_force(patterns, audio):
    torch.manual_seed(0)
    model = ToyMLLM(audio=audio)
    batch = make_batch(audio=audio)
    comps = Components.from_model(model, patterns, lrs=0.05)
    old = copy.deepcopy(model)
    meter = BalanceMeter(model, comps)
    _, m = train_step(model, comps, batch, meter)
    want = brute_force_D(old, model, patterns, batch, comps.names)
    for name in comps.names:
        assert m.D[name] > 1e-8
        assert m.D[name] == pytest.approx(want[name], rel=1e-6, abs=1e-12)
    logs = {c: math.log(want[c]) for c in comps.names}
    mean_log = sum(logs.values()) / len(logs)
    for c in comps.names:
        assert m.kappa_c[c] == pytest.approx(math.exp(logs[c] - mean_log), rel=1e-6)
        assert m.shares[c] == pytest.approx(want[c] / sum(want.values()), rel=1e-6)
    if len(comps.names) == 2:
        assert m.pair == ("llm", "encoder")
        assert m.kappa == pytest.approx(want["llm"] / want["encoder"], rel=1e-6)
    else:
        assert m.kappa is None
    assert m.tokens == targets(batch).numel()
    assert m.valid


def test_cached_branch_equals_full_forward_and_skips_encoder():
    torch.manual_seed(1)
    model = ToyMLLM()
    twin = copy.deepcopy(model)
    batch = make_batch()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps)
    assert meter.cached and meter.lookahead.encoder_side == {"encoder"}
    _, m = train_step(model, comps, batch, meter, step=0)
    # One encode in the training forward, one for the encoder branch; none for the LLM branch.
    assert model.encode_calls == 2

    wrapped = NoCacheWrapper(twin)
    twin_comps = Components.from_model(
        wrapped,
        {"encoder": ["inner.vision_encoder", "inner.vision_projector"], "llm": ["inner.llm"]},
        0.05,
    )
    plain = BalanceMeter(wrapped, twin_comps, forward_fn=lambda mod, b: mod(b))
    assert not plain.cached
    _, m2 = train_step(wrapped, twin_comps, batch, plain, step=0)
    assert m.D["llm"] == pytest.approx(m2.D["llm"], rel=1e-12)
    assert m.D["encoder"] == pytest.approx(m2.D["encoder"], rel=1e-12)


def test_parameters_grads_and_optimizer_state_untouched():
    torch.manual_seed(2)
    model = ToyMLLM(dropout=0.2)
    batch = make_batch()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps)
    opt = torch.optim.AdamW(comps.param_groups())
    logits = meter.forward(batch)
    F.cross_entropy(logits, targets(batch)).backward()
    meter.snapshot(0)
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    m = meter.measure(0)
    assert m is not None and m.valid
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.data_ptr() == storage[n], n  # each parameter gets its own storage back
        assert torch.equal(p.grad, grads[n]), n
    after = opt.state_dict()
    for k, s in state["state"].items():
        for key, v in s.items():
            assert torch.equal(after["state"][k][key], v)
    assert torch.equal(torch.get_rng_state(), rng)  # training randomness is not consumed


def test_dropout_replay_gives_exact_zero_for_a_still_component():
    torch.manual_seed(3)
    model = ToyMLLM(dropout=0.3)
    model.train()
    batch = make_batch()
    comps = Components.from_model(model, TWO, lrs={"encoder": 0.0, "llm": 0.05})
    meter = BalanceMeter(model, comps, skip_zero_update=False)
    _, m = train_step(model, comps, batch, meter, opt_cls=torch.optim.SGD)
    assert m.D["encoder"] == 0.0
    assert m.D["llm"] > 0
    assert math.isfinite(m.kappa) and m.kappa == 1e6


def test_zero_update_component_is_flagged_not_infinite():
    torch.manual_seed(4)
    model = ToyMLLM()
    batch = make_batch()
    comps = Components.from_model(model, TWO, lrs={"encoder": 0.0, "llm": 0.05})
    meter = BalanceMeter(model, comps, snapshot="all")
    _, m = train_step(model, comps, batch, meter, opt_cls=torch.optim.SGD)
    assert m.flags == {"encoder": "zero_update"}
    assert m.D["encoder"] == 0.0 and m.update_norms["encoder"] == 0.0
    assert math.isfinite(m.kappa) and not m.valid
    assert all(math.isfinite(v) for v in m.kappa_c.values())


def test_frozen_component_reported():
    model = ToyMLLM()
    for p in model.vision_encoder.parameters():
        p.requires_grad_(False)
    comps = Components.from_model(
        model,
        {"encoder": ["vision_encoder"], "projector": ["vision_projector"], "llm": ["llm"]},
        0.05,
    )
    meter = BalanceMeter(model, comps)
    _, m = train_step(model, comps, make_batch(), meter)
    assert m.flags == {"encoder": "frozen"}
    assert m.D["encoder"] == 0.0 and m.D["projector"] > 0 and m.D["llm"] > 0


def test_row_subset_matches_brute_force_on_those_rows():
    torch.manual_seed(5)
    model = ToyMLLM()
    batch = make_batch(rows=8)
    comps = Components.from_model(model, TWO, lrs=0.05)
    old = copy.deepcopy(model)
    meter = BalanceMeter(model, comps, rows=0.5)
    _, m = train_step(model, comps, batch, meter)
    sub = {k: v[:4] for k, v in batch.items()}
    want = brute_force_D(old, model, TWO, sub, comps.names)
    for c in comps.names:
        assert m.D[c] == pytest.approx(want[c], rel=1e-6)
    assert m.tokens == targets(sub).numel()


def test_dropout_off_measures_in_eval_mode():
    torch.manual_seed(6)
    model = ToyMLLM(dropout=0.3)
    batch = make_batch()
    comps = Components.from_model(model, TWO, lrs=0.05)
    old = copy.deepcopy(model).eval()
    meter = BalanceMeter(model, comps, dropout="off")
    _, m = train_step(model, comps, batch, meter)
    assert model.training
    want = brute_force_D(old, copy.deepcopy(model).eval(), TWO, batch, comps.names)
    for c in comps.names:
        assert m.D[c] == pytest.approx(want[c], rel=1e-6)


def test_every_k_and_no_tokens():
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, every=3)
    assert [meter.due(s) for s in range(6)] == [False, False, True, False, False, True]
    _, m = train_step(model, comps, make_batch(), meter, step=1)
    assert m is None
    batch = make_batch()
    batch["labels"][:] = -100
    meter.forward(batch)
    meter.snapshot(5)
    for p in model.parameters():
        p.data.add_(0.01)
    m = meter.measure(5)
    assert m.tokens == 0 and m.kappa is None and not m.valid
    assert all(v == 0.0 for v in m.D.values())


def test_sgd_lr_ratio_moves_log_kappa_by_twice_its_log():
    """D_c grows with the square of c's step: x10 on the LLM's LR -> kappa x ~100."""
    shifts = []
    for seed in range(3):
        logk = {}
        for llm_lr in (1e-3, 1e-2):
            torch.manual_seed(seed)
            model = ToyMLLM()
            comps = Components.from_model(model, TWO, lrs={"encoder": 1e-3, "llm": llm_lr})
            meter = BalanceMeter(model, comps)
            _, m = train_step(model, comps, make_batch(seed=seed), meter, opt_cls=torch.optim.SGD)
            logk[llm_lr] = math.log(m.kappa)
        shifts.append(logk[1e-2] - logk[1e-3])
    for s in shifts:
        assert s == pytest.approx(math.log(100), rel=0.25)


def test_kl_sum_float32_and_float64_agree():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 50, generator=g)
    b = a + 1e-3 * torch.randn(70, 50, generator=g)
    want = F.kl_div(
        F.log_softmax(b.double(), -1),
        F.log_softmax(a.double(), -1),
        log_target=True,
        reduction="sum",
    )
    assert float(kl_sum(a, b, chunk=16)) == pytest.approx(float(want), rel=1e-9)
    assert float(kl_sum(a, b, chunk=16, dtype=torch.float32)) == pytest.approx(
        float(want), rel=1e-2
    )


def test_all_reduce_hook_sums_kl_and_tokens():
    torch.manual_seed(7)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    seen = []

    def double(t):  # as if a second rank had the same sums
        seen.append(t.clone())
        t.mul_(2)

    meter = BalanceMeter(model, comps, all_reduce=double)
    _, m = train_step(model, comps, make_batch(), meter)
    assert len(seen) == 1 and seen[0].dtype == torch.float64
    assert m.tokens == 2 * targets(make_batch()).numel()
    assert m.D["llm"] == pytest.approx(float(seen[0][1] / seen[0][2]), rel=1e-12)


def test_meter_argument_errors():
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    with pytest.raises(ValueError, match="every"):
        BalanceMeter(model, comps, every=-1)
    with pytest.raises(ValueError, match="snapshot"):
        BalanceMeter(model, comps, snapshot="some")
    with pytest.raises(ValueError, match="reference"):
        BalanceMeter(model, comps, reference="guess")
    with pytest.raises(ValueError, match="dropout"):
        BalanceMeter(model, comps, dropout="maybe")
    with pytest.raises(ValueError, match="rows"):
        BalanceMeter(model, comps, rows=1.5)


def _flatten_into_one_buffer(model):
    """Make every parameter a view into one flat buffer, as FSDP / ZeRO flat parameters are."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def test_views_into_a_flat_buffer_are_written_in_place():
    batch = make_batch()
    results = []
    for flat_params in (False, True):
        torch.manual_seed(3)
        model = ToyMLLM()
        flat = _flatten_into_one_buffer(model) if flat_params else None
        comps = Components.from_model(model, TWO, lrs=0.05)
        meter = BalanceMeter(model, comps)
        opt = torch.optim.SGD(comps.param_groups())
        F.cross_entropy(meter.forward(batch), targets(batch)).backward()
        meter.snapshot(0)
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        results.append(meter.measure(0))
        for n, p in model.named_parameters():
            assert torch.equal(p, after[n]), n
        if flat is not None:
            ptrs = [p.data_ptr() for p in model.parameters()]
            start, size = flat.data_ptr(), flat.numel() * flat.element_size()
            assert all(start <= q < start + size for q in ptrs)  # still views of the buffer
    plain, viewed = results
    assert plain.D["encoder"] > 0 and plain.D["llm"] > 0
    assert pytest.approx(plain.D, rel=1e-12) == viewed.D


def test_sharded_meter_sums_update_norms_over_ranks():
    torch.manual_seed(4)
    batch = make_batch()
    norms = []
    for sharded in (False, True):
        torch.manual_seed(4)
        model = ToyMLLM()
        comps = Components.from_model(model, TWO, lrs=0.05)
        calls = []

        def twice(t, calls=calls):  # two ranks holding equal shards
            calls.append(t.clone())
            t.mul_(2)

        meter = BalanceMeter(model, comps, all_reduce=twice, sharded=sharded, snapshot="all")
        opt = torch.optim.SGD(comps.param_groups())
        F.cross_entropy(meter.forward(batch), targets(batch)).backward()
        meter.snapshot(0)
        opt.step()
        norms.append(meter.measure(0).update_norms)
        assert len(calls) == (2 if sharded else 1)  # + the KL sums, always
    for c in ("encoder", "llm"):
        assert norms[1][c] == pytest.approx(norms[0][c] * math.sqrt(2), rel=1e-9)
    with pytest.raises(ValueError, match="sharded parameters need all_reduce"):
        BalanceMeter(model, comps, sharded=True)
