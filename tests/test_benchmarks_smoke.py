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


def test_overhead_core_tiny_budget(tmp_path):
    opts = overhead.Options(
        models=("tiny",),
        modes=("lora",),
        rounds=1,
        full_grid=False,
        error_steps=20,
        error_modes=("lora",),
        window=2,
        min_block=1,
        extras=False,
    )
    res = overhead.run_benchmark(opts, log=lambda _: None)
    assert res["meta"]["default_equals_exact"] is True
    (entry,) = res["overhead"]
    timing = entry["timing"]
    assert {"plain", "default", "K=1 rows=1", "K=8 rows=1"} <= set(timing)
    assert all(v["median_s"] > 0 and v["ratio_paired_median"] > 0 for v in timing.values())
    assert set(entry["memory"]) == set(timing)
    assert set(overhead.grid_ratios(timing)) == {
        overhead.grid_name(k, f) for k in overhead.KS for f in overhead.FRACTIONS
    }
    (err,) = res["estimate_error"]
    assert err["settings"]["K=1 rows=1"]["error"] == 0.0
    assert len(err["settings"]) == len(overhead.KS) * len(overhead.FRACTIONS)
    path = overhead.write_results(res, tmp_path, "overhead_smoke")
    assert json.loads(path.read_text())["recommendation"]["time_target"] == 1.10
    (tmp_path / "overhead_smoke.md").write_text("discussion\n" + overhead.MARKER + "\nold\n")
    overhead.write_results(res, tmp_path, "overhead_smoke")
    text = (tmp_path / "overhead_smoke.md").read_text()
    assert text.startswith("discussion\n") and "old" not in text and "| plain |" in text


def test_kbar_series_holds_between_estimates():
    logk = [0.0, 1.0, 2.0, 3.0, None, 5.0]
    assert overhead.kbar_series(logk, 2, 2) == [None, None, (1.0, 0), (1.0, 0), (1.0, 0), (1.0, 0)]
    assert overhead.kbar_series(logk, 1, 2)[3] == (2.5, 2)


def test_gpu_step_tiny_builds_and_steps(tmp_path):
    assert gpu_step.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_step_tiny.json").read_text())
    assert set(res["timing"]) == {"plain", "default", "K=4 rows=0.25"}
    assert res["shape"]["image_tokens"] == 16


def test_gpu_step_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(gpu_step.torch.cuda, "is_available", lambda: False)
    assert gpu_step.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
