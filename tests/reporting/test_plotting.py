"""Run plots and comparison reports on synthetic run folders written here."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from commit_mllm.reporting.plotting import plot_compare, plot_run
from commit_mllm.reporting.report import compare_table, summarize_runs, write_compare_report
from commit_mllm.reporting.runs import RunFormatError, load_run
from commit_mllm.reporting.smoothing import moving_average, normalized

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = ["kappa.png", "lr.png", "loss.png", "grad_norms.png", "D.png"]
COMPARE_PLOTS = [
    "compare_kappa.png",
    "compare_loss.png",
    "compare_grad_norms.png",
    "compare_lr.png",
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def synthetic_metrics(steps, comps, seed, kappa=True, bias=0.0, window=10):
    """Per-step records in the trainer's format; kappa_bar after `window` estimates."""
    rng = np.random.default_rng(seed)
    records, logs = [], []
    for t in range(steps):
        loss = 2.0 * math.exp(-t / 20) + 0.1 * rng.random()
        rec = {"step": t, "loss": loss, "ce": loss - 0.01, "aux_loss": 0.01, "collapse": t == 40}
        if kappa:
            logs.append(rng.normal(bias, 1.0))
            rec["kappa"] = math.exp(logs[-1])
        full = kappa and len(logs) >= window
        rec["kappa_bar"] = math.exp(np.mean(logs[-window:])) if full else None
        rec["state"] = ("balanced" if t < 30 else "biased-to-llm") if full else "warming_up"
        for i, c in enumerate(comps):
            rec[f"lr/{c}"] = 1e-4 * (10**i) * (1 + 0.01 * t)
            rec[f"factor/{c}"] = math.exp((-1) ** i * 0.01 * t)
            rec[f"grad_norm/{c}"] = (
                (1 + i) * math.exp(-t / (30 + 30 * i)) * (1 + 0.1 * rng.random())
            )
            if kappa:
                rec[f"D/{c}"] = 1e-4 * (1 + i) * rng.random() + 1e-8
                rec[f"kappa_c/{c}"] = math.exp(rng.normal(0.5 * (i - 1), 0.5))
        records.append(rec)
    return records


def make_run(root, name, strategy="constant", seed=0, comps=("encoder", "llm"), **kw):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    metrics = synthetic_metrics(50, comps, seed, **kw)
    write_jsonl(run_dir / "metrics.jsonl", metrics)
    evals = [
        {"step": s, "accuracy": 0.3 + s / 100, "accuracy/colour": 0.4, "n": 20} for s in (0, 25, 49)
    ]
    write_jsonl(run_dir / "eval.jsonl", evals)
    summary = {
        "strategy": strategy,
        "seed": seed,
        "steps": 50,
        "final_loss": metrics[-1]["loss"],
        "accuracy": 0.79,
        "accuracy/colour": 0.4,
        "final_state": metrics[-1]["state"],
        "seconds": 1.5,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text(f"strategy: {strategy}\nseed: {seed}\n")
    return run_dir


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    # IHDR: width and height are the two big-endian uint32 after the chunk header.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


@pytest.fixture
def runs(tmp_path):
    return [
        make_run(tmp_path, "const-s0", "constant", 0, bias=2.0),
        make_run(tmp_path, "const-s1", "constant", 1, bias=1.5),
        make_run(tmp_path, "commit-s0", "commit", 0),
        make_run(tmp_path, "commit-s1", "commit", 1),
    ]


def test_plot_run_two_components(runs):
    files = plot_run(runs[0])
    assert [p.name for p in files] == RUN_PLOTS
    assert files.skipped == {}
    for p in files:
        assert p.parent == runs[0] / "plots"
        assert_png(p)


def test_plot_run_three_components_and_out_dir(tmp_path):
    run_dir = make_run(tmp_path, "tri", comps=("vision", "audio", "llm"))
    # n components: no pairwise kappa, the kappa plot draws kappa_c per component.
    for rec_path in [run_dir / "metrics.jsonl"]:
        recs = [json.loads(line) for line in rec_path.read_text().splitlines()]
        write_jsonl(rec_path, [{k: v for k, v in r.items() if k != "kappa"} for r in recs])
    run = load_run(run_dir)
    assert run.components == ["vision", "audio", "llm"]
    files = plot_run(run_dir, tmp_path / "elsewhere")
    assert [p.name for p in files] == RUN_PLOTS
    for p in files:
        assert p.parent == tmp_path / "elsewhere"
        assert_png(p)


def test_plot_run_without_kappa_skips_and_says_so(tmp_path, caplog):
    run_dir = make_run(tmp_path, "nokappa", kappa=False)
    with caplog.at_level(logging.WARNING, logger="commit_mllm.reporting.plotting"):
        files = plot_run(run_dir)
    names = [p.name for p in files]
    assert "kappa.png" not in names and "D.png" not in names
    assert {"lr.png", "loss.png", "grad_norms.png"} <= set(names)
    assert "kappa" in files.skipped["kappa.png"]
    assert not (run_dir / "plots" / "kappa.png").exists()
    assert "skipped kappa.png" in caplog.text
    assert summarize_runs([run_dir])[0]["mean_log_kappa"] is None


def test_plot_compare(runs, tmp_path):
    no_kappa = make_run(tmp_path, "nokappa", "constant", 2, kappa=False)
    files = plot_compare([*runs, no_kappa], tmp_path / "cmp")
    assert [p.name for p in files] == COMPARE_PLOTS
    for p in files:
        assert_png(p)
    with pytest.raises(ValueError, match="labels"):
        plot_compare(runs, tmp_path / "cmp3", labels=["a"])


def write_tiny_run(root, name, summary, kappas=(), state="balanced"):
    run_dir = root / name
    run_dir.mkdir()
    recs = [{"step": i, "loss": 1.0, "kappa": k, "state": state} for i, k in enumerate(kappas)]
    write_jsonl(run_dir / "metrics.jsonl", recs or [{"step": 0, "loss": 1.0}])
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_compare_table_hand_computed(tmp_path):
    common = {"strategy": "constant", "accuracy/colour": None}
    a = write_tiny_run(
        tmp_path,
        "a",
        {**common, "seed": 0, "final_loss": 1.0, "accuracy": 0.5, "accuracy/colour": 0.4,
         "accuracy/shape": 0.6, "mean_log_kappa": 0.0, "final_state": "balanced", "seconds": 10},
    )  # fmt: skip
    b = write_tiny_run(
        tmp_path,
        "b",
        {**common, "seed": 1, "final_loss": 2.0, "accuracy": 0.7, "accuracy/colour": 0.6,
         "mean_log_kappa": math.log(4), "final_state": "biased-to-llm", "seconds": 20},
    )  # fmt: skip
    # No mean_log_kappa, final_state or seconds in its summary: taken from the metrics.
    c = write_tiny_run(
        tmp_path,
        "c",
        {"strategy": "commit", "seed": 0, "final_loss": 0.5, "accuracy": 0.9,
         "accuracy/colour": 0.8},
        kappas=(2.0, 8.0),
        state="biased-to-llm",
    )  # fmt: skip
    table = compare_table([a, c, b]).splitlines()
    assert table[0] == (
        "| label | n | final loss (CE) | accuracy | accuracy/colour | accuracy/shape "
        "| mean κ (geo) | steps per state | final state | seconds |"
    )
    # std: sample std (ddof=1): stdev(1, 2) = 0.7071; kappa: exp(mean(0, ln 4)) = 2,
    # geometric std factor exp(stdev(0, ln 4)) = exp(0.9803) = 2.665; state tie -> first seen.
    assert table[2] == (
        "| constant | 2 | 1.5000 ± 0.7071 | 0.6000 ± 0.1414 | 0.5000 ± 0.1414 | 0.6000 "
        "| 2 ×/÷ 2.67 | — | balanced (1/2) | 15.0 ± 7.1 |"
    )
    assert table[3] == (
        "| commit | 1 | 0.5000 | 0.9000 | 0.8000 | — | 4 | biased-to-llm 100% "
        "| biased-to-llm (1/1) | — |"
    )
    # Labels override the strategy, in order of first appearance.
    relabelled = compare_table([a, b, c], labels=["y", "x", "y"]).splitlines()
    assert [row.split(" | ")[0] for row in relabelled[2:]] == ["| y", "| x"]


def test_write_compare_report(runs, tmp_path):
    out = tmp_path / "report"
    md_path = write_compare_report(runs, out)
    assert md_path == out / "compare.md"
    md = md_path.read_text()
    assert "| constant | 2 |" in md and "| commit | 2 |" in md
    for name in COMPARE_PLOTS:
        assert f"]({name})" in md
        assert_png(out / name)
    data = json.loads((out / "compare.json").read_text())
    assert len(data["runs"]) == 4
    assert [a["label"] for a in data["aggregates"]] == ["constant", "commit"]
    assert data["aggregates"][0]["seeds"] == [0, 1]
    assert data["aggregates"][0]["metrics"]["accuracy"]["mean"] == pytest.approx(0.79)


def test_corrupt_jsonl_names_file_and_line(tmp_path):
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    path = run_dir / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n\n{"step": 1, "loss": \n{"step": 2}\n')
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl:3: invalid JSON"):
        load_run(run_dir)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl:2: expected a JSON object"):
        load_run(run_dir)
    # A last line without newline is a record being written: skipped, not an error.
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert len(load_run(run_dir).metrics) == 1
    path.unlink()
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl: missing"):
        load_run(run_dir)


def test_import_is_lazy_and_never_uses_pyplot(runs):
    code = (
        "import sys\n"
        "import commit_mllm.reporting.plotting, commit_mllm.reporting.report\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        "commit_mllm.reporting.plotting.plot_run(sys.argv[1])\n"
        "assert 'matplotlib' in sys.modules\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(runs[0])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_moving_average_and_normalized():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    steps = np.arange(100.0)
    values = np.full(100, 4.0)
    values[:6] = 2.0  # the first 5% of the steps (0..4.95) -> reference mean 2
    np.testing.assert_allclose(normalized(steps, values)[[0, 50]], [1.0, 2.0])
    assert normalized(steps, np.zeros(100)) is None


def _states_run(root, name, states, strategy="x"):
    run_dir = root / name
    run_dir.mkdir()
    recs = [{"step": i, "loss": 1.0, "ce": 1.0, "state": st} for i, st in enumerate(states)]
    write_jsonl(run_dir / "metrics.jsonl", recs)
    (run_dir / "summary.json").write_text(json.dumps({"strategy": strategy}))
    return run_dir


def test_state_shares_in_summaries_and_tables(tmp_path):
    # A run biased for 80% of its steps and balanced at the end reads as such, not "balanced".
    one = _states_run(tmp_path, "one", [*["biased-to-llm"] * 4, "balanced"])
    two = _states_run(tmp_path, "two", ["balanced", "balanced"])
    (s1,) = summarize_runs([one])
    assert s1["state_shares"] == {"biased-to-llm": 0.8, "balanced": 0.2}
    assert s1["final_state"] == "balanced"
    row = compare_table([one, two]).splitlines()[2]
    # Mean over the two runs: balanced (0.2 + 1) / 2 = 0.6, biased-to-llm (0.8 + 0) / 2 = 0.4.
    assert "| balanced 60%, biased-to-llm 40% | balanced (2/2) |" in row


class _Figures:
    """Capture the figures the plot functions save (their axes are the assertion)."""

    def __init__(self, monkeypatch):
        import importlib

        self.saved = {}
        for name in ("kappa", "loss", "rates", "grad_norms", "significance"):
            module = importlib.import_module(f"commit_mllm.reporting.plot_{name}")
            monkeypatch.setattr(
                module, "save_figure", lambda fig, path: self.saved.update({path.name: fig})
            )


def test_loss_plot_is_the_ce_with_the_regularizer_term_apart(tmp_path, monkeypatch):
    figs = _Figures(monkeypatch)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    # An older run: "loss" was CE + aux; the plot must show the CE.
    recs = [
        {"step": t, "loss": 4.0 - 0.5, "ce": 4.0, "aux_loss": -0.5, "kappa": 2.0}
        | {"state": "balanced" if t >= 2 else "warming_up"}
        for t in range(10)
    ]
    write_jsonl(run_dir / "metrics.jsonl", recs)
    run = load_run(run_dir)
    assert list(run.loss_series()[1]) == [4.0] * 10
    assert list(run.aux_series()[1]) == [-0.5] * 10
    plot_run(run_dir)
    loss_axes = figs.saved["loss.png"].axes
    assert [ax.get_ylabel() for ax in loss_axes] == [
        "training loss (cross-entropy)",
        "regularizer term",
    ]
    assert all(float(y) == 4.0 for line in loss_axes[0].get_lines() for y in line.get_ydata())
    title = figs.saved["kappa.png"].axes[0].get_title()
    assert "states: balanced 80%, warming_up 20%; final balanced" in title
    plot_compare([run_dir], tmp_path / "cmp")
    titles = [ax.get_title() for ax in figs.saved["compare_loss.png"].axes]
    assert titles == ["training loss (cross-entropy)", "regularizer term"]
    # Without the regularizer (aux 0): one panel, the CE.
    write_jsonl(run_dir / "metrics.jsonl", [{**r, "aux_loss": 0.0, "loss": 4.0} for r in recs])
    plot_run(run_dir)
    assert len(figs.saved["loss.png"].axes) == 1


def test_trainer_records_loss_as_the_ce(tmp_path):
    from commit_mllm.training.config import load_config
    from commit_mllm.training.tracking import read_jsonl
    from commit_mllm.training.trainer import train

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    over = [f"run.output_dir={tmp_path}", "run.progress=false", "run.tensorboard=false"]
    over += ["train.steps=3", "train.save_every=0", "commit.alpha=0.5", "commit.window=1"]
    summary = train(load_config(tiny, over), log=lambda _: None)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["loss"] == r["ce"] for r in recs)
    assert all(r["total_loss"] == pytest.approx(r["ce"] + r["aux_loss"]) for r in recs)
    assert any(r["aux_loss"] != 0 for r in recs)  # the regularizer was on
    assert summary["state_shares"] and abs(sum(summary["state_shares"].values()) - 1) < 1e-9


def test_describe_states_never_hides_a_state_seen():
    from commit_mllm.method.diagnostics import describe_states, state_shares

    shares = state_shares(["balanced"] * 999 + ["biased-to-encoder"])
    assert (
        describe_states(shares, "balanced")
        == "balanced 100%, biased-to-encoder <1%; final balanced"
    )
    assert describe_states({}) == "no states"
