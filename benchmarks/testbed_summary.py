"""The testbed's numbers: per cell, strategies against the best baseline (benchmarks/testbed.py).

A *cell* is (task, regime). In each cell:

- **strategies** run at every LR ratio eta_enc / eta_llm of the grid (``constant`` and the
  balancing rules); each gets its accuracy by ratio (mean, std over seeds), the mean over the
  ratios (what a user who sets any ratio gets on average), the spread and the best cell.
- **baselines** are what users compare with: constant's best cell (a ratio search), the
  frameworks' shipped recipes run once per seed (``frozen``: pretrained tower at rate 0,
  projector at the LLM's; ``llava-ov``: tower 0.2x, projector 1x; ``ldog``: layer-wise DoG,
  no rate), and the ``cap`` rule, eta_enc = min(set, eta_llm), scored from constant's cells
  (at ratio r it is constant at min(r, 1)) as its mean over the ratios.
- the **frozen gap**: constant's best cell minus ``frozen``, per seed, i.e. whether the
  encoder must learn on this task (:func:`frozen_gap`).
- the **goal** of a strategy (the balance issue): its mean over the ratios reaches the best
  baseline (on tasks where freezing is right: within :data:`TIE` of it), no run collapses onto
  the language prior, and its run time is within :data:`MAX_TIME` of constant's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TEXT_ONLY = "text_only"
BASELINES = ("frozen", "llava-ov", "ldog")
"""Framework recipes run once per seed (not per ratio)."""
CAP = "cap"
COLLAPSE_MARGIN = 0.02
TIE = 0.005
"""On tasks where freezing is right, a strategy within this of the best baseline ties it."""
MAX_TIME = 1.15
"""A strategy's run time may be at most this times constant's."""


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def cap_rows(constant: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cap rule's runs, read off constant's: at ratio r, constant's run at min(r, 1)."""
    at_one = {r["seed"]: r for r in constant if r["ratio"] == 1.0}
    out = []
    for ratio in sorted({r["ratio"] for r in constant}):
        for r in constant:
            if r["ratio"] != min(ratio, 1.0) or (ratio > 1.0 and r["seed"] not in at_one):
                continue
            out.append({**r, "strategy": CAP, "ratio": ratio, "seconds": None})
    return out


def summarize(rows: list[dict[str, Any]], must_learn: set[str] = frozenset()) -> dict[str, Any]:
    """Per cell ``task-regime``: text-only, strategies, baselines, best baseline, goals."""
    out: dict[str, Any] = {}
    ok = [r for r in rows if r.get("accuracy") is not None]
    for task, regime in sorted({(r["task"], r["regime"]) for r in ok}):
        cell = [r for r in ok if (r["task"], r["regime"]) == (task, regime)]
        text = {r["seed"]: r["accuracy"] for r in cell if r["strategy"] == TEXT_ONLY}
        names = sorted({r["strategy"] for r in cell} - {TEXT_ONLY, *BASELINES})
        strategies = {
            s: strategy_summary([r for r in cell if r["strategy"] == s], text) for s in names
        }
        baselines = {
            b: baseline_summary([r for r in cell if r["strategy"] == b], text)
            for b in BASELINES
            if any(r["strategy"] == b for r in cell)
        }
        if "constant" in strategies:
            const = [r for r in cell if r["strategy"] == "constant"]
            baselines[CAP] = strategy_summary(cap_rows(const), text)
            baselines["constant_best_cell"] = {
                "mean": strategies["constant"]["best_cell"],
                "ratio": strategies["constant"]["best_ratio"],
                "seeds": strategies["constant"]["seeds"],
                "std": strategies["constant"]["by_ratio"][
                    f"{strategies['constant']['best_ratio']:g}"
                ]["std"],
            }
        for s, v in [*strategies.items(), *baselines.items()]:
            if s not in (CAP, "constant_best_cell"):
                v["time_vs_constant"] = time_ratio(cell, s)
        entry = {
            "text_only": {
                "mean": _mean(text.values()),
                "std": _std(text.values()),
                "seeds": sorted(text),
            },
            "must_learn": task in must_learn,
            "strategies": strategies,
            "baselines": baselines,
        }
        gap = frozen_gap(cell, strategies, entry["text_only"]["mean"])
        if gap:
            entry["frozen_gap"] = gap
        if baselines:
            name = max(baselines, key=lambda b: baselines[b]["mean"])
            entry["best_baseline"] = {"name": name, "value": baselines[name]["mean"]}
            entry["goal"] = {
                s: goal(v, entry["best_baseline"], task in must_learn)
                for s, v in strategies.items()
                if s != "constant"
            }
        out[f"{task}-{regime}"] = entry
    return out


def frozen_gap(
    cell: list[dict[str, Any]], strategies: dict[str, Any], text_only: float | None
) -> dict[str, Any] | None:
    """How much training the encoder pays: constant's best cell minus ``frozen``, per seed.

    The must-learn check of the testbed issue (``gap`` >= 0.05 over 3 seeds, text-only below
    both). Per seed, constant's accuracy at its best ratio minus that seed's ``frozen`` run;
    ``gap`` is the mean of those, ``gap_std`` their std. None without both, and in regime A,
    where ``frozen`` is constant's own run at ratio 1 (the tower is frozen in every run).
    """
    frozen = {
        r["seed"]: r["accuracy"]
        for r in cell
        if r["strategy"] == "frozen" and not r.get("alias_of")  # regime A: frozen in every run
    }
    if "constant" not in strategies or not frozen:
        return None
    best = strategies["constant"]["best_ratio"]
    trained = {
        r["seed"]: r["accuracy"]
        for r in cell
        if r["strategy"] == "constant" and r["ratio"] == best and r["seed"] in frozen
    }
    if not trained:
        return None
    gaps = [trained[s] - frozen[s] for s in sorted(trained)]
    best_constant, frozen_mean = _mean(trained.values()), _mean(frozen[s] for s in trained)
    return {
        "best_constant": best_constant,
        "ratio": best,
        "frozen": frozen_mean,
        "gap": _mean(gaps),
        "gap_std": _std(gaps),
        "seeds": sorted(trained),
        "text_only_below_both": (
            None if text_only is None else text_only < min(best_constant, frozen_mean)
        ),
    }


def time_ratio(rows: list[dict[str, Any]], strategy: str) -> float | None:
    """Median over runs of a run's seconds / the median of constant's runs of its seed."""
    const: dict[int, list[float]] = {}
    for r in rows:
        if r["strategy"] == "constant" and r.get("seconds"):
            const.setdefault(r["seed"], []).append(r["seconds"])
    ratios = [
        r["seconds"] / statistics.median(const[r["seed"]])
        for r in rows
        if r["strategy"] == strategy and r.get("seconds") and r["seed"] in const
    ]
    return statistics.median(ratios) if ratios else None


def _collapses(rs: list[dict[str, Any]], text: dict[int, float]) -> list[dict[str, Any]]:
    return [
        {"ratio": r["ratio"], "seed": r["seed"]}
        for r in rs
        if r["seed"] in text and r["accuracy"] <= text[r["seed"]] + COLLAPSE_MARGIN
    ]


def strategy_summary(rs: list[dict[str, Any]], text: dict[int, float]) -> dict[str, Any]:
    """Accuracy by ratio (mean, std over seeds), mean over ratios, spread, best cell."""
    by_ratio = {}
    for ratio in sorted({r["ratio"] for r in rs}):
        accs = [r["accuracy"] for r in rs if r["ratio"] == ratio]
        by_ratio[f"{ratio:g}"] = {"mean": _mean(accs), "std": _std(accs), "n": len(accs)}
    means = [v["mean"] for v in by_ratio.values()]
    return {
        "by_ratio": by_ratio,
        "mean": _mean(means),
        "spread": max(means) - min(means),
        "best_cell": max(means),
        "best_ratio": float(max(by_ratio, key=lambda k: by_ratio[k]["mean"])),
        "seed_std": _mean([v["std"] for v in by_ratio.values()]),
        "seeds": sorted({r["seed"] for r in rs}),
        "collapses": _collapses(rs, text),
        "final_loss": _mean([r.get("final_loss") for r in rs]),
        "final_factors": final_factors(rs),
    }


def baseline_summary(rs: list[dict[str, Any]], text: dict[int, float]) -> dict[str, Any]:
    """A recipe run once per seed: mean and std over the seeds."""
    accs = [r["accuracy"] for r in rs]
    return {
        "mean": _mean(accs),
        "std": _std(accs),
        "seeds": sorted(r["seed"] for r in rs),
        "collapses": _collapses(rs, text),
        "final_loss": _mean([r.get("final_loss") for r in rs]),
    }


def final_factors(rs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per ratio: the mean final factor of each component (how far the rule moved)."""
    out = {}
    for ratio in sorted({r["ratio"] for r in rs}):
        fs = [r["factors"] for r in rs if r["ratio"] == ratio and r.get("factors")]
        if fs:
            out[f"{ratio:g}"] = {c: statistics.fmean(f[c] for f in fs) for c in fs[0]}
    return out


def goal(s: dict[str, Any], best: dict[str, Any], must_learn: bool) -> dict[str, Any]:
    """The balance issue's goal for one strategy in one cell against the best baseline."""
    tol = 0.0 if must_learn else TIE
    time = s.get("time_vs_constant")
    checks = {
        "mean_ge_best_baseline": s["mean"] >= best["value"] - tol - 1e-12,
        "no_collapse": not s["collapses"],
        "time_within_limit": time is None or time <= MAX_TIME,
    }
    return {
        **checks,
        "met": all(checks.values()),
        "mean": s["mean"],
        "gap": s["mean"] - best["value"],
        "best_baseline": best["name"],
        "best_baseline_value": best["value"],
    }


def verdict(g: dict[str, Any]) -> str:
    """The goal column: met, or the checks missed (the mean's gap to the best baseline)."""
    if g["met"]:
        return f"**met** ({g['gap']:+.3f})"
    missed = [k for k, ok in g.items() if isinstance(ok, bool) and not ok and k != "met"]
    return f"missed ({g['gap']:+.3f}): " + ", ".join(missed)


def headline(summary: dict[str, Any], recommended: str) -> dict[str, Any]:
    """``payoff``: per regime and task, each strategy's and baseline's figures, the best one."""
    payoff: dict[str, Any] = {"recommended": recommended}
    for key, entry in summary.items():
        task, regime = key.rsplit("-", 1)
        cell = payoff.setdefault(regime, {}).setdefault(task, {})
        for s, v in entry["strategies"].items():
            cell[s] = {k: v[k] for k in ("mean", "spread", "best_cell", "best_ratio", "seeds")}
        for b, v in entry["baselines"].items():
            cell.setdefault("baselines", {})[b] = {k: v[k] for k in ("mean", "std") if k in v}
        if "best_baseline" in entry:
            cell["best_baseline"] = entry["best_baseline"]
        cell["must_learn"] = entry["must_learn"]
        cell["text_only"] = entry["text_only"]["mean"]
        if "frozen_gap" in entry:
            cell["frozen_gap"] = entry["frozen_gap"]
    return payoff


def write_headline(payoff: dict[str, Any], section: str | None = None) -> Path:
    """Merge ``payoff`` into benchmarks/results/headline.json, cell by cell.

    Other keys and other grids' cells are kept; ``section`` (e.g. ``"real"``) puts the cells
    under ``payoff.<section>``.
    """
    path = RESULTS / "headline.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    into = data.setdefault("payoff", {})
    if section:
        into = into.setdefault(section, {})
    for regime, tasks in payoff.items():
        if regime == "recommended":
            data["payoff"]["recommended"] = tasks
            continue
        for task, cell in tasks.items():
            into.setdefault(regime, {})[task] = cell
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def _cost_line(grid: Any, wall: float, rows) -> str:
    done = [r for r in rows if r.get("seconds")]
    reused = sum(1 for r in done if r.get("reused"))
    cost = (
        f" {len(done)} runs, {sum(r['seconds'] for r in done) / 60:.0f} min inside their "
        f"training loops ({reused} read back from an earlier invocation)."
        if done
        else ""
    )
    return (
        f"Grid: parts `{grid.parts}`, ratios {', '.join(f'{r:g}' for r in grid.ratios)}, "
        f"seeds {', '.join(map(str, grid.seeds))}.{cost}"
        + (f" Wall time of this invocation {wall / 60:.1f} min." if reused < len(done) else "")
    )


def lead_table(summary: dict[str, Any]) -> list[str]:
    """Per cell: the best baseline and each strategy's gap to it (docs/results.md leads)."""
    names = sorted({s for e in summary.values() for s in e.get("goal", {})})
    head = ["task", "regime", "must learn", "text-only", "trained - frozen", "best baseline"]
    head += [f"{s} (gap)" for s in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, e in summary.items():
        if "best_baseline" not in e:
            continue
        task, regime = key.rsplit("-", 1)
        b = e["best_baseline"]
        cells = []
        for s in names:
            g = e["goal"].get(s)
            cells.append("" if g is None else f"{g['mean']:.3f} ({g['gap']:+.3f})")
        text = e["text_only"]["mean"]
        row = [task, regime, "yes" if e["must_learn"] else "no"]
        row += ["" if text is None else f"{text:.3f}", _gap_text(e.get("frozen_gap"))]
        row += [f"{b['name']} {b['value']:.3f}", *cells]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _gap_text(g: dict[str, Any] | None) -> str:
    if not g:
        return ""
    spread = f" ± {g['gap_std']:.3f}" if len(g["seeds"]) > 1 else " (1 seed)"
    return f"{g['gap']:+.3f}{spread} (r={g['ratio']:g})"


def _strategy_line(task: str, regime: str, s: str, v: dict[str, Any], g: dict | None) -> str:
    accs = " / ".join(
        f"{x['mean']:.3f} ± {x['std']:.3f}" if x["n"] > 1 else f"{x['mean']:.3f} (1 seed)"
        for x in v["by_ratio"].values()
    )
    tr = v.get("time_vs_constant")
    return (
        f"| {task} | {regime} | {s} | {accs} | {v['mean']:.3f} | {v['spread']:.3f} | "
        f"{v['best_cell']:.3f} (r={v['best_ratio']:g}) | {len(v['collapses'])} | "
        f"{'' if tr is None else f'{tr:.2f}x'} | {'' if g is None else verdict(g)} |"
    )


def _baseline_line(task: str, regime: str, b: str, v: dict[str, Any]) -> str:
    tr = v.get("time_vs_constant")
    col = "" if "collapses" not in v else str(len(v["collapses"]))
    label = f"{b} (r={v['ratio']:g})" if b == "constant_best_cell" else b
    return (
        f"| {task} | {regime} | *{label}* | {_mean_std(v)} | "
        f"{v['mean']:.3f} | | | {col} | {'' if tr is None else f'{tr:.2f}x'} | baseline |"
    )


def _mean_std(v: dict[str, Any]) -> str:
    if len(v.get("seeds", ())) == 1:
        return f"{v['mean']:.3f} (1 seed)"
    return f"{v['mean']:.3f} ± {v['std'] or 0:.3f}"


def markdown(summary: dict[str, Any], grid: Any, wall: float, rows=()) -> str:
    """The lead table and the full table of the grid (what docs/results.md quotes)."""
    lines = [_cost_line(grid, wall, rows), "", *lead_table(summary), ""]
    lines += [
        "| task | regime | strategy | acc by ratio (mean ± std) | mean | spread | best cell "
        "| collapses | time vs constant | goal vs best baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in summary.items():
        task, regime = key.rsplit("-", 1)
        t = entry["text_only"]
        if t["mean"] is not None:
            lines.append(
                f"| {task} | {regime} | text-only | {t['mean']:.3f} ± {t['std']:.3f} | | | | | | |"
            )
        for b, v in entry["baselines"].items():
            if b == CAP:
                lines.append(_strategy_line(task, regime, f"*{CAP}*", v, None))
            else:
                lines.append(_baseline_line(task, regime, b, v))
        for s, v in entry["strategies"].items():
            lines.append(_strategy_line(task, regime, s, v, entry.get("goal", {}).get(s)))
    lines += [
        "",
        "Lead table: trained - frozen is constant's best cell minus `frozen`, per seed (mean "
        "± std over seeds): what training the encoder pays. Each strategy's mean over the LR "
        "ratios and its gap to the cell's best baseline. Full table: accuracy is exact match on "
        "the held-out questions, mean ± std over the seeds, at each ratio eta_enc / eta_llm "
        "(ascending); baselines (in italics) "
        "run once per seed: `frozen` (pretrained tower at rate 0, projector at the LLM's), "
        "`llava-ov` (tower 0.2x, projector 1x), `ldog` (layer-wise DoG, no rate), `cap` "
        "(eta_enc = min(set, eta_llm), read off constant's cells) and constant's best cell. "
        "Spread: max - min of the per-ratio means. Collapses: runs within "
        f"{COLLAPSE_MARGIN} of their seed's text-only accuracy. Time vs constant: median of "
        "a run's training-loop seconds over constant's (same seed), runs sharing the machine. "
        f"Goal: mean over ratios >= the best baseline (within {TIE} where the task does not "
        f"need the encoder to learn), no collapse, time <= {MAX_TIME}x constant's.",
    ]
    return "\n".join(lines) + "\n"


def update_docs(path: Path, tag: str, table: str) -> Path:
    """Put ``table`` between ``<!-- testbed:TAG -->`` and ``<!-- /testbed:TAG -->`` in ``path``."""
    start, end = f"<!-- testbed:{tag} -->", f"<!-- /testbed:{tag} -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: add the markers {start} and {end} where the table goes")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{table}{end}{tail}")
    return path


def docs_block(path: Path, tag: str) -> str:
    """The generated block of ``path`` for ``tag`` (what :func:`update_docs` wrote)."""
    start, end = f"<!-- testbed:{tag} -->", f"<!-- /testbed:{tag} -->"
    return path.read_text().split(start, 1)[1].split(end, 1)[0].lstrip("\n")
