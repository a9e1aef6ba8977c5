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


def _row(strategy, ratio, seed, acc, seconds=10.0):
    return {
        "task": "vision",
        "regime": "B",
        "strategy": strategy,
        "ratio": ratio,
        "seed": seed,
        "accuracy": acc,
        "seconds": seconds,
        "final_loss": 0.5,
        "factors": {"encoder": 1.0, "llm": 1.0},
    }


CONST = {0.1: (0.78, 0.77, 0.76), 1.0: (0.77, 0.76, 0.78), 10.0: (0.665, 0.64, 0.70)}
RULE = {0.1: (0.78, 0.78, 0.77), 1.0: (0.78, 0.77, 0.79), 10.0: (0.77, 0.76, 0.79)}
TEXT = (0.65, 0.65, 0.66)


def _rows():
    rows = [_row(testbed.TEXT_ONLY, 1.0, s, a) for s, a in enumerate(TEXT)]
    for name, table, secs in (("constant", CONST, 10.0), ("progress", RULE, 11.0)):
        for ratio, accs in table.items():
            rows += [_row(name, ratio, s, a, secs + s) for s, a in enumerate(accs)]
    return rows


def test_summary_and_goal_match_a_hand_computation():
    entry = testbed.summarize(_rows())["vision-B"]
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
    g = entry["goal"]["progress"]
    rule_means = [statistics.fmean(a) for a in RULE.values()]
    assert g["mean"] == pytest.approx(statistics.fmean(rule_means))
    assert g["mean_ge_best_constant_cell"] is (statistics.fmean(rule_means) >= max(means.values()))
    assert g["spread_le_third_of_constant"] is (
        max(rule_means) - min(rule_means) <= const["spread"] / 3
    )
    assert g["no_collapse"] and g["not_worse_than_constant_by_a_seed_std"]
    assert g["met"] is all(
        g[k]
        for k in (
            "mean_ge_best_constant_cell",
            "spread_le_third_of_constant",
            "no_collapse",
            "not_worse_than_constant_by_a_seed_std",
        )
    )
    # time: per (ratio, seed) cell (11 + s) / (10 + s), median over the 9 cells
    want = statistics.median([(11.0 + s) / (10.0 + s) for _ in range(3) for s in range(3)])
    assert rule["time_vs_constant"] == pytest.approx(want)
    assert const["time_vs_constant"] == pytest.approx(1.0)


def test_markdown_headline_and_docs_block(tmp_path, monkeypatch):
    rows = _rows()
    summary = testbed.summarize(rows)
    md = testbed.markdown(summary, testbed.Grid(), 60.0, rows)
    assert "| vision | B | progress |" in md and "| vision | B | text-only |" in md
    want = statistics.median([(11.0 + s) / (10.0 + s) for s in range(3)])
    assert "21 runs" in md and f"| {want:.2f}x |" in md
    payoff = testbed.headline(summary)
    assert payoff["recommended"] == testbed.RECOMMENDED
    assert payoff["B"]["vision"]["constant"]["seeds"] == [0, 1, 2]
    assert payoff["B"]["vision"]["text_only"] == pytest.approx(statistics.fmean(TEXT))
    monkeypatch.setattr(testbed, "RESULTS", tmp_path)
    (tmp_path / "headline.json").write_text(json.dumps({"overhead": {"x": 1}}))
    data = json.loads(testbed.write_headline(payoff).read_text())
    assert data["overhead"] == {"x": 1} and data["payoff"]["B"]["vision"]["progress"]
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- testbed:t -->\nold\n<!-- /testbed:t -->\nend\n")
    testbed.update_docs(doc, "t", md)
    assert testbed.docs_block(doc, "t") == md
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith("end\n")
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="add the markers"):
        testbed.update_docs(doc, "t", md)


@pytest.mark.slow
def test_a_tiny_grid_runs_end_to_end_and_reuses_its_runs(tmp_path):
    argv = [
        "--regimes", "A", "--tasks", "vision", "--strategies", "constant,progress",
        "--ratios", "10", "--seeds", "0", "--steps", "8", "--jobs", "2",
        "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), "--tag", "t",
    ]  # fmt: skip
    assert testbed.main(argv) == 0
    first = json.loads((tmp_path / "res" / "testbed-t.json").read_text())
    assert {r["strategy"] for r in first["runs"]} == {"constant", "progress", "text_only"}
    assert all(r["accuracy"] is not None and not r["reused"] for r in first["runs"])
    assert testbed.main(argv) == 0  # everything read back, nothing trained again
    again = json.loads((tmp_path / "res" / "testbed-t.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert again["summary"] == first["summary"]
