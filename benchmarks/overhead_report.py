"""The overhead benchmark's results as JSON headlines, verdicts and markdown tables."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from commit_mllm import CoMMITConfig
from overhead_quality import grid_name

TIME_TARGET, MEMORY_TARGET = 1.10, 1.15


def cost_model(timing: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """Least-squares fit of ratio(K, rows) = 1 + b + m_rows / K over every timed CoMMIT arm.

    b is the bookkeeping paid every step (the regularizer, RNG capture, the scheduler), m_rows
    the cost of one estimate on that row fraction, both in plain steps.
    """
    cells = []
    for name, v in timing.items():
        d = settings.get(name, {})
        if d.get("every"):
            rows = f"{d['rows'] or 1.0:g}"
            cells.append((d["every"], rows, v["ratio_paired_median"] - 1.0))
    fracs = sorted({r for _, r, _ in cells})
    if len(cells) < len(fracs) + 1 or len({k for k, _, _ in cells}) < 2:
        return None
    import numpy as np

    a = np.zeros((len(cells), 1 + len(fracs)))
    y = np.array([c[2] for c in cells])
    for i, (k, rows, _) in enumerate(cells):
        a[i, 0], a[i, 1 + fracs.index(rows)] = 1.0, 1.0 / k
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return {"bookkeeping": float(coef[0]), "estimate_cost": dict(zip(fracs, map(float, coef[1:])))}


# ---- verdicts and the headline file ------------------------------------------------------------
def headline(results: dict[str, Any]) -> dict[str, Any]:
    """``overhead.{default,exact}.<model>_<mode>`` and ``memory.{default,exact}.medium_<mode>``."""
    out: dict[str, Any] = {"overhead": {"default": {}, "exact": {}}, "memory": {}}
    for e in results["overhead"]:
        key = f"{e['model']}_{e['mode']}"
        for arm in ("default", "exact"):
            if arm in e["timing"]:
                out["overhead"][arm][key] = round(e["timing"][arm]["ratio_paired_median"], 3)
            ratio = e.get("memory", {}).get(arm, {}).get("ratio")
            if ratio is not None and e["model"] == "medium":
                out["memory"].setdefault(arm, {})[key] = round(ratio, 3)
    return out


def merge_headline(path: Path, new: dict[str, Any], source: dict[str, Any]) -> Path:
    """Merge ``new`` into the JSON file at ``path``, keeping every other key it holds."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for section, arms in new.items():
        for arm, vals in arms.items():
            data.setdefault(section, {}).setdefault(arm, {}).update(vals)
    data["overhead_source"] = source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def verdicts(results: dict[str, Any], closed: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The issue's targets against the measured numbers (None where not measured)."""
    times = [e["timing"]["default"]["ratio_paired_median"] for e in results["overhead"]]
    mems = [
        e["memory"]["default"]["ratio"]
        for e in results["overhead"]
        if e["model"] == "medium" and e.get("memory", {}).get("default", {}).get("ratio")
    ]
    cfg = CoMMITConfig()
    name = grid_name(cfg.effective_every, cfg.effective_rows or 1.0)
    quality_a = {}
    for run in results["estimate_error"]:
        for n in run["windows"]:
            cell = run[f"N={n}"].get(name)
            if cell:
                quality_a[f"{run['model']}_{run['mode']}_N{n}"] = cell["meets"]
    return {
        "default_setting": name,
        "time_default_worst": max(times) if times else None,
        "time_ok": bool(times) and max(times) <= TIME_TARGET,
        "memory_default_worst": max(mems) if mems else None,
        "memory_ok": bool(mems) and max(mems) <= MEMORY_TARGET,
        "criterion_a": quality_a,
        "criterion_a_ok": bool(quality_a) and all(quality_a.values()),
        "criterion_b_ok": all(c["all_within_noise"] for c in closed) if closed else None,
    }


# ---- report ---------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(results: dict[str, Any], closed: Sequence[dict[str, Any]] = ()) -> str:
    """Tables of the results (the discussion is written by hand above them)."""
    meta = results["meta"]
    v = verdicts(results, closed)
    lines = [
        "# Measured tables",
        "",
        f"Date {meta['date']}; {meta['platform']}; {meta['cpu_count']} CPUs, "
        f"torch threads {meta['torch_threads']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta.get('peft')}. "
        f"Load averages (1/5/15 min) at start {meta['load_start']}, end {meta['load_end']}. "
        f"`CoMMITConfig()` estimates {v['default_setting']}.",
        "",
        f"Targets: default <= {TIME_TARGET}x a plain step: **{_ok(v['time_ok'])}** (worst "
        f"{_f(v['time_default_worst'], '.3f')}); peak memory <= {MEMORY_TARGET}x on the medium "
        f"model: **{_ok(v['memory_ok'])}** (worst {_f(v['memory_default_worst'], '.3f')}); "
        f"criterion (a): **{_ok(v['criterion_a_ok'])}**; criterion (b): "
        f"**{_ok(v['criterion_b_ok'])}**.",
        "",
    ]
    lines += _summary_table(results)
    for e in results["overhead"]:
        lines += _overhead_table(e)
    for run in results["estimate_error"]:
        lines += _error_table(run, v["default_setting"])
    for run in closed:
        lines += closed_table(run)
    return "\n".join(lines)


def _ok(flag: bool | None) -> str:
    return "not measured" if flag is None else ("met" if flag else "missed")


def _summary_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Summary: time and peak memory over a plain step",
        "",
        "| model / mode | plain step | default time | exact time | default memory | exact memory |",
        "|---|---|---|---|---|---|",
    ]
    for e in results["overhead"]:
        t, m = e["timing"], e.get("memory", {})
        ratio = {arm: t[arm]["ratio_paired_median"] for arm in ("default", "exact")}
        lines.append(
            f"| {e['model']} / {e['mode']} | {t['plain']['median_s'] * 1e3:.1f} ms | "
            f"{ratio['default']:.3f} | {ratio['exact']:.3f} | "
            f"{_f(m.get('default', {}).get('ratio'), '.3f')} | "
            f"{_f(m.get('exact', {}).get('ratio'), '.3f')} |"
        )
    return [*lines, ""]


def _overhead_table(e: dict[str, Any]) -> list[str]:
    t, mem = e["timing"], e.get("memory", {})
    lines = [
        f"## {e['model']} / {e['mode']}: {e['params'] / 1e6:.2f} M params, "
        f"{e['trainable'] / 1e6:.2f} M trainable {e['trainable_by_component']}, batch "
        f"{e['batch_size']} ({e['tokens_per_batch']} text tokens)",
        "",
        f"Load averages: start {e['load_start']}, end {e['load_end']}; {e['seconds']} s.",
        "",
        "| arm | K, rows | s/step (median) | time ratio (paired median) | min-max | rounds "
        "| peak mem MB | mem ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(t) + [n for n in mem if n not in t]
    for name in names:
        v, m = t.get(name), mem.get(name, {})
        d = e["settings"].get(name, {})
        setting = "-" if d.get("plain") or not d else f"{d['every']}, {d['rows'] or 'all'}"
        peak = m.get("peak_bytes")
        timing = (
            f"{v['median_s'] * 1e3:.1f} ms | {v['ratio_paired_median']:.3f} | "
            f"{v['ratio_min']:.2f}-{v['ratio_max']:.2f} | {v['rounds']}"
            if v
            else "- | - | - | -"
        )
        lines.append(
            f"| {name} | {setting} | {timing} | "
            f"{_f(None if peak is None else peak / 2**20, '.1f')} | {_f(m.get('ratio'), '.3f')} |"
        )
    fit = cost_model(t, e["settings"])
    if fit:
        costs = ", ".join(f"rows {r}: {c:.3f}" for r, c in fit["estimate_cost"].items())
        lines += [
            "",
            f"Cost model fitted to the (K, rows) arms, in plain steps: bookkeeping "
            f"b = {fit['bookkeeping']:.3f} per step; one estimate m = {costs}.",
        ]
    return [*lines, ""]


def _error_table(run: dict[str, Any], default: str) -> list[str]:
    s = run["single_estimate"]
    lines = [
        f"## Criterion (a): {run['model']} / {run['mode']}, {run['steps']} steps, batch "
        f"{run['batch_size']}",
        "",
        f"Load {run['load_start']} -> {run['load_end']}; {run['seconds']} s. Single-estimate "
        f"log kappa noise std {_f(s['exact_step_noise_std'])}, median log kappa "
        f"{_f(s['exact_median_log_kappa'])}; mean |log kappa(rows) - log kappa(all rows)| of "
        f"one update: "
        + ", ".join(f"{k.split('=')[1]}: {_f(v, '.3f')}" for k, v in s.items() if "rows=" in k)
        + ".",
        "",
        "| setting | N | error vs exact every step | floor (two exact samplings) | "
        "sampling part | error <= floor |",
        "|---|---|---|---|---|---|",
    ]
    for n in run["windows"]:
        for name, c in run[f"N={n}"].items():
            mark = f"**{name}** (default)" if name == default else name
            lines.append(
                f"| {mark} | {n} | {_f(c['error'], '.3f')} | {_f(c['floor'], '.3f')} | "
                f"{_f(c['sampling'], '.3f')} | {'yes' if c['meets'] else 'no'} |"
            )
    return [*lines, ""]


def closed_table(closed: dict[str, Any]) -> list[str]:
    extra = ", ".join(closed.get("extra_overrides", [])) or "none"
    lines = [
        f"## Criterion (b): closed loop, easy-VQA demo config, {closed['steps']} steps, seeds "
        f"{closed['seeds']}, extra overrides: {extra}",
        "",
        f"{len(closed['runs'])} trainer runs, {closed.get('train_seconds')} s inside their "
        f"training loops ({closed['procs']} processes, 1 torch thread each; "
        f"{closed.get('reused', 0)} read back from an earlier invocation). "
        "Within seed noise: |diff| <= 2 SE. Criterion (b) "
        "is judged on the final log f_enc and the accuracy; the run-averaged log f_enc shows "
        "how much later the sampled controller moves.",
        "",
        "| ratio | metric | default mean (std) | exact mean (std) | diff | 2 SE | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in closed["cells"]:
        lines.append(
            f"| {c['ratio']:g} | {c['metric']} | {c['default_mean']:.3f} ({c['default_std']:.3f}) "
            f"| {c['exact_mean']:.3f} ({c['exact_std']:.3f}) | {c['diff']:+.3f} | "
            f"{c['bound_2se']:.3f} | {'yes' if c['within_noise'] else 'no'} |"
        )
    ms = {
        a: [r["ms_per_step"] for r in closed["runs"] if r["arm"] == a] for a in ("default", "exact")
    }
    lines += [
        "",
        "Trainer ms/step (median over runs, two runs sharing the machine): default "
        f"{statistics.median(ms['default']):.0f}, exact {statistics.median(ms['exact']):.0f}.",
    ]
    return [*lines, ""]


MARKER = "<!-- generated by benchmarks/overhead.py: everything below this line is rewritten -->"


def write_results(
    results: dict[str, Any],
    out: Path,
    stem: str = "overhead",
    closed: Sequence[dict[str, Any]] = (),
    headline_path: Path | None = None,
) -> Path:
    """Write ``<stem>.json``, the tables into ``<stem>.md``, and merge the headline ratios.

    Text above :data:`MARKER` in an existing ``<stem>.md`` (the hand-written discussion)
    is kept; everything below it is replaced by the new tables. ``headline_path`` (when
    given) gets ``overhead.*`` / ``memory.*`` merged in, other keys kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    md = out / f"{stem}.md"
    head = md.read_text().split(MARKER)[0] if md.exists() else ""
    md.write_text(f"{head}{MARKER}\n\n{markdown(results, closed)}\n")
    if headline_path is not None:
        meta = results["meta"]
        source = {"file": f"benchmarks/results/{stem}.json", "date": meta["date"],
                  "load_start": meta["load_start"], "load_end": meta["load_end"]}  # fmt: skip
        merge_headline(headline_path, headline(results), source)
    return path
