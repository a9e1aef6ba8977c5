"""``commit-mllm demo``: constant LR vs CoMMIT on a built-in task, on a laptop CPU.

It pretrains (or loads from the cache) a tiny encoder and a tiny LLM, connects them with a
fresh projector, instruction-tunes once per strategy, then prints what it measured: final
loss, held-out accuracy per question type, kappa statistics and the share of steps per
balance state, and where the plots are. The settings are :func:`demo_config`;
``configs/demo_vision.yaml`` and ``configs/demo_audio.yaml`` are the same settings as files
(a test keeps them equal).

The table is also written to ``<output-dir>/<task>/demo_table.md`` with a fingerprint of
the settings that produced it. The README shows that file between the markers
``<!-- demo-table:<task> -->`` and ``<!-- /demo-table:<task> -->``:
``commit-mllm demo --update-readme README.md`` replaces the block, and a test fails when
the README's block was made with settings other than today's, so its numbers are never
typed and never stale.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .training.config import RunConfig
from .training.config_values import apply_overrides, from_dict

__all__ = [
    "DEMO_STRATEGIES",
    "DEMO_TASKS",
    "demo_config",
    "demo_fingerprint",
    "demo_settings",
    "readme_table",
    "run_demo",
    "update_readme",
]

DEMO_TASKS = {"easy-vqa": "demo_vision", "tones-aqa": "demo_audio"}
DEMO_STRATEGIES = ("constant", "commit", "progress")
"""The strategies the demo compares by default (and the README's tables show)."""
TABLE_FILE = "demo_table.md"


def demo_settings(task: str) -> dict[str, Any]:
    """The demo's run config for ``task`` as a nested dict (what the YAML files hold)."""
    if task not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task!r}; available: {', '.join(DEMO_TASKS)}")
    audio = task == "tones-aqa"
    projector = {"type": "mlp", "stride": 2} if audio else {"type": "mlp"}
    return {
        "run": {"output_dir": f"runs/{DEMO_TASKS[task]}", "seed": 0, "progress": True},
        "data": {
            "task": task,
            "max_eval_samples": 300,
            "max_length": 64,
        },
        "model": {
            "preset": "tiny-pretrained",
            "mllm": {"audio_projector" if audio else "vision_projector": projector},
        },
        "projector_side": "encoder",
        "train": {
            "steps": 600 if audio else 1000,
            "batch_size": 16,
            "lr": 1.0e-3,
            "encoder_lr": 1.0e-3,
            "llm_lr": 1.0e-3,
            "schedule": "cosine",
            "warmup_steps": 20,
            "max_grad_norm": 1.0,
            "eval_every": 200,
            "eval_batch_size": 64,
            "max_new_tokens": 4,
            # A checkpoint every 200 steps: Ctrl-C loses at most 200 steps (demo --resume).
            "save_every": 200,
            "keep_last": 1,
            # One thread: as fast as more for these tiny parts, never slow on a busy CPU,
            # and the same numbers on every machine (the README's table is reproducible).
            "num_threads": 1,
        },
        "commit": {
            "strategy": "commit",
            "window": 10,
            "gamma": 0.03,
            # The pretrained encoder must not be pushed far: x2 at most (docs/method.md).
            "factor_caps": {"encoder": 2.0},
        },
    }


def demo_config(task: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The demo's :class:`~commit_mllm.training.config.RunConfig` with dotted overrides applied."""
    data = apply_overrides(demo_settings(task), overrides)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


_OWN_SETTINGS = {
    "progress": ("progress",),
    "linesearch": ("line_search",),
    "cd": ("feature_cd", "language_cd"),
    "ogm": ("ogm_ge",),
}
"""Prefix of a ``CoMMITConfig`` field -> the strategies that read it."""


def demo_fingerprint(
    task: str, strategies: Sequence[str] = DEMO_STRATEGIES, overrides: Sequence[str] = ()
) -> str:
    """A short hash of the demo's settings (:func:`demo_settings`), overrides, strategies.

    It changes when the demo is changed (a setting, a strategy, the task) and when a default
    of the method's settings (``CoMMITConfig``) changes, since every run's numbers depend on
    them. The output folder and the per-run strategy are left out (they vary per run).
    """
    settings = apply_overrides(demo_settings(task), overrides)
    settings["run"].pop("output_dir", None)
    commit = demo_config(task, overrides).commit.to_dict()
    # A strategy's own settings count only when the demo runs that strategy.
    unused = {p for p, owners in _OWN_SETTINGS.items() if not set(owners) & set(strategies)}
    settings["commit"] = {
        k: v for k, v in commit.items() if k != "strategy" and k.split("_")[0] not in unused
    }
    text = json.dumps(
        {"task": task, "strategies": list(strategies), "settings": settings}, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_demo(
    task: str = "easy-vqa",
    output_dir: str | Path = "runs/demo",
    strategies: Sequence[str] = DEMO_STRATEGIES,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    readme: str | Path | None = None,
) -> list[dict]:
    """Train one run per strategy, print the comparison, write plots, a report and the table.

    Args:
        task: ``easy-vqa`` or ``tones-aqa``.
        output_dir: Parent folder of the runs and the report.
        strategies: Strategies to compare.
        overrides: ``key=value`` overrides of :func:`demo_config`.
        resume: Keep runs that finished earlier and continue an interrupted one from its
            newest checkpoint (written every ``train.save_every`` steps).
        readme: Also replace this task's table block in this file (see :func:`update_readme`).

    Returns:
        The run summaries.

    Raises:
        Preempted: Ctrl-C (SIGINT) or SIGTERM stopped a run after a step (a checkpoint of it
            is written), after saying on stderr what was kept and how to go on.
        KeyboardInterrupt: Ctrl-C outside a training loop, after the same message.
    """
    from .reporting.report import write_compare_report
    from .training.errors import Preempted
    from .training.trainer import train

    out = Path(output_dir) / task
    print(
        f"commit-mllm demo: {task}, strategies {', '.join(strategies)}.\n"
        "Tiny pretrained parts + a fresh projector, instruction-tuned once per strategy; "
        "kappa = D_llm / D_encoder is estimated the same way in every run (every "
        "commit.every steps, 16 by default). The parts are built on the first run (about a "
        "minute on 2 idle cores, several under load) and cached in $COMMIT_MLLM_CACHE or "
        "~/.cache/commit-mllm. Ctrl-C stops a run after its current step with a checkpoint; "
        "--resume continues from there.\n"
    )
    start = time.perf_counter()
    summaries, runs = [], []
    for strategy in strategies:
        run_dir = out / strategy
        cfg = demo_config(
            task, [*overrides, f"commit.strategy={strategy}", f"run.output_dir={run_dir}"]
        )
        done = _finished_summary(run_dir, cfg) if resume else None
        if done is not None:
            print(f"== {strategy}: finished earlier, kept ({run_dir})")
        else:
            print(f"== {strategy}: {cfg.train.steps} steps -> {run_dir}")
            try:
                done = train(cfg, resume=resume)
            except (KeyboardInterrupt, Preempted):
                again = [f"--task {task}", f"--output-dir {output_dir}"]
                again += [f"--strategies {','.join(strategies)}", *overrides, "--resume"]
                _say_interrupted(strategy, run_dir, runs, cfg, " ".join(again))
                raise
        summaries.append(done)
        _plot(run_dir)
        runs.append(run_dir)
    report = write_compare_report(runs, out)
    seconds = time.perf_counter() - start
    table = _table(summaries, runs)
    print("\n" + table)
    fingerprint = demo_fingerprint(task, strategies, overrides)
    path = _write_table(out, task, table, summaries, fingerprint, cfg)
    print(
        f"\nreport: {report}\ntable:  {path}\nplots:  {out}/*.png and {out}/<strategy>/plots/*.png"
    )
    if readme is not None:
        update_readme(readme, task, path)
        print(f"readme: updated the {task} table in {readme}")
    print(f"total time: {seconds:.0f} s")
    return summaries


def _plot(run_dir: Path) -> None:
    from .reporting.plotting import plot_run

    plot_run(run_dir)


def _finished_summary(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The summary of a run that finished all its steps earlier, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return summary if summary.get("steps") == cfg.train.steps else None


def _say_interrupted(
    strategy: str, run_dir: Path, finished: list[Path], cfg: RunConfig, again: str
) -> None:
    """One paragraph on stderr: what Ctrl-C kept and the command that goes on from there."""
    from .training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    kept = f" Finished runs kept: {', '.join(map(str, finished))}." if finished else ""
    where = (
        f"its newest checkpoint is {ckpt}"
        if ckpt is not None
        else f"no checkpoint yet (one every {cfg.train.save_every} steps)"
    )
    print(
        f"\ncommit-mllm demo: interrupted during '{strategy}' ({run_dir}): {where}.{kept} "
        f"Continue with: commit-mllm demo {again}",
        file=sys.stderr,
    )


def _write_table(
    out: Path, task: str, table: str, summaries: list[dict], fingerprint: str, cfg: RunConfig
) -> Path:
    """Write the demo's table file: a provenance comment, the table and how it was run."""
    runs = ", ".join(
        f"{s['strategy']} {s.get('steps')} steps in {s.get('seconds', 0):.0f} s" for s in summaries
    )
    lines = [
        f"<!-- written by `commit-mllm demo --task {task}` (settings {fingerprint}); "
        "do not edit: rerun the demo with --update-readme -->",
        table,
        "",
        f"Seed {cfg.run.seed}, {cfg.data.max_eval_samples} held-out questions; {runs} "
        f"(training loops, {os.cpu_count()} CPU cores; the time depends on the machine's load).",
    ]
    path = out / TABLE_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _markers(task: str) -> tuple[str, str]:
    return f"<!-- demo-table:{task} -->", f"<!-- /demo-table:{task} -->"


def readme_table(readme: str | Path, task: str) -> str:
    """The block between this task's demo-table markers in ``readme`` (stripped).

    Raises:
        ValueError: The markers are missing or out of order.
    """
    text = Path(readme).read_text(encoding="utf-8")
    begin, end = _markers(task)
    match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, flags=re.S)
    if match is None:
        raise ValueError(f"{readme}: no '{begin}' ... '{end}' block")
    return match.group(1).strip()


def update_readme(readme: str | Path, task: str, table_file: str | Path) -> None:
    """Replace this task's demo-table block in ``readme`` by the demo's table and plot.

    The block gets the table file's content and, when the demo drew it, its kappa_bar plot
    (``compare_kappa.png``, copied to ``docs/images/demo_<task>_kappa.png`` beside the
    README).

    Raises:
        ValueError: The markers are missing (add them where the table belongs).
    """
    import shutil

    readme = Path(readme)
    table_file = Path(table_file)
    readme_table(readme, task)  # the markers exist
    begin, end = _markers(task)
    body = table_file.read_text(encoding="utf-8").strip()
    plot = table_file.parent / "compare_kappa.png"
    if plot.is_file():
        image = Path("docs") / "images" / f"demo_{task}_kappa.png"
        (readme.parent / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, readme.parent / image)
        body += f"\n\n![kappa_bar of the {task} demo runs]({image.as_posix()})"
    text = readme.read_text(encoding="utf-8")
    pattern = re.escape(begin) + r"\n.*?" + re.escape(end)
    new = re.sub(pattern, lambda _: f"{begin}\n{body}\n{end}", text, count=1, flags=re.S)
    readme.write_text(new, encoding="utf-8")


def _kappa_profile(run_dir: Path) -> tuple[float | None, float | None, dict[str, float], str]:
    """Median log kappa over the first and the last quarter, state shares, final state."""
    from .reporting.runs import load_run

    run = load_run(run_dir)
    _, kappa = run.series("kappa", positive=True)
    logk = [math.log(k) for k in kappa]
    q = max(1, len(logk) // 4)
    first = statistics.median(logk[:q]) if logk else None
    last = statistics.median(logk[-q:]) if logk else None
    return first, last, run.state_shares(), str(run.final_state())


def _table(summaries: list[dict], runs: list[Path]) -> str:
    """The demo's markdown table: one row per strategy, columns from the runs themselves."""
    from .method.diagnostics import describe_states

    types = sorted({k for s in summaries for k in s if k.startswith("accuracy/")})
    head = ["strategy", "final loss (CE)", "accuracy", *(t.split("/", 1)[1] for t in types)]
    head += ["median log κ (first → last quarter)", "steps per state", "final state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, run in zip(summaries, runs):
        first, last, shares, final = _kappa_profile(run)
        cells = [s["strategy"], _f(s.get("final_loss")), _f(s.get("accuracy"))]
        cells += [_f(s.get(t)) for t in types]
        cells += [f"{_f(first, 2)} → {_f(last, 2)}", describe_states(shares), final]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
