"""Smoke test of the benchmarks: the overhead core and the GPU benchmark's construction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("easy_vqa")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_step
import overhead
import overhead_memory
import overhead_quality as quality
import overhead_report


def test_overhead_core_tiny_budget(tmp_path):
    opts = overhead.Options(
        models=("tiny",),
        modes=("lora",),
        rounds=1,
        quick=True,
        error_steps=24,
        error_modes=("lora",),
        windows=(4,),
        min_block=1,
    )
    res = overhead.run_benchmark(opts, log=lambda _: None)
    assert res["meta"]["default_config"]["every"] == 16
    (entry,) = res["overhead"]
    timing = entry["timing"]
    assert {"plain", "default", "exact", "K=1 rows=0.25"} <= set(timing)
    assert all(v["median_s"] > 0 and v["ratio_paired_median"] > 0 for v in timing.values())
    assert set(entry["memory"]) == {s.name for s in overhead_memory.MEMORY_ARMS}
    (err,) = res["estimate_error"]
    cells = err["N=4"]
    assert cells["K=1 rows=1"]["error"] == 0.0 and cells["K=8 rows=0.25"]["n"] >= 1
    headline = tmp_path / "headline.json"
    headline.write_text(json.dumps({"payoff": {"x": 1}, "overhead": {"default": {"old": 9}}}))
    path = overhead_report.write_results(res, tmp_path, "overhead_smoke", headline_path=headline)
    assert json.loads(path.read_text())["overhead"][0]["model"] == "tiny"
    merged = json.loads(headline.read_text())
    assert merged["payoff"] == {"x": 1}  # another benchmark's key is kept
    assert merged["overhead"]["default"]["old"] == 9
    assert merged["overhead"]["default"]["tiny_lora"] == pytest.approx(
        timing["default"]["ratio_paired_median"], abs=1e-3
    )
    assert "tiny_lora" in merged["overhead"]["exact"]
    (tmp_path / "overhead_smoke.md").write_text("discussion\n" + overhead_report.MARKER + "\nold\n")
    overhead_report.write_results(res, tmp_path, "overhead_smoke")
    text = (tmp_path / "overhead_smoke.md").read_text()
    assert text.startswith("discussion\n") and "old" not in text and "| plain |" in text


def test_window_errors_by_hand():
    """Criterion (a)'s statistics on a log written by hand (K = 2, N = 4)."""
    exact = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    subset = [v + 0.5 for v in exact]
    cell = quality.window_errors({1.0: exact, 0.5: subset}, 2, 0.5, 4)
    # Estimate steps T = 5, 7 (T >= N, (T + 1) % 2 == 0); spans (T-4, T].
    # T=5: default = mean(3.5, 5.5) = 4.5, exact = mean(2..5) = 3.5 -> 1.0; T=7 alike.
    assert cell["error"] == pytest.approx(1.0) and cell["n"] == 2
    # floor: steps {3, 5} vs {2, 4}: |4 - 3| = 1; sampling: |4 - 3.5| = 0.5.
    assert cell["floor"] == pytest.approx(1.0) and cell["sampling"] == pytest.approx(0.5)
    assert cell["meets"]


def test_closed_loop_comparison_rule():
    runs = [
        {"arm": arm, "ratio": 1.0, "seed": s, "factor_encoder": f, "accuracy": a}
        for arm, fs, accs in (
            ("default", (1.0, 1.2, 1.1), (0.70, 0.72, 0.71)),
            ("exact", (1.1, 1.3, 1.2), (0.90, 0.91, 0.92)),
        )
        for s, f, a in zip(range(3), fs, accs)
    ]
    cells = {c["metric"]: c for c in quality.compare_arms(runs, [1.0])}
    assert cells["log_factor_encoder"]["within_noise"]
    assert not cells["accuracy"]["within_noise"]
    assert cells["accuracy"]["diff"] == pytest.approx(-0.2)


def test_gpu_step_tiny_builds_and_steps(tmp_path):
    assert gpu_step.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_step_tiny.json").read_text())
    assert set(res["timing"]) == {"plain", "default", "exact"}
    assert res["shape"]["image_tokens"] == 16


def test_gpu_step_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(gpu_step.torch.cuda, "is_available", lambda: False)
    assert gpu_step.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_zero3_summary_pairs_each_default_launch_with_the_plain_ones_around_it():
    import overhead_zero3

    def run(arm, times, estimate, peak):
        return {"arm": arm, "times": times, "estimate_times": estimate, "peak_bytes": peak}

    runs = [
        run("plain", [1.0, 1.0], [1.0], 100.0),
        run("default", [1.2, 1.2], [3.0], 110.0),
        run("plain", [1.0, 1.4], [1.0], 104.0),
        run("default", [1.5, 1.5], [2.4], 112.0),
        run("plain", [1.2, 1.2], [1.2], 102.0),
    ]
    s = overhead_zero3.summarize(runs)
    # plain means 1.0, 1.2, 1.2: the first default over (1.0 + 1.2) / 2, the second over 1.2
    assert s["time_ratios"] == pytest.approx([1.2 / 1.1, 1.5 / 1.2])
    assert s["time_ratio_paired_median"] == pytest.approx((1.2 / 1.1 + 1.5 / 1.2) / 2)
    assert s["estimate_step_ratio_median"] == pytest.approx((3.0 / 1.1 + 2.4 / 1.2) / 2)
    assert s["memory_ratio"] == pytest.approx(111.0 / 102.0)  # medians of the peaks
