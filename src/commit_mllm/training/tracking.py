"""Run logs: metrics.jsonl, eval.jsonl, predictions/, skipped_samples.jsonl, TensorBoard, W&B.

Only the main process writes. The resume invariant (docs/reliability.md): checkpoint S is
published only after every record up to S is written and synced, where "up to S" means the
step records of steps 0 .. S-1 (``step`` < S) and the evaluations after 1 .. S steps
(``step`` <= S, with their predictions). Resuming from S first rewinds the folder to exactly
that (:func:`rewind`): later records are dropped and redone, so the files of a resumed run
equal those of an uninterrupted one, whatever the kill, with no step twice and none missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RunFormatError",
    "RunLogger",
    "clear",
    "read_jsonl",
    "rewind",
    "start_over",
    "write_atomic",
]

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunFormatError(ValueError):
    """A run folder's file is missing or cannot be parsed (the message names file and line)."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's JSON-lines file, in file order ([] when the file is missing).

    Blank lines are skipped. A final line without a newline that does not parse is a record
    the writer was killed in the middle of (or is still writing): it is skipped with a
    warning, so a run killed mid-write can still be resumed and plotted.

    Raises:
        RunFormatError: Any other line is not a JSON object (the message names file and line).
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):
                logger.warning("%s:%d: skipping a partial last line (%s)", path, lineno, exc.msg)
                continue
            raise RunFormatError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise RunFormatError(
                f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
            )
        records.append(rec)
    return records


# The files a run writes besides its checkpoints; a new run in the same folder replaces them.
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "skipped_samples.jsonl", "summary.json")
RUN_DIRS = ("predictions", "tb", "plots")
_TB_STAGE = ".tb-rewind"  # beside tb/, which TensorBoard would show as a run of its own


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temp file beside it, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _keep_jsonl(path: Path, keep: Any) -> None:
    """Keep the records ``keep`` accepts; a file that loses none is left untouched."""
    if path.exists():
        records = [r for r in read_jsonl(path) if keep(r)]
        text = "".join(json.dumps(r) + "\n" for r in records)
        if text != path.read_text(encoding="utf-8"):
            write_atomic(path, text)


def _prediction_step(path: Path) -> int | None:
    stem = path.name.removesuffix(".jsonl")
    if path.suffix != ".jsonl" or not stem.startswith("step-") or not stem[5:].isdigit():
        return None
    return int(stem[5:])


def rewind(run_dir: str | Path, step: int, micro_batches: int | None = None) -> None:
    """Make a run folder's records what they were when checkpoint ``step`` was published.

    Keeps step records with ``step`` < S, evaluations (and their predictions files) with
    ``step`` <= S, TensorBoard scalars on the same rule (``eval/*`` tags <= S, the rest < S),
    and skipped-sample records of the first ``micro_batches`` micro-batches, and removes
    files a killed write left behind. ``summary.json`` stays: it describes the last run that
    finished until a resumed run finishes and replaces it. A file that loses nothing is not
    touched; the others are rewritten atomically, so a kill during the rewind is undone by
    the next.

    Args:
        run_dir: The run folder.
        step: The checkpoint's step S (optimizer steps done).
        micro_batches: Micro-batches consumed by S steps (``S * grad_accum``); None keeps
            every skipped-sample record.
    """
    run_dir = Path(run_dir)
    _keep_jsonl(run_dir / "metrics.jsonl", lambda r: r.get("step", 0) < step)
    _keep_jsonl(run_dir / "eval.jsonl", lambda r: r.get("step", 0) <= step)
    if micro_batches is not None:
        keep = lambda r: r.get("micro_batch", 0) < micro_batches  # noqa: E731
        _keep_jsonl(run_dir / "skipped_samples.jsonl", keep)
    preds = run_dir / "predictions"
    if preds.is_dir():
        for path in preds.iterdir():
            n = _prediction_step(path)
            if n is None or n > step:
                path.unlink()
    _rewind_tensorboard(run_dir, step)


def start_over(run_dir: Path, warn: Callable[..., None]) -> None:
    """A new run in ``run_dir``: remove an earlier run's checkpoints (and say what it had).

    Its records go when the run's :class:`RunLogger` starts (:func:`clear`). Leaving the
    checkpoints would let a later ``--resume`` pick the earlier run's newer ones.
    """
    found = [n for n in RUN_FILES if (run_dir / n).exists()]
    found += [f"{n}/" for n in ("checkpoints", *RUN_DIRS) if (run_dir / n).exists()]
    if found:
        warn(
            "%s: replacing the files of an earlier run (%s) because this run has no "
            "--resume; use --resume to continue that run instead",
            run_dir,
            ", ".join(found),
        )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def clear(run_dir: str | Path) -> list[str]:
    """Remove the records of an earlier run from a run folder (a new run starts).

    Returns:
        The names removed (files and folders of :data:`RUN_FILES` / :data:`RUN_DIRS`).
    """
    run_dir = Path(run_dir)
    removed = []
    for name in RUN_FILES:
        if (run_dir / name).exists():
            (run_dir / name).unlink()
            removed.append(name)
    for name in (*RUN_DIRS, _TB_STAGE):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
            removed.append(f"{name}/")
    return [n for n in removed if n != f"{_TB_STAGE}/"]


def _event_files(folder: Path) -> list[Path]:
    """TensorBoard event files of a folder, oldest first (the name holds the creation time)."""

    def created(p: Path) -> tuple:
        parts = p.name.split(".")
        return (int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0, p.name)

    return sorted(folder.glob("events.out.tfevents.*"), key=created) if folder.is_dir() else []


def _rewind_tensorboard(run_dir: Path, step: int) -> None:
    """Rewrite ``run_dir/tb`` as one event file holding the scalars up to checkpoint ``step``.

    TensorBoard's own ``purge_step`` hides later events from its reader only (the files keep
    them, and it cannot keep ``eval/*`` at S while dropping train scalars at S), so the
    events are filtered and written again: staged beside ``tb/``, then the old files are
    removed and the new one moved in. Each (tag, step) is kept once, so re-reading a
    stage left by a kill together with old files gives the same result. Files that hold
    nothing to drop are left as they are.
    """
    tb, stage = run_dir / "tb", run_dir / _TB_STAGE
    sources = [*_event_files(stage), *_event_files(tb)]
    if not sources:
        shutil.rmtree(stage, ignore_errors=True)
        return
    kept, dropped = _kept_events(sources, step)
    if not dropped and not stage.exists():
        return
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    fresh = stage / "new"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    writer = EventFileWriter(str(fresh))
    for event in sorted(kept.values(), key=lambda e: (e.wall_time, e.step)):
        writer.add_event(event)
    writer.close()
    for path in _event_files(fresh):
        _fsync_file(path)
    for path in [*_event_files(tb), *_event_files(stage)]:
        path.unlink()
    tb.mkdir(exist_ok=True)
    for path in _event_files(fresh):
        os.replace(path, tb / path.name)
    shutil.rmtree(stage, ignore_errors=True)


def _kept_events(sources: list[Path], step: int) -> tuple[dict[tuple[str, int], Any], bool]:
    """The scalar events up to checkpoint ``step``, one per (tag, step); whether any went.

    A scalar goes when it is later than the checkpoint, a duplicate, or cut by a kill.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2, summary_pb2

    kept: dict[tuple[str, int], Any] = {}
    dropped = False
    for path in sources:
        for raw in RawEventFileLoader(str(path)).Load():  # stops at a record cut by a kill
            event = event_pb2.Event.FromString(raw)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                limit = step if value.tag.startswith("eval/") else step - 1
                if event.step > limit or (value.tag, event.step) in kept:
                    dropped = True
                    continue
                one = event_pb2.Event(wall_time=event.wall_time, step=event.step)
                one.summary.CopyFrom(summary_pb2.Summary(value=[value]))
                kept[(value.tag, event.step)] = one
        dropped = dropped or _cut_short(path)
    return kept, dropped


def _cut_short(path: Path) -> bool:
    """Whether an event file ends in a record a kill cut off (bytes past its last record)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    whole = sum(len(raw) + 16 for raw in RawEventFileLoader(str(path)).Load())
    return whole != path.stat().st_size


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class RunLogger:
    """Writes the step records, evaluations, predictions and skipped samples of a run.

    Args:
        run_dir: The run folder.
        enabled: False on non-main processes (nothing is written).
        tensorboard: Also write TensorBoard scalars under ``run_dir/tb``.
        wandb: Also log to W&B (needs ``wandb`` installed; its history is not rewound on
            resume).
        resume_step: Resuming from the checkpoint of this step: the folder is first rewound
            to it (:func:`rewind`). None = a new run: the records of an earlier run in the
            folder are removed (:func:`clear`).
        config: Run config to pass to W&B.
        micro_batches: Micro-batches consumed by ``resume_step`` steps (for
            ``skipped_samples.jsonl``); None keeps every skipped-sample record.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        resume_step: int | None = None,
        config: Mapping | None = None,
        micro_batches: int | None = None,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tb = self.wandb = None
        self._tensorboard = tensorboard and enabled
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            clear(self.run_dir)
        else:
            rewind(self.run_dir, resume_step, micro_batches)
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise ValueError(
                    "run.wandb: true needs `pip install wandb` (or set run.wandb=false)"
                ) from None
            self.wandb = wb.init(dir=str(self.run_dir), config=dict(config or {}), resume="allow")

    def _write(self, name: str, record: Mapping[str, Any]) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def log_step(self, record: Mapping[str, Any]) -> None:
        """Append one step record; scalars also go to TensorBoard / W&B."""
        if not self.enabled:
            return
        self._write("metrics.jsonl", record)
        self._scalars("train", record)

    def log_eval(self, record: Mapping[str, Any], predictions: Iterable[dict] = ()) -> None:
        """Write an evaluation's predictions (``predictions/step-N.jsonl``), then its record."""
        if not self.enabled:
            return
        step = int(record.get("step", 0))
        preds = self.run_dir / "predictions"
        preds.mkdir(exist_ok=True)
        text = "".join(json.dumps(p) + "\n" for p in predictions)
        write_atomic(preds / f"step-{step:08d}.jsonl", text)
        self._write("eval.jsonl", record)
        self._scalars("eval", record)

    def log_skipped(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records of training samples dropped by ``data.on_bad_sample: skip``."""
        if self.enabled:
            with open(self.run_dir / "skipped_samples.jsonl", "a") as f:
                f.writelines(json.dumps(dict(r)) + "\n" for r in records)

    def sync(self) -> None:
        """Flush TensorBoard and fsync the JSONL files (before a checkpoint is published)."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
            for path in _event_files(self.run_dir / "tb"):
                _fsync_file(path)
        for name in ("metrics.jsonl", "eval.jsonl", "skipped_samples.jsonl"):
            if (self.run_dir / name).exists():
                _fsync_file(self.run_dir / name)

    def _scalars(self, prefix: str, record: Mapping[str, Any]) -> None:
        step = record.get("step", 0)
        scalars = {
            f"{prefix}/{k}": float(v)
            for k, v in record.items()
            if k != "step"
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
        }
        if self._tensorboard and self.tb is None:
            # Opened at the first scalar, not at start: a resume that fails before its first
            # step leaves tb/ as it found it.
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the writers (a later scalar opens TensorBoard's again)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
