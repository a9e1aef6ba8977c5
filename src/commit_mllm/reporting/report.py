"""Tables and reports comparing runs: one row per label (strategy), mean ± std over seeds.

:func:`summarize_runs` reduces each run folder to one flat dict (``summary.json`` first,
the metric and eval logs fill what it lacks); :func:`aggregate_summaries` groups them by
label; :func:`compare_table` renders the groups as markdown; :func:`write_compare_report`
writes ``compare.md`` and ``compare.json`` next to the plots of
:func:`commit_mllm.reporting.plotting.plot_compare`.

Conventions: std is the sample standard deviation (ddof = 1) and is left out for a single
seed; kappa is averaged in log space (a geometric mean, so kappa and 1/kappa weigh alike)
and its spread over seeds is given as a geometric standard deviation factor (×/÷).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..method.diagnostics import describe_states
from .plotting import plot_compare
from .runs import Run, group_runs, load_run

__all__ = [
    "aggregate_summaries",
    "compare_table",
    "format_table",
    "summarize_run",
    "summarize_runs",
    "write_compare_report",
]

# Numeric per-run fields aggregated over seeds (accuracy/<type> keys are added per table).
_NUMERIC = ("final_loss", "accuracy", "mean_log_kappa", "final_kappa_bar", "seconds", "steps")


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, null, bool, text or non-finite)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _last(records: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The last non-null value of ``key`` (None when it never appears)."""
    for rec in reversed(records):
        if rec.get(key) is not None:
            return rec[key]
    return None


def _loss_key(records: Sequence[Mapping[str, Any]]) -> str:
    """``ce`` (the cross-entropy) when the run logged it, else ``loss`` (older runs)."""
    return "ce" if any(r.get("ce") is not None for r in records) else "loss"


def _pick(summary: Mapping[str, Any], key: str, fallback: Any) -> float | None:
    """``summary[key]`` as a number; the fallback when it is missing or null."""
    value = _number(summary.get(key))
    return value if value is not None else _number(fallback)


def summarize_run(run: Run, label: str | None = None) -> dict[str, Any]:
    """One run as a flat dict; ``summary.json`` wins, the logs fill what it lacks.

    Args:
        run: The loaded run.
        label: Group label; default the run's strategy.

    Returns:
        Keys ``label``, ``strategy``, ``seed``, ``steps``, ``final_loss`` (cross-entropy,
        without the regularizer's term), ``accuracy``, ``accuracy/<type>``,
        ``mean_log_kappa``, ``mean_kappa`` (its exp: a geometric mean), ``final_kappa_bar``,
        ``final_state``, ``state_shares`` (state -> share of the logged steps), ``seconds``,
        ``collapse_steps``, ``run_dir``; a value that cannot be found is None.
    """
    s = run.summary
    last_eval = run.evals[-1] if run.evals else {}
    _, kappa = run.series("kappa", positive=True)
    logged = statistics.fmean(math.log(k) for k in kappa) if kappa.size else None
    mean_log_kappa = _pick(s, "mean_log_kappa", logged)
    out: dict[str, Any] = {
        "label": label or run.label,
        "strategy": run.strategy,
        "seed": run.seed,
        "steps": _pick(s, "steps", len(run.metrics) or None),
        "final_loss": _pick(s, "final_loss", _last(run.metrics, _loss_key(run.metrics))),
        "accuracy": _pick(s, "accuracy", last_eval.get("accuracy")),
    }
    types = [k for k in s if k.startswith("accuracy/")]
    types += [k for k in last_eval if k.startswith("accuracy/") and k not in s]
    out.update({k: _pick(s, k, last_eval.get(k)) for k in types})
    out.update(
        mean_log_kappa=mean_log_kappa,
        mean_kappa=math.exp(mean_log_kappa) if mean_log_kappa is not None else None,
        final_kappa_bar=_pick(s, "final_kappa_bar", _last(run.metrics, "kappa_bar")),
        final_state=s.get("final_state") or _last(run.metrics, "state"),
        # From the log (every step), not summary.json: older summaries lack it.
        state_shares=run.state_shares() or dict(s.get("state_shares") or {}),
        seconds=_number(s.get("seconds")),
        collapse_steps=sum(1 for r in run.metrics if r.get("collapse") is True),
        run_dir=str(run.run_dir),
    )
    return out


def summarize_runs(
    run_dirs: Sequence[str | Path | Run], labels: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Summaries of several runs, in the given order.

    Args:
        run_dirs: Run folders (or loaded runs).
        labels: One label per run; default each run's strategy.

    Returns:
        One :func:`summarize_run` dict per run.

    Raises:
        ValueError: ``labels`` has a different length than ``run_dirs``.
    """
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    return [summarize_run(r, labels[i] if labels else None) for i, r in enumerate(runs)]


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
    }


def _accuracy_types(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """``accuracy/<type>`` keys over all runs, in order of first appearance."""
    return list(dict.fromkeys(k for s in summaries for k in s if k.startswith("accuracy/")))


def aggregate_summaries(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group run summaries by label (order of first appearance) and aggregate over seeds.

    Args:
        summaries: Dicts from :func:`summarize_runs`.

    Returns:
        One dict per label: ``label``, ``n`` (runs), ``seeds``, ``run_dirs``, ``metrics``
        (key -> ``{"mean", "std", "n"}`` for the numeric fields and each accuracy type),
        ``kappa_geo_mean`` and ``kappa_geo_std`` (exp of the mean and std over seeds of
        ``mean_log_kappa``), ``final_state`` (most common; ties go to the first seen),
        ``final_state_count`` and ``state_shares`` (state -> mean share of steps over the
        runs, largest first).
    """
    keys = [*_NUMERIC, *_accuracy_types(summaries)]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(str(s["label"]), []).append(s)
    out = []
    for label, members in groups.items():
        metrics = {k: _stats([_number(m.get(k)) for m in members]) for k in keys}
        logk = metrics["mean_log_kappa"]
        # Counter.most_common keeps insertion order among ties: the first seen state wins.
        states = Counter(m["final_state"] for m in members if m.get("final_state"))
        state, count = states.most_common(1)[0] if states else (None, 0)
        shares: dict[str, float] = {}
        for m in members:  # mean share over the runs (a state a run never had counts 0)
            for st, share in (m.get("state_shares") or {}).items():
                shares[st] = shares.get(st, 0.0) + share / len(members)
        out.append(
            {
                "label": label,
                "n": len(members),
                "seeds": [m.get("seed") for m in members],
                "run_dirs": [m.get("run_dir") for m in members],
                "metrics": metrics,
                "kappa_geo_mean": math.exp(logk["mean"]) if logk["mean"] is not None else None,
                "kappa_geo_std": math.exp(logk["std"]) if logk["std"] is not None else None,
                "final_state": state,
                "final_state_count": count,
                "state_shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            }
        )
    return out


def _fmt(stat: Mapping[str, Any], spec: str) -> str:
    if stat["mean"] is None:
        return "—"
    text = format(stat["mean"], spec)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'], spec)}"


def format_table(aggregates: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`aggregate_summaries` output as a markdown table.

    Args:
        aggregates: One dict per label.

    Returns:
        The table (header, separator, one row per label), ending with a newline.
    """
    types = list(dict.fromkeys(k for a in aggregates for k in a["metrics"] if "/" in k))
    header = ["label", "n", "final loss (CE)", "accuracy", *types, "mean κ (geo)"]
    header += ["steps per state", "final state", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for agg in aggregates:
        m = agg["metrics"]
        kappa = "—"
        if agg["kappa_geo_mean"] is not None:
            kappa = f"{agg['kappa_geo_mean']:.3g}"
            if agg["kappa_geo_std"] is not None:
                kappa += f" ×/÷ {agg['kappa_geo_std']:.3g}"
        state = "—"
        if agg["final_state"]:
            state = f"{agg['final_state']} ({agg['final_state_count']}/{agg['n']})"
        row = [
            str(agg["label"]).replace("|", "\\|"),  # a pipe would split the cell
            str(agg["n"]),
            _fmt(m["final_loss"], ".4f"),
            _fmt(m["accuracy"], ".4f"),
            *(_fmt(m[t], ".4f") if t in m else "—" for t in types),
            kappa,
            describe_states(agg.get("state_shares") or {}) if agg.get("state_shares") else "—",
            state,
            _fmt(m["seconds"], ".1f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare_table(run_dirs: Sequence[str | Path | Run], labels: Sequence[str] | None = None) -> str:
    """Markdown table comparing runs, one row per label, mean ± std over seeds.

    Columns: label, n (runs), final loss (cross-entropy), accuracy, accuracy per question
    type, mean kappa (geometric, with its geometric std factor over seeds), the share of
    steps per balance state (mean over seeds), the final balance state (most common, with
    its count), seconds. Rows follow the order of first appearance.

    Args:
        run_dirs: Run folders (or loaded runs).
        labels: One label per run; default each run's strategy.

    Returns:
        The markdown table.
    """
    return format_table(aggregate_summaries(summarize_runs(run_dirs, labels)))


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None: ``json.dumps`` would write invalid NaN tokens."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_compare_report(
    run_dirs: Sequence[str | Path | Run],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write ``compare.md`` (table, then plots) and ``compare.json``, drawing the plots.

    Args:
        run_dirs: Run folders (or loaded runs).
        out_dir: Output folder (created).
        labels: One label per run; default each run's strategy.

    Returns:
        Path of ``compare.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    summaries = summarize_runs(runs, labels)
    aggregates = aggregate_summaries(summaries)
    plots = plot_compare(runs, out, labels)
    groups = group_runs(runs, labels)
    md = [f"# Comparison: {len(runs)} runs, {len(groups)} labels", "", format_table(aggregates)]
    md.append(
        "Mean ± sample std over seeds; loss: cross-entropy (the regularizer's term apart); "
        "κ: geometric mean ×/÷ geometric std factor; steps per state: mean share over seeds.\n"
    )
    md.append("## Plots\n")
    md += [f"![{p.stem}]({p.name})\n" for p in plots]
    md += [f"- {name}: skipped ({why})" for name, why in plots.skipped.items()]
    md.append("\n## Runs\n")
    md += [
        f"- **{label}**: " + ", ".join(str(r.run_dir) for r in rs) for label, rs in groups.items()
    ]
    path = out / "compare.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    payload = {
        "runs": summaries,
        "aggregates": aggregates,
        "plots": [p.name for p in plots],
        "skipped_plots": plots.skipped,
    }
    (out / "compare.json").write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    return path
