"""Preemption: SIGTERM / SIGINT end a run after the current step, with a checkpoint.

Cluster schedulers and spot instances stop a job with SIGTERM (then SIGKILL after a grace
period); Ctrl-C sends SIGINT. While :func:`~commit_mllm.training.trainer.train` runs (it is wrapped
in :func:`stop_on_signals`), :class:`StopSignal` turns the first such signal into a request
that the loop honours after the step it is in (and that step's evaluation and checkpoint
when due): it writes a checkpoint of that step and stops. A signal during setup stops the
run before its first step. A second signal ends the process at once (exit code 128 + the
signal's number), which is safe because checkpoints are published atomically.

With several processes every rank must stop after the same step (the checkpoint is a
collective under FSDP, and DDP's next all-reduce would hang). :meth:`StopSignal.agreed`
all-reduces the request, so a signal that reached one rank stops them all together.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import torch

__all__ = ["SIGNALS", "StopSignal", "current", "ignore_in_worker", "stop_on_signals"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)
F = TypeVar("F", bound=Callable[..., Any])
_current: StopSignal | None = None


def current() -> StopSignal | None:
    """The :class:`StopSignal` of the running :func:`stop_on_signals` call, if any."""
    return _current


def stop_on_signals(fn: F) -> F:
    """Run ``fn`` with SIGTERM / SIGINT recorded by a :class:`StopSignal` (see :func:`current`).

    Nested calls share the outer one's; the previous handlers come back when ``fn`` returns
    or raises.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _current
        if _current is not None:
            return fn(*args, **kwargs)
        with StopSignal() as stop:
            _current = stop
            try:
                return fn(*args, **kwargs)
            finally:
                _current = None

    return wrapper  # type: ignore[return-value]


def _stderr_on_rank_0(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


class StopSignal:
    """Context manager that records SIGTERM / SIGINT instead of dying on the first one.

    Handlers are installed on entry (from the main thread only; elsewhere it does nothing)
    and the previous ones restored on exit.

    Args:
        say: Where the one-line notices go (default stderr, on rank 0 only).
    """

    def __init__(self, say: Callable[[str], None] | None = None):
        self.signum: int | None = None
        self._say = say or _stderr_on_rank_0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # Second signal: leave now. Everything published so far is complete.
            self._say(
                f"commit-mllm: {name} again: stopping now, without a new checkpoint "
                "(--resume continues from the last one)"
            )
            os._exit(128 + signum)
        self.signum = signum
        self._say(
            f"commit-mllm: {name}: stopping after the current step, with a checkpoint "
            "(send it again to stop at once)"
        )

    def agreed(self, all_reduce: Callable[[torch.Tensor], None] | None, device: Any) -> int | None:
        """The signal to stop for, agreed by every process (None = keep going).

        Args:
            all_reduce: Sum over processes (None with one process).
            device: Device for the collective's tensor (the accelerator's).

        Returns:
            SIGTERM's number when any process got SIGTERM, else SIGINT's when any got
            SIGINT, else None: the same answer on every rank.
        """
        if all_reduce is None:
            return self.signum
        flag = torch.tensor(
            [float(self.signum == signal.SIGTERM), float(self.signum == signal.SIGINT)],
            device=device,
        )
        all_reduce(flag)
        term, intr = flag.tolist()
        if term > 0:
            return int(signal.SIGTERM)
        return int(signal.SIGINT) if intr > 0 else None


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM.

    Ctrl-C reaches the whole process group; a worker that died of it would fail the step the
    main process is finishing. Workers exit with the main process.
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
