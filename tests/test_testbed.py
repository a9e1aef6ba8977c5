"""The testbed grid runner (benchmarks/testbed.py): commands, summary, goal, outputs."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import testbed  # noqa: E402
import testbed_summary as ts  # noqa: E402


def _args(cmd: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))


def test_run_command_sets_the_ratio_against_the_configs_llm_rate(tmp_path):
    grid = testbed.Grid(parts="tiny")
    cmd = testbed.run_command(grid, "vision", "B", "progress", 10.0, 1, tmp_path)
    args = _args(cmd)
    eta = testbed.llm_lr(testbed.config_path(grid, "vision", "B"))
    assert float(args["train.llm_lr"]) == eta
    assert float(args["train.encoder_lr"]) == pytest.approx(10.0 * eta)
    assert args["commit.strategy"] == "progress"
    assert args["run.seed"] == "1" and args["train.eval_every"] == "0"  # not a curve seed
    assert cmd[cmd.index("--config") + 1].endswith("configs/testbed/vision-B-tiny.yaml")


def test_text_only_is_constant_with_the_media_zeroed(tmp_path):
    cmd = testbed.run_command(testbed.Grid(), "audio", "A", testbed.TEXT_ONLY, 1.0, 0, tmp_path)
    args = _args(cmd)
    assert args["commit.strategy"] == "constant" and args["data.blind"] == "true"
    assert "train.eval_every" not in args  # seed 0 draws the learning curve


def test_every_cell_of_the_full_grid_has_a_config():
    for task in testbed.FULL.tasks:
        for regime in testbed.FULL.regimes:
            assert testbed.config_path(testbed.FULL, task, regime).is_file(), (task, regime)


def test_every_task_of_the_grid_names_its_built_in_task():
    from commit_mllm.tasks import TASKS, VARIANTS

    assert set(testbed.TASKS.values()) <= set(TASKS)
    assert {testbed.TASKS[t] for t in testbed.MUST_LEARN} == set(VARIANTS)
    for task in testbed.MUST_LEARN_GRID.tasks:
        cfg = testbed.config_path(testbed.MUST_LEARN_GRID, task, "B")
        assert f"task: {testbed.TASKS[task]}" in cfg.read_text()


@pytest.mark.parametrize("name", ["frozen", "llava-ov", "ldog"])
def test_each_recipe_runs_once_per_seed_with_its_own_settings(tmp_path, name):
    grid = testbed.Grid(regimes=("B",), tasks=("vision",), seeds=(0, 1), baselines=(name,))
    eta = testbed.llm_lr(testbed.config_path(grid, "vision", "B"))
    runs = [j for j in testbed.jobs(grid, tmp_path) if j["strategy"] == name]
    assert len(runs) == 2  # one per seed, not one per ratio
    args = _args(runs[0]["cmd"])
    assert args["commit.strategy"] == "constant"
    if name == "frozen":
        assert args["train.freeze_encoder"] == "true"
        assert float(args["train.encoder_lr"]) == eta
    elif name == "llava-ov":
        assert args["projector_side"] == "own"
        assert float(args["train.encoder_lr"]) == pytest.approx(0.2 * eta)
        assert float(args["train.projector_lr"]) == eta
    else:
        assert args["train.optimizer"] == "ldog" and float(args["train.llm_lr"]) == 1.0


def test_regime_a_reads_frozen_off_constant_at_ratio_one_and_runs_no_llava_ov(tmp_path):
    grid = testbed.Grid(regimes=("A",), tasks=("vision",), seeds=(0,))
    names = {j["strategy"] for j in testbed.jobs(grid, tmp_path)}
    assert not {"llava-ov", "frozen"} & names and {"ldog", testbed.TEXT_ONLY} <= names
    rows = [{**_row("constant", r, 0, 0.7 + r / 100), "regime": "A"} for r in (0.1, 1.0, 10.0)]
    alias = testbed.frozen_in_a(rows)
    assert len(alias) == 1 and alias[0]["strategy"] == "frozen"
    assert alias[0]["accuracy"] == pytest.approx(0.71) and alias[0]["alias_of"] == "constant r=1"
    assert testbed.frozen_in_a([*rows, *alias]) == []  # never twice


def test_an_earlier_grids_runs_join_without_duplicates():
    new = [_row("frozen", 1.0, 0, 0.7), _row("constant", 1.0, 0, 0.8)]
    old = [_row("constant", 1.0, 0, 0.1), _row("constant", 10.0, 0, 0.6)]
    old.append({**_row("frozen", 1.0, 1, 0.5), "alias_of": "constant r=1"})
    merged = testbed.merge_rows(new, old)
    assert [(r["strategy"], r["ratio"], r["accuracy"]) for r in merged] == [
        ("frozen", 1.0, 0.7),
        ("constant", 1.0, 0.8),  # this grid's run wins
        ("constant", 10.0, 0.6),
    ]
    assert merged[-1]["reused"] is True


def test_a_split_strategy_gives_the_projector_the_llms_rate_and_the_tower_the_ratio(tmp_path):
    grid = testbed.Grid(parts="tiny")
    eta = testbed.llm_lr(testbed.config_path(grid, "vision", "B"))
    args = _args(testbed.run_command(grid, "vision", "B", "progress+split", 0.1, 0, tmp_path))
    assert args["commit.strategy"] == "progress" and args["projector_side"] == "own"
    assert float(args["train.projector_lr"]) == eta
    assert float(args["train.encoder_lr"]) == pytest.approx(0.1 * eta)


def test_the_default_ratio_axis_spans_four_decades():
    assert testbed.FULL.ratios == (0.01, 0.1, 1.0, 10.0, 100.0)


def _row(strategy, ratio, seed, acc, seconds=10.0, task="vision"):
    return {
        "task": task,
        "regime": "B",
        "strategy": strategy,
        "ratio": ratio,
        "seed": seed,
        "accuracy": acc,
        "seconds": seconds,
        "final_loss": 0.5,
        "factors": {"encoder": 1.0, "llm": 1.0},
    }


CONST = {0.1: (0.79, 0.77, 0.76), 1.0: (0.77, 0.76, 0.78), 10.0: (0.665, 0.64, 0.70)}
RULE = {0.1: (0.78, 0.78, 0.77), 1.0: (0.78, 0.77, 0.79), 10.0: (0.77, 0.76, 0.79)}
FROZEN = (0.75, 0.74, 0.76)
TEXT = (0.65, 0.65, 0.66)


def _rows(task="vision"):
    rows = [_row(testbed.TEXT_ONLY, 1.0, s, a, task=task) for s, a in enumerate(TEXT)]
    rows += [_row("frozen", 1.0, s, a, 9.0, task) for s, a in enumerate(FROZEN)]
    for name, table, secs in (("constant", CONST, 10.0), ("progress", RULE, 11.0)):
        for ratio, accs in table.items():
            rows += [_row(name, ratio, s, a, secs + s, task) for s, a in enumerate(accs)]
    return rows


def test_summary_matches_a_hand_computation():
    entry = ts.summarize(_rows())["vision-B"]
    const, rule = entry["strategies"]["constant"], entry["strategies"]["progress"]
    means = {r: statistics.fmean(a) for r, a in CONST.items()}
    assert const["mean"] == pytest.approx(statistics.fmean(means.values()))
    assert const["best_cell"] == pytest.approx(max(means.values()))
    assert const["spread"] == pytest.approx(max(means.values()) - min(means.values()))
    assert const["best_ratio"] == 0.1
    assert entry["text_only"]["mean"] == pytest.approx(statistics.fmean(TEXT))
    # a run within COLLAPSE_MARGIN of its seed's text-only accuracy is a collapse
    assert const["collapses"] == [{"ratio": 10.0, "seed": 0}, {"ratio": 10.0, "seed": 1}]
    assert rule["collapses"] == []
    assert set(entry["strategies"]) == {"constant", "progress"}  # recipes are not strategies
    # time: a run's seconds over the median of constant's runs of its seed
    want = statistics.median([(11.0 + s) / (10.0 + s) for _ in range(3) for s in range(3)])
    assert rule["time_vs_constant"] == pytest.approx(want)
    assert entry["baselines"]["frozen"]["time_vs_constant"] == pytest.approx(
        statistics.median([9.0 / (10.0 + s) for s in range(3)])
    )


def test_the_cap_rule_is_constant_at_the_smaller_of_the_set_ratio_and_one():
    base = ts.summarize(_rows())["vision-B"]["baselines"]
    cap = base["cap"]
    want = {0.1: CONST[0.1], 1.0: CONST[1.0], 10.0: CONST[1.0]}
    for ratio, accs in want.items():
        assert cap["by_ratio"][f"{ratio:g}"]["mean"] == pytest.approx(statistics.fmean(accs))
    assert cap["mean"] == pytest.approx(
        statistics.fmean(statistics.fmean(a) for a in want.values())
    )
    assert base["frozen"]["mean"] == pytest.approx(statistics.fmean(FROZEN))
    assert base["frozen"]["std"] == pytest.approx(statistics.stdev(FROZEN))
    assert base["constant_best_cell"]["mean"] == pytest.approx(statistics.fmean(CONST[0.1]))


def test_the_goal_compares_with_the_best_baseline_and_ties_only_where_freezing_is_right():
    rows = _rows() + _rows("vision-ml")
    summary = ts.summarize(rows, must_learn={"vision-ml"})
    easy, hard = summary["vision-B"], summary["vision-ml-B"]
    candidates = {
        "constant_best_cell": statistics.fmean(CONST[0.1]),
        "frozen": statistics.fmean(FROZEN),
        "cap": statistics.fmean(statistics.fmean(a) for a in (CONST[0.1], CONST[1.0], CONST[1.0])),
    }
    name = max(candidates, key=candidates.get)
    assert easy["best_baseline"] == {"name": name, "value": pytest.approx(candidates[name])}
    rule = statistics.fmean(statistics.fmean(a) for a in RULE.values())
    g, h = easy["goal"]["progress"], hard["goal"]["progress"]
    assert g["gap"] == pytest.approx(rule - candidates[name])
    assert g["mean_ge_best_baseline"] is (rule >= candidates[name] - ts.TIE)
    assert h["mean_ge_best_baseline"] is (rule >= candidates[name])
    assert g["no_collapse"] and g["time_within_limit"]  # 1.1x < 1.15x
    assert easy["must_learn"] is False and hard["must_learn"] is True
    assert "constant" not in easy["goal"]


def test_the_frozen_gap_is_constants_best_cell_minus_frozen_seed_by_seed():
    entry = ts.summarize(_rows())["vision-B"]
    gaps = [c - f for c, f in zip(CONST[0.1], FROZEN, strict=True)]  # best ratio: 0.1
    g = entry["frozen_gap"]
    assert g["ratio"] == 0.1 and g["seeds"] == [0, 1, 2]
    assert g["gap"] == pytest.approx(statistics.fmean(gaps))
    assert g["gap_std"] == pytest.approx(statistics.stdev(gaps))
    assert g["best_constant"] - g["frozen"] == pytest.approx(g["gap"])
    assert g["text_only_below_both"] is True
    # a frozen run of a seed constant lacks is left out of both sides
    extra = [*_rows(), _row("frozen", 1.0, 7, 0.99)]
    assert ts.summarize(extra)["vision-B"]["frozen_gap"]["seeds"] == [0, 1, 2]
    no_frozen = [r for r in _rows() if r["strategy"] != "frozen"]
    assert "frozen_gap" not in ts.summarize(no_frozen)["vision-B"]
    aliased = [
        {**r, "alias_of": "constant r=1"} if r["strategy"] == "frozen" else r for r in _rows()
    ]
    assert "frozen_gap" not in ts.summarize(aliased)["vision-B"]  # regime A: nothing to compare
    md = ts.markdown(ts.summarize(_rows()), testbed.Grid(), 60.0, _rows())
    assert f"{g['gap']:+.3f} ± {g['gap_std']:.3f} (r=0.1)" in md
    assert ts.headline(ts.summarize(_rows()), "progress")["B"]["vision"]["frozen_gap"] == g


def test_a_learning_curve_averages_the_seeds_evaluated_during_the_run(tmp_path):
    import testbed_plots

    curves = [[[10, 0.5], [20, 0.7]], [[10, 0.7], [20, 0.9]], [[20, 0.1]]]  # last: no curve
    steps, mean = testbed_plots._mean_curve(curves)
    assert steps == [10, 20] and mean == pytest.approx([0.6, 0.8])
    assert testbed_plots._mean_curve([]) is None
    rows = [{**r, "eval_curve": [[5, r["accuracy"]]]} for r in _rows()]
    (path,) = testbed_plots.plot(rows, "t", tmp_path)
    assert path.name == "testbed-t_vision-B.png" and path.stat().st_size > 0  # recipes drawn
    recipes = [r for r in rows if r["strategy"] in ("frozen", testbed.TEXT_ONLY)]
    assert testbed_plots.plot(recipes, "r", tmp_path)[0].is_file()  # no strategy, no ratio


def test_a_slow_strategy_misses_the_time_goal():
    rows = [r if r["strategy"] != "progress" else {**r, "seconds": 20.0} for r in _rows()]
    g = ts.summarize(rows)["vision-B"]["goal"]["progress"]
    assert g["time_within_limit"] is False and g["met"] is False
    assert "time_within_limit" in ts.verdict(g)


def test_markdown_headline_and_docs_block(tmp_path, monkeypatch):
    rows = _rows()
    summary = ts.summarize(rows)
    md = ts.markdown(summary, testbed.Grid(), 60.0, rows)
    assert "| vision | B | progress |" in md and "| vision | B | text-only |" in md
    assert "| vision | B | *frozen* |" in md and "| vision | B | *cap* |" in md
    best = summary["vision-B"]["best_baseline"]
    assert f"{best['name']} {best['value']:.3f}" in md  # the lead table
    assert "24 runs" in md
    payoff = ts.headline(summary, "progress")
    cell = payoff["B"]["vision"]
    assert payoff["recommended"] == "progress"
    assert cell["constant"]["seeds"] == [0, 1, 2] and cell["must_learn"] is False
    assert cell["best_baseline"] == best and set(cell["baselines"]) >= {"frozen", "cap"}
    assert cell["text_only"] == pytest.approx(statistics.fmean(TEXT))
    monkeypatch.setattr(ts, "RESULTS", tmp_path)
    (tmp_path / "headline.json").write_text(
        json.dumps({"overhead": {"x": 1}, "payoff": {"A": {"audio": {"keep": 1}}}})
    )
    data = json.loads(ts.write_headline(payoff).read_text())
    assert data["overhead"] == {"x": 1} and data["payoff"]["B"]["vision"]["progress"]
    assert data["payoff"]["A"]["audio"] == {"keep": 1}  # other grids' cells are kept
    data = json.loads(ts.write_headline(payoff, "real").read_text())
    assert data["payoff"]["real"]["B"]["vision"]["best_baseline"] == best
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- testbed:t -->\nold\n<!-- /testbed:t -->\nend\n")
    ts.update_docs(doc, "t", md)
    assert ts.docs_block(doc, "t") == md
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith("end\n")
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="add the markers"):
        ts.update_docs(doc, "t", md)


@pytest.mark.slow
def test_a_tiny_grid_runs_end_to_end_and_reuses_its_runs(tmp_path):
    argv = [
        "--regimes", "A", "--tasks", "vision", "--strategies", "constant,progress",
        "--ratios", "1", "--seeds", "0", "--steps", "8", "--jobs", "2", "--baselines", "frozen",
        "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), "--tag", "t",
    ]  # fmt: skip
    assert testbed.main(argv) == 0
    first = json.loads((tmp_path / "res" / "testbed-t.json").read_text())
    assert {r["strategy"] for r in first["runs"]} == {"constant", "progress", "frozen", "text_only"}
    assert all(r["accuracy"] is not None and not r["reused"] for r in first["runs"])
    assert testbed.main(argv) == 0  # everything read back, nothing trained again
    again = json.loads((tmp_path / "res" / "testbed-t.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert again["summary"] == first["summary"]
