"""The meter's lookahead machinery: state restored bitwise, p_t slicing, snapshot scope, API."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commit_mllm import BalanceMeter, Components
from test_balance import brute_force_D, train_step
from toy import TWO, ToyMLLM, make_batch, targets


class BatchNormToy(ToyMLLM):
    """The toy with a BatchNorm in the vision encoder (running statistics + batch count)."""

    def __init__(self, dropout: float = 0.2):
        super().__init__(dropout=dropout)
        self.vision_encoder = nn.Sequential(
            nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Tanh(), nn.Dropout(dropout)
        )


class RowsToy(ToyMLLM):
    """The toy that can also cut cached encoder outputs to a row subset."""

    def select_rows(self, batch, features, n_rows):
        rows = {k: v[:n_rows] for k, v in batch.items()}
        return rows, None if features is None else features[:n_rows]


def _train(model, comps, steps, meter=None, rows=None):
    """AdamW steps on fixed batches, through the meter (every step measured) or plainly."""
    opt = torch.optim.AdamW(comps.param_groups())
    results = []
    for step in range(steps):
        batch = make_batch(rows=8, seed=step)
        logits = meter.forward(batch) if meter is not None else model(batch)
        F.cross_entropy(logits, targets(batch)).backward()
        if meter is not None:
            meter.snapshot(step)
        opt.step()
        if meter is not None:
            results.append(meter.measure(step))
        opt.zero_grad()
    return opt, results


@pytest.mark.parametrize("rows", [None, 0.5], ids=["all-rows", "half-rows"])
def test_training_with_the_meter_is_bit_identical_to_training_without(rows):
    """Weights, buffers (BatchNorm statistics, batch count) and AdamW state, after 5 steps."""
    runs = []
    for with_meter in (False, True):
        torch.manual_seed(0)
        model = BatchNormToy()
        model.train()
        comps = Components.from_model(model, TWO, lrs=0.05)
        meter = BalanceMeter(model, comps, rows=rows) if with_meter else None
        opt, measured = _train(model, comps, 5, meter)
        if with_meter:
            assert all(m is not None and m.valid for m in measured)
        runs.append((model, opt))
    (plain, plain_opt), (metered, metered_opt) = runs
    for (n, a), b in zip(plain.state_dict().items(), metered.state_dict().values()):
        assert torch.equal(a, b), n
    assert int(metered.vision_encoder[1].num_batches_tracked) == 5
    state_a, state_b = plain_opt.state_dict()["state"], metered_opt.state_dict()["state"]
    for i, s in state_a.items():
        for key, v in s.items():
            assert torch.equal(v, state_b[i][key]), (i, key)


def test_batchnorm_in_training_mode_is_not_sliced():
    model = BatchNormToy(dropout=0.0)
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, rows=0.5)
    meter.forward(make_batch(rows=8))
    assert not meter.reference.deterministic  # rows are normalized with batch statistics
    model.eval()
    meter.forward(make_batch(rows=8))
    assert meter.reference.deterministic


@pytest.mark.parametrize("cls", [RowsToy, ToyMLLM], ids=["select_rows", "no-select_rows"])
def test_sliced_p_t_equals_a_subset_forward_and_brute_force(cls):
    torch.manual_seed(5)
    model = cls()  # no dropout: deterministic
    batch = make_batch(rows=8)
    comps = Components.from_model(model, TWO, lrs=0.05)
    old = copy.deepcopy(model)
    results = {}
    for how in ("slice", "recompute"):
        m_copy = copy.deepcopy(model)
        c_copy = Components.from_model(m_copy, TWO, lrs=0.05)
        meter = BalanceMeter(m_copy, c_copy, rows=0.5, reference=how)
        calls = m_copy.encode_calls
        _, results[how] = train_step(m_copy, c_copy, batch, meter)
        # training forward + encoder branch; + the LLM branch without cut features; +
        # the reference forward when recomputed.
        extra = int(how == "recompute" or cls is ToyMLLM)
        assert m_copy.encode_calls - calls == 2 + extra
        new = m_copy
    sub = {k: v[:4] for k, v in batch.items()}
    want = brute_force_D(old, new, TWO, sub, comps.names)
    for c in comps.names:
        assert results["slice"].D[c] == pytest.approx(want[c], rel=1e-6)
        assert results["slice"].D[c] == pytest.approx(results["recompute"].D[c], rel=1e-9)
    assert results["slice"].tokens == targets(sub).numel()


def test_stochastic_forward_recomputes_p_t_on_the_subset():
    torch.manual_seed(6)
    model = ToyMLLM(dropout=0.3)
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, rows=0.5)
    meter.forward(make_batch(rows=8))
    assert not meter.reference.deterministic
    meter.snapshot(0)
    assert meter._plan == "recompute"
    assert set(meter.saved.saved) == {"encoder", "llm"}  # the recompute reads both at theta_t


def test_needed_snapshot_skips_the_encoder_and_gives_the_same_D():
    """With cached encoder outputs no branch reads the encoder at theta_t: it is not kept."""
    batch = make_batch(rows=8)
    results = {}
    for scope in ("needed", "all"):
        torch.manual_seed(7)
        model = RowsToy()
        comps = Components.from_model(model, TWO, lrs=0.05)
        meter = BalanceMeter(model, comps, rows=0.5, snapshot=scope)
        opt = torch.optim.AdamW(comps.param_groups())
        F.cross_entropy(meter.forward(batch), targets(batch)).backward()
        meter.snapshot(0)
        assert set(meter.saved.saved) == ({"llm"} if scope == "needed" else {"encoder", "llm"})
        opt.step()
        results[scope] = meter.measure(0)
    assert results["needed"].D == results["all"].D
    assert set(results["needed"].update_norms) == {"llm"}
    assert set(results["all"].update_norms) == {"encoder", "llm"}


def test_zero_update_without_a_snapshot_is_still_flagged():
    torch.manual_seed(4)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs={"encoder": 0.0, "llm": 0.05})
    meter = BalanceMeter(model, comps)
    _, m = train_step(model, comps, make_batch(), meter, opt_cls=torch.optim.SGD)
    assert "encoder" not in meter.saved.saved or not meter.saved.alive
    assert m.flags == {"encoder": "zero_update"} and m.D["encoder"] == 0.0
    # No gradient at all: the optimizer skips it, flagged without a forward.
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps)
    opt = torch.optim.SGD(comps.param_groups())
    batch = make_batch()
    F.cross_entropy(meter.forward(batch), targets(batch)).backward()
    for p in comps["encoder"].params:
        p.grad = None
    meter.snapshot(0)
    opt.step()
    calls = model.encode_calls
    m = meter.measure(0)
    assert m.flags == {"encoder": "zero_update"} and model.encode_calls == calls


def test_auto_reference_checks_slicing_once_and_falls_back(monkeypatch, caplog):
    torch.manual_seed(8)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, rows=0.5)
    _, m = train_step(model, comps, make_batch(rows=8), meter)
    assert m is not None and meter._slice_ok is True
    assert meter.state_dict() == {"slice_ok": True}
    # A model whose subset forward differs numerically from the sliced full batch.
    torch.manual_seed(8)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, rows=0.5)
    real = meter.lookahead.recompute

    def noisy(ref, n, epoch):
        out = real(ref, n, epoch)
        out.logits = out.logits + 0.5 * torch.randn_like(out.logits)
        return out

    monkeypatch.setattr(meter.lookahead, "recompute", noisy)
    with caplog.at_level(logging.WARNING):
        _, m = train_step(model, comps, make_batch(rows=8), meter)
    assert m is None and meter._slice_ok is False and "recomputing p_t" in caplog.text
    meter.forward(make_batch(rows=8))
    meter.snapshot(1)
    assert meter._plan == "recompute"


@pytest.mark.parametrize(
    "lrs",
    [{"encoder": 0.0, "llm": 0.0}, {"encoder": 0.0, "llm": 1e-9}],
    ids=["zero-rate-step", "zero-update-component"],
)
def test_the_slicing_check_reads_float_noise_on_a_zero_rate_step_as_noise(monkeypatch, lrs):
    """KL noise of a few 1e-15 per token against D_c of 0 (or ~1e-16): slicing stays on."""
    torch.manual_seed(8)
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=lrs)
    meter = BalanceMeter(model, comps, rows=0.5)
    real = meter.lookahead.recompute

    def rounding(ref, n, epoch):  # what float32 rounding between two forwards adds
        out = real(ref, n, epoch)
        out.logits = out.logits + 1e-7 * torch.randn_like(out.logits)
        return out

    monkeypatch.setattr(meter.lookahead, "recompute", rounding)
    _, m = train_step(model, comps, make_batch(rows=8), meter)
    assert meter._slice_ok is True
    assert m is not None and m.D["encoder"] == 0.0 and m.flags["encoder"] == "zero_update"
    assert m.D["llm"] < 1e-12  # far below the noise the old check compared it with
    meter.forward(make_batch(rows=8))
    meter.snapshot(1)
    assert meter._plan == "slice"


def test_every_zero_never_measures():
    model = ToyMLLM(dropout=0.2)
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, every=0)
    for step in range(3):
        _, m = train_step(model, comps, make_batch(seed=step), meter, step=step)
        assert m is None and meter.reference is None and not meter.saved.alive


def test_at_theta_t_and_replay_on_the_next_batch():
    """Issue 12's use: the next batch's logits with one component put back at theta_t."""
    torch.manual_seed(9)
    model = ToyMLLM(dropout=0.2)
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps, keep_snapshot=True, snapshot="all")
    old = copy.deepcopy(model)
    _, m = train_step(model, comps, make_batch(seed=0), meter)
    assert m is not None and meter.saved.alive  # kept past measure
    new = copy.deepcopy(model)
    nxt = make_batch(seed=1)
    logits = meter.forward(nxt)  # the next training forward, at theta_{t+1}
    ref = meter.reference
    for name in ("llm", "encoder"):
        encode_calls = model.encode_calls
        with meter.at_theta_t(name):
            got = meter.replay(ref)
        # Cached encoder outputs are reused exactly when the encoder is at theta_{t+1}.
        assert model.encode_calls - encode_calls == (0 if name == "llm" else 1)
        mixed = copy.deepcopy(new)
        prefixes = TWO[name]
        state = dict(old.named_parameters())
        with torch.no_grad():
            for pname, p in mixed.named_parameters():
                if any(pname.startswith(pre + ".") for pre in prefixes):
                    p.copy_(state[pname])
        torch.set_rng_state(ref.rng_start[0])
        want = mixed(nxt)
        assert torch.allclose(got, want, atol=1e-6), name
    assert torch.equal(meter.replay(ref), logits.detach())  # all at theta_{t+1} again
    for (n, a), b in zip(model.named_parameters(), new.parameters()):
        assert torch.equal(a, b), n
    meter.release()
    assert not meter.saved.alive
    # With the default scope the encoder's theta_t is not kept: asking for it is an error.
    meter = BalanceMeter(model, comps, keep_snapshot=True)
    train_step(model, comps, make_batch(seed=2), meter)
    kept = pytest.raises(KeyError, match="no theta_t kept for component 'encoder'")
    with kept, meter.at_theta_t("encoder"):
        pass


def test_subset_reference_rows():
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, lrs=0.05)
    meter = BalanceMeter(model, comps)
    logits = meter.forward(make_batch(rows=8))
    sub = meter.subset(3)
    assert sub.rows == 3
    assert torch.equal(sub.logits, logits.detach()[: sub.logits.shape[0]])
    assert torch.allclose(meter.replay(sub), sub.logits, atol=1e-6)
    with pytest.raises(RuntimeError, match="no theta_t is kept"), meter.at_theta_t("llm"):
        pass


class LLMDropoutToy(RowsToy):
    """Dropout in the LLM only (like LoRA dropout): the encoder pathway is deterministic."""

    def __init__(self):
        super().__init__(dropout=0.3)
        self.vision_encoder[2] = nn.Identity()


def test_llm_only_dropout_redecodes_the_cached_features():
    batch = make_batch(rows=8)
    results, calls = {}, {}
    for how in ("auto", "recompute"):
        torch.manual_seed(11)
        model = LLMDropoutToy()
        comps = Components.from_model(model, TWO, lrs=0.05)
        meter = BalanceMeter(model, comps, rows=0.5, reference=how)
        opt = torch.optim.AdamW(comps.param_groups())
        F.cross_entropy(meter.forward(batch), targets(batch)).backward()
        ref = meter.reference
        assert not ref.deterministic and ref.encoder_deterministic
        meter.snapshot(0)
        assert meter._plan == ("redecode" if how == "auto" else "recompute")
        # The LLM-only rerun reads no encoder parameter at theta_t: it is not kept.
        assert set(meter.saved.saved) == ({"llm"} if how == "auto" else {"encoder", "llm"})
        opt.step()
        before = model.encode_calls
        results[how] = meter.measure(0)
        calls[how] = model.encode_calls - before
    assert calls == {"auto": 1, "recompute": 2}  # the encoder branch only, vs + the reference
    for c in ("encoder", "llm"):
        assert results["auto"].D[c] > 0
        assert results["auto"].D[c] == pytest.approx(results["recompute"].D[c], rel=1e-9)


@pytest.mark.gpu
def test_offloaded_snapshot_on_cuda_gives_the_same_estimate():
    """theta_t in pinned host memory: same D_c, parameters back on the device bitwise."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batch = {k: v.cuda() for k, v in make_batch(rows=8).items()}
    results = []
    for offload in (False, True):
        torch.manual_seed(12)
        model = RowsToy(dropout=0.2).cuda()
        comps = Components.from_model(model, TWO, lrs=0.05)
        meter = BalanceMeter(model, comps, rows=0.5, offload=offload, snapshot="all")
        opt = torch.optim.AdamW(comps.param_groups())
        F.cross_entropy(meter.forward(batch), targets(batch)).backward()
        meter.snapshot(0)
        assert all(
            t.device.type == ("cpu" if offload else "cuda") for t in meter.saved.saved["llm"]
        )
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        results.append(meter.measure(0))
        for n, p in model.named_parameters():
            assert p.is_cuda and torch.equal(p, after[n]), n
    assert pytest.approx(results[1].D, rel=1e-9) == results[0].D
    assert results[0].update_norms == pytest.approx(results[1].update_norms, rel=1e-6)
