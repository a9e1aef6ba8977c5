"""Run logs: metrics.jsonl / eval.jsonl (one JSON object per line), TensorBoard, W&B.

Only the main process writes. On resume, records at or after the resumed step are dropped
first, so the logs of a resumed run equal those of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunFormatError", "RunLogger", "read_jsonl"]

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


class RunLogger:
    """Writes step metrics and evaluations of a run.

    Args:
        run_dir: The run folder.
        enabled: False on non-main processes (nothing is written).
        tensorboard: Also write TensorBoard scalars under ``run_dir/tb``.
        wandb: Also log to W&B (needs ``wandb`` installed).
        resume_step: Drop existing records with ``step >= resume_step`` (None = new run:
            existing logs are replaced).
        config: Run config to pass to W&B.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        resume_step: int | None = None,
        config: Mapping | None = None,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "eval.jsonl"):
            self._truncate(self.run_dir / name, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)
        if wandb:
            try:
                import wandb as wb
            except ImportError as e:
                raise RuntimeError("run.wandb: true needs `pip install wandb`") from e
            self.wandb = wb.init(dir=str(self.run_dir), config=dict(config or {}), resume="allow")

    @staticmethod
    def _truncate(path: Path, resume_step: int | None) -> None:
        if not path.exists():
            return
        keep = []
        if resume_step is not None:
            keep = [r for r in read_jsonl(path) if r.get("step", 0) < resume_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)

    def _write(self, name: str, record: Mapping[str, Any]) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def log_step(self, record: Mapping[str, Any]) -> None:
        """Append one step record; scalars also go to TensorBoard / W&B."""
        if not self.enabled:
            return
        self._write("metrics.jsonl", record)
        self._scalars("train", record)

    def log_eval(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record."""
        if not self.enabled:
            return
        self._write("eval.jsonl", record)
        self._scalars("eval", record)

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
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
