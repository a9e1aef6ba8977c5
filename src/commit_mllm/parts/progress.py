"""Progress of long preparation phases: one line saying what and how long, then a bar.

Preparation runs before any training log exists, often for minutes on a busy CPU, so every
long phase announces itself on standard error (what it does, how long it usually takes) and
shows a ``tqdm`` bar that the CLI displays as it is (no logger configuration needed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Say", "phase", "stderr_say"]

Say = Callable[[str], Any]
"""A line printer (``print``-like); ``None`` where accepted means silent."""


def stderr_say(msg: str) -> None:
    """Prints ``msg`` to standard error and flushes (visible while a phase runs)."""
    print(msg, file=sys.stderr, flush=True)


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        """Does nothing."""

    def set_postfix_str(self, s: str) -> None:
        """Does nothing."""


@contextmanager
def phase(
    say: Say | None,
    what: str,
    usually: str | None = None,
    total: int | None = None,
    unit: str = "step",
) -> Iterator[Any]:
    """Announces a phase, yields a progress bar, and reports its duration at the end.

    Args:
        say: Line printer for the announcement and the closing line (``None``: silent and
            no bar).
        what: What the phase does, e.g. ``"tiny easy-vqa: pretraining the LLM"``.
        usually: How long it usually takes, e.g. ``"~20 s on an idle core"``.
        total: Number of units for the bar (``None``: no bar, only the two lines).
        unit: The bar's unit name.

    Yields:
        A ``tqdm`` bar (call ``update()``) or an object with the same methods that does
        nothing.
    """
    if say is None:
        yield _NoBar()
        return
    say(f"[prepare] {what}" + (f" (usually {usually})" if usually else ""))
    t0 = time.perf_counter()
    if total is None:
        yield _NoBar()
    else:
        from tqdm.auto import tqdm

        # A log file (not a terminal) gets a bar line every few seconds, not a flood, and
        # keeps the final one; a terminal's bar is cleared (the closing line follows).
        tty = sys.stderr.isatty()
        bar = tqdm(
            total=total,
            unit=unit,
            file=sys.stderr,
            leave=not tty,
            dynamic_ncols=True,
            mininterval=0.1 if tty else 5.0,
        )
        try:
            yield bar
        finally:
            bar.close()
    say(f"[prepare] {what}: done in {time.perf_counter() - t0:.1f} s")
