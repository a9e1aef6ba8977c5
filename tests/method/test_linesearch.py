"""The held-out line search rule (method.linesearch) and its wiring in the coordinator."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from commit_mllm import Component, Components
from commit_mllm.method.linesearch import (
    ALPHA_RANGE,
    LineSearchController,
    LineSearchMeasurement,
    PathSnapshot,
    best_alpha,
    measure_paths,
)
from commit_mllm.method.strategies import CoMMITConfig


def test_best_alpha_is_the_vertex_of_an_exact_quadratic():
    alphas = (0.5, 1.0, 2.0)
    assert best_alpha(alphas, [(a - 1.5) ** 2 + 3.0 for a in alphas]) == pytest.approx(1.5)
    four = (0.0, 0.5, 1.0, 2.0)  # least squares through more points, still exact
    assert best_alpha(four, [2 * (a - 0.7) ** 2 for a in four]) == pytest.approx(0.7)


def test_best_alpha_is_clipped_and_falls_back_to_the_best_tried_when_not_convex():
    alphas = (0.5, 1.0, 2.0)
    assert best_alpha(alphas, [(a - 30.0) ** 2 for a in alphas]) == ALPHA_RANGE[1]
    assert best_alpha(alphas, [(a + 30.0) ** 2 for a in alphas]) == ALPHA_RANGE[0]
    assert best_alpha(alphas, [-((a - 1.0) ** 2) for a in alphas]) == 2.0  # concave
    assert best_alpha(alphas, [3.0 - a for a in alphas]) == 2.0  # linear


def _linear_components(model: nn.Module) -> Components:
    return Components(
        [
            Component("encoder", ["0."], 1.0, params=list(model[0].parameters())),
            Component("llm", ["1."], 1.0, params=list(model[1].parameters())),
        ]
    )


def test_a_path_point_is_start_plus_alpha_times_the_move_and_is_undone_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    comps = _linear_components(model)
    path = PathSnapshot(comps, ["encoder"])
    path.mark()
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(torch.randn_like(model[0].weight))
    now = model[0].weight.detach().clone()
    with path.at("encoder", 2.0):
        assert torch.allclose(model[0].weight, start + 2.0 * (now - start))
    assert torch.equal(model[0].weight, now)


def test_measured_losses_match_an_independent_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 6))
    comps = _linear_components(model)
    x = torch.randn(2, 5, 3)
    labels = torch.randint(0, 6, (2, 5))
    labels[0, :2] = -100  # unsupervised positions

    def forward_fn(m, batch):  # logits at the supervised positions, as the meter's
        logits = m(batch["x"])[:, :-1]
        return logits[batch["labels"][:, 1:] != -100]

    path = PathSnapshot(comps, ["encoder"])
    path.mark()
    start = [p.detach().clone() for p in model[0].parameters()]
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    now = [p.detach().clone() for p in model[0].parameters()]
    batch = {"x": x, "labels": labels}
    m = measure_paths(model, forward_fn, batch, path, (0.5, 1.0, 2.0), step=7)

    targets = labels[:, 1:][labels[:, 1:] != -100]
    want = []
    for alpha in (0.5, 1.0, 2.0):
        w, b = (s + alpha * (n - s) for s, n in zip(start, now))
        h = torch.nn.functional.linear(x, w, b)
        logits = model[1](h)[:, :-1][labels[:, 1:] != -100]
        want.append(float(torch.nn.functional.cross_entropy(logits.double(), targets).detach()))
    assert m.step == 7 and m.tokens == targets.numel()
    assert m.losses["encoder"] == pytest.approx(want, rel=1e-6)
    assert m.best_alpha["encoder"] == pytest.approx(best_alpha((0.5, 1.0, 2.0), want))
    assert all(torch.equal(p, n) for p, n in zip(model[0].parameters(), now))  # left as it was


def _m(vertex: float, name: str = "encoder") -> LineSearchMeasurement:
    """A measurement whose loss curve is a parabola with its vertex at ``vertex``."""
    alphas = (0.5, 1.0, 2.0)
    losses = [(a - vertex) ** 2 + 5.0 for a in alphas]
    return LineSearchMeasurement(0, alphas, {name: losses}, {name: vertex}, 10)


def test_raises_and_cuts_move_log_f_by_their_gains_and_the_anchor_stays_put():
    ctl = LineSearchController(["encoder", "llm"], "llm", gain=0.25, cut_gain=0.5, smoothing=1)
    ctl.observe(_m(30.0))  # clipped to 4
    assert ctl.log_f["encoder"] == pytest.approx(0.25 * math.log(4.0))
    ctl.observe(_m(-30.0))  # clipped to 1/4
    assert ctl.log_f["encoder"] == pytest.approx(0.25 * math.log(4.0) + 0.5 * math.log(0.25))
    assert ctl.factors["llm"] == 1.0 and ctl.steered == ["encoder"]
    before = ctl.log_f["encoder"]
    ctl.observe(_m(30.0), adjusting=False)  # warmup: the curve counts, the factor holds
    assert ctl.estimates == 3 and ctl.log_f["encoder"] == before


def test_alpha_star_is_the_vertex_of_the_averaged_curves():
    ctl = LineSearchController(["encoder", "llm"], "llm", smoothing=2.0)
    ctl.observe(_m(0.5), adjusting=False)
    assert ctl.alpha["encoder"] == pytest.approx(0.5)  # the first curve as it is
    ctl.observe(_m(2.0), adjusting=False)  # mean of two equal-curvature parabolas
    assert ctl.alpha["encoder"] == pytest.approx(1.25)


def test_equal_gains_do_not_drift_on_a_symmetric_signal():
    ctl = LineSearchController(["encoder", "llm"], "llm", smoothing=1)
    for _ in range(10):
        ctl.observe(_m(0.5))
        ctl.observe(_m(2.0))
    assert ctl.log_f["encoder"] == pytest.approx(0.0, abs=1e-12)


def test_a_factor_held_at_its_bound_is_reported_until_it_leaves_it():
    ctl = LineSearchController(
        ["encoder", "llm"], "llm", gain=1.0, cut_gain=1.0, max_raise=3.0, smoothing=1
    )
    ctl.observe(_m(30.0))
    assert ctl.factors["encoder"] == pytest.approx(3.0)
    assert ctl.at_bound == {"encoder": "ceiling"}
    ctl.observe(_m(0.5))
    assert ctl.at_bound == {} and ctl.factors["encoder"] == pytest.approx(1.5)
    again = LineSearchController(["encoder", "llm"], "llm")
    again.load_state_dict(ctl.state_dict())
    assert again.factors == ctl.factors and again.estimates == ctl.estimates
    assert again.curves == ctl.curves and again.alpha == ctl.alpha


def test_settings_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match=r"commit\.linesearch_alphas"):
        CoMMITConfig(strategy="line_search", linesearch_alphas=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"commit\.linesearch_cut_gain"):
        CoMMITConfig(strategy="line_search", linesearch_cut_gain=1.5)
    assert CoMMITConfig(strategy="line_search", diagnostics_every=0).effective_every == 16


def _train(tmp_path, name, *overrides):
    from commit_mllm.cli import main

    out = tmp_path / name
    argv = ["train", "--config", "configs/tiny.yaml", f"run.output_dir={out}", "train.steps=12"]
    argv += ["train.save_every=0", "commit.exact=false", "commit.every=4", *overrides]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_search_itself_leaves_training_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    plain = _train(tmp_path, "plain", "commit.strategy=constant")
    still = _train(
        tmp_path,
        "still",
        "commit.strategy=line_search",
        "commit.linesearch_gain=0",
        "commit.linesearch_cut_gain=0",
    )
    moved = _train(tmp_path, "moved", "commit.strategy=line_search", "train.warmup_steps=0")
    ce = [r["ce"] for r in plain if "ce" in r]
    assert [r["ce"] for r in still if "ce" in r] == ce  # measured, factors held at 1
    searched = [r for r in moved if "alpha_star/encoder" in r]
    assert [r["step"] for r in searched] == [3, 7]  # after each estimate (every 4), not the last
    assert "alpha_star/llm" not in searched[0]  # the anchor is not searched
    f = searched[0]["alpha_star/encoder"]
    assert f == pytest.approx(searched[0]["alpha_raw/encoder"])  # the first curve as it is
    want = math.exp(0.3 * math.log(f))
    assert searched[0]["factor/encoder"] == pytest.approx(want)
