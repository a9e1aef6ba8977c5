"""The exception types the CLI turns into one line on stderr and an exit code.

Raise these (or the existing ``ValueError`` subclasses) from any code the CLI runs, with a
message that names the file, row or key and says what to do; the CLI prints
``commit-mllm COMMAND: MESSAGE`` and no traceback (unless ``--debug`` or
``COMMIT_MLLM_DEBUG=1``):

=============================================  =====  ===================================
exception                                      exit   meaning
=============================================  =====  ===================================
``ValueError`` and subclasses (``ConfigError``,  2    the command, config or an input file
``DataFormatError``, ``MediaError``,                  is wrong; fixing it fixes the run
:class:`CheckpointError`); ``FileNotFoundError``,
``PermissionError``, ``IsADirectoryError``
:class:`RunError` (:class:`NonFiniteError`,     1    the run started and failed
:class:`DeadRunError`)
:class:`Preempted`                             128+N  stopped by signal N (SIGINT 130,
                                                      SIGTERM 143) after a checkpoint
``KeyboardInterrupt``                           130   Ctrl-C outside the training loop
anything else                                    1    a bug: one line, ``--debug`` for more
=============================================  =====  ===================================
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["CheckpointError", "DeadRunError", "NonFiniteError", "Preempted", "RunError"]


class RunError(RuntimeError):
    """A run started and failed (exit code 1); the message says what was kept, what to do."""


class NonFiniteError(RunError):
    """``train.max_bad_steps`` non-finite losses or gradients in a row aborted the run.

    Attributes:
        step: The step index at which the run aborted.
        checkpoint: The newest verified checkpoint (kept), or None.
    """

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class DeadRunError(RunError):
    """``train.max_dead_steps`` steps in a row with no gradient or an unchanged loss.

    Attributes:
        step: The step index at which the run stopped.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointError(ValueError):
    """A checkpoint is incomplete, damaged, or holds objects that are not plain data."""


class Preempted(Exception):
    """SIGTERM or SIGINT stopped a run after a step; a checkpoint of that step is written.

    Attributes:
        signum: The signal's number.
        step: Optimizer steps done (the checkpoint's step).
        steps: Steps the run was configured for.
        checkpoint: The checkpoint to resume from (None when stopped before a first step).
        run_dir: The run folder.
    """

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path | None, run_dir: Path):
        self.signum, self.step, self.steps = signum, step, steps
        self.checkpoint, self.run_dir = checkpoint, run_dir
        saved = f"checkpoint {checkpoint} is written" if checkpoint else "no checkpoint yet"
        super().__init__(f"stopped by {self.signal_name} after step {step} of {steps}; {saved}")

    @property
    def signal_name(self) -> str:
        """``SIGTERM``, ``SIGINT`` ..."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 128 + its number."""
        return 128 + self.signum
