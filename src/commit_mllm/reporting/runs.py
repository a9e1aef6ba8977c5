"""A run folder read back for plotting: :class:`Run`, :func:`load_run`, :func:`group_runs`."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..method.diagnostics import state_shares
from ..training.tracking import RunFormatError, read_jsonl

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

# Per-component metric prefixes, in the order the trainer writes them; a component is any
# name that appears after one of these.
COMPONENT_PREFIXES = (
    "lr/",
    "factor/",
    "grad_norm/",
    "update_norm/",
    "D/",
    "kappa_c/",
    "share/",
    "grad_coeff/",
    "flag/",
)


@dataclass
class Run:
    """One run folder, loaded.

    Attributes:
        run_dir: The folder.
        metrics: One record per optimizer step (``metrics.jsonl``).
        evals: One record per evaluation (``eval.jsonl``; empty when absent).
        summary: ``summary.json`` (empty when absent).
        config: The resolved ``config.yaml`` (None when absent or unreadable).
    """

    run_dir: Path
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    @property
    def strategy(self) -> str | None:
        """The strategy name from the summary, else from the config (``commit.strategy``)."""
        strat = self.summary.get("strategy") or _config_value(self.config, "commit", "strategy")
        if isinstance(strat, Mapping):
            strat = strat.get("name")
        return str(strat) if strat else None

    @property
    def seed(self) -> int | None:
        """The seed from the summary, else from the config (``run.seed``)."""
        seed = self.summary.get("seed")
        if seed is None:
            seed = _config_value(self.config, "run", "seed")
        return int(seed) if isinstance(seed, (int, float)) else None

    @property
    def label(self) -> str:
        """Default group label: the strategy, else the summary's label, else the folder name."""
        return self.strategy or str(self.summary.get("label") or self.run_dir.name)

    @property
    def components(self) -> list[str]:
        """Component names found in the per-component keys, in order of first appearance."""
        names: dict[str, None] = {}
        for rec in self.metrics:
            for key in rec:
                for prefix in COMPONENT_PREFIXES:
                    if key.startswith(prefix):
                        names.setdefault(key[len(prefix) :], None)
        return list(names)

    def series(self, key: str, *, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Steps and float values of one metric, leaving out records where it is missing.

        Args:
            key: Metric key, e.g. ``"kappa"`` or ``"grad_norm/llm"``.
            positive: Keep only values > 0 (for log axes).

        Returns:
            ``(steps, values)`` as float arrays of equal length (possibly empty).
        """
        return _series(self.metrics, key, positive=positive)

    def eval_series(self, key: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of one evaluation metric (empty arrays without evaluations)."""
        return _series(self.evals, key)

    def states(self) -> list[tuple[float, str]]:
        """``(step, state)`` for each metric record that has a balance state."""
        return [
            (float(rec.get("step", i)), str(rec["state"]))
            for i, rec in enumerate(self.metrics)
            if rec.get("state")
        ]

    def state_shares(self) -> dict[str, float]:
        """Share of the logged steps spent in each balance state, largest first."""
        return state_shares([st for _, st in self.states()])

    def final_state(self) -> str | None:
        """The balance state of the last logged step (None without states)."""
        states = self.states()
        return states[-1][1] if states else None

    def loss_series(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the training loss: the cross-entropy (``ce``), without the regularizer.

        Runs that logged no ``ce`` fall back to ``loss``.
        """
        steps, ce = self.series("ce")
        return (steps, ce) if steps.size else self.series("loss")

    def aux_series(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the auxiliary regularizer's term (``aux_loss``; empty when always 0)."""
        steps, aux = self.series("aux_loss")
        return (steps, aux) if steps.size and bool((aux != 0).any()) else (steps[:0], aux[:0])


def _config_value(config: Mapping[str, Any] | None, section: str, key: str) -> Any:
    """``config[section][key]``, else a top-level ``config[key]`` (flat configs)."""
    config = config or {}
    sub = config.get(section)
    if isinstance(sub, Mapping) and sub.get(key) is not None:
        return sub[key]
    return config.get(key)


def _series(
    records: Sequence[Mapping[str, Any]], key: str, *, positive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    steps, values = [], []
    for i, rec in enumerate(records):
        val = rec.get(key)
        # bool is an int subclass: a flag is not a measurement.
        if val is None or isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        val = float(val)
        if not math.isfinite(val) or (positive and val <= 0):
            continue
        steps.append(float(rec.get("step", i)))
        values.append(val)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def load_run(run_dir: str | Path) -> Run:
    """Load a run folder written by the trainer.

    Args:
        run_dir: Folder holding ``metrics.jsonl`` and optionally ``eval.jsonl``,
            ``summary.json`` and ``config.yaml``.

    Returns:
        The :class:`Run`.

    Raises:
        RunFormatError: ``metrics.jsonl`` is missing, or a file does not parse.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RunFormatError(f"{metrics_path}: missing (not a run folder?)")
    metrics = read_jsonl(metrics_path)
    eval_path = run_dir / "eval.jsonl"
    evals = read_jsonl(eval_path) if eval_path.is_file() else []
    summary: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunFormatError(f"{summary_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(summary, dict):
            raise RunFormatError(f"{summary_path}:1: expected a JSON object")
    return Run(run_dir, metrics, evals, summary, _load_config(run_dir / "config.yaml"))


def _load_config(path: Path) -> dict[str, Any] | None:
    """The resolved config, or None: plots never need it, so a bad one only warns."""
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # pyyaml absent or the file is unreadable: the plots go on.
        logger.warning("%s: not read (%s)", path, exc)
        return None
    return cfg if isinstance(cfg, dict) else None


def group_runs(runs: Sequence[Run], labels: Sequence[str] | None = None) -> dict[str, list[Run]]:
    """Group runs by label, in order of first appearance.

    Args:
        runs: Loaded runs.
        labels: One label per run; default each run's :attr:`Run.label` (its strategy).

    Returns:
        Label -> runs (typically the seeds of one strategy).

    Raises:
        ValueError: ``labels`` has a different length than ``runs``.
    """
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    groups: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(str(labels[i]) if labels is not None else run.label, []).append(run)
    return groups


def as_runs(run_dirs: Iterable[str | Path | Run]) -> list[Run]:
    """Each folder loaded as a :class:`Run` (a loaded run is kept as it is)."""
    return [r if isinstance(r, Run) else load_run(r) for r in run_dirs]


Groups = dict[str, list[Run]]


def all_components(groups: Groups) -> list[str]:
    """Every component any run of the groups logs, in first-seen order."""
    names: dict[str, None] = {}
    for runs in groups.values():
        for run in runs:
            names.update(dict.fromkeys(run.components))
    return list(names)
