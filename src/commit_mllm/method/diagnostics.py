"""Smoothing and diagnostics of the balance estimates (METHOD.md, "Smoothing and diagnostics").

Single estimates of log kappa are very noisy (std about 2-3 between steps), so every
decision uses the window of the estimates taken in the last N training steps (N / K
estimates when kappa is estimated every K steps; the window is a span of training, so K
changes how many estimates it averages, not how far back it reaches):

    z_{c,t}      = 2 * (log kappa_{c,t} - log kappa*_c)      imbalance of component c
    kappa_bar_t  = exp(mean of log kappa over the window)    (geometric mean)
    bias index   = max_c |mean_window z_c|                   (two components: |mean(log kappa
                                                               - log kappa_target)|)
    oscillation  = std of the smoothed z_bar over a longer span of S steps, and its sign-flip
                   rate per step (at least two flips: one crossing is a transition, not an
                   oscillation)

kappa*_c are the per-component targets (kappa_target for the pair; 1 for n components).
The factor 2 makes z of the pair's numerator equal log(kappa / kappa_target) with two
components, and for n components every pairwise log-ratio reads like the two-component case.
Only components that move are compared: a frozen component has no learning to balance.

Symbols -> variables: N -> ``window``; K -> ``every``; S -> ``span``; z -> :func:`imbalance`;
kappa_bar -> ``BalanceState.kappa_bar``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .measurement import BalanceMeasurement

__all__ = [
    "BalanceState",
    "BalanceTracker",
    "describe_states",
    "imbalance",
    "state_shares",
    "target_log_weights",
]


def target_log_weights(
    names: Sequence[str],
    pair: tuple[str, str] | None,
    kappa_target: float = 1.0,
    component_targets: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Log target weights log w_c: the D_c proportions the controller aims at.

    Args:
        names: Component names.
        pair: (numerator, denominator) of kappa, for two components.
        kappa_target: Target of D_num / D_den (two components).
        component_targets: Optional explicit relative targets of D_c (n components);
            overrides ``kappa_target``.

    Returns:
        Component -> log w_c (un-centred; :func:`imbalance` centres them).
    """
    if kappa_target <= 0:
        raise ValueError(f"kappa_target must be > 0, got {kappa_target}")
    if component_targets:
        missing = [n for n in names if n not in component_targets]
        if missing:
            raise ValueError(f"component_targets lacks {missing}")
        return {n: math.log(component_targets[n]) for n in names}
    logs = {n: 0.0 for n in names}
    if pair is not None:
        logs[pair[0]] = math.log(kappa_target)
    return logs


def imbalance(
    D: Mapping[str, float], log_targets: Mapping[str, float], eps: float = 1e-12
) -> dict[str, float]:
    """z_c = 2 (log kappa_c - log kappa*_c) over the components present in ``D``.

    Args:
        D: Component -> D_c for the moving components only.
        log_targets: Component -> log w_c (see :func:`target_log_weights`).
        eps: Floor of D_c.

    Returns:
        Component -> z_c; the values sum to 0.
    """
    logs = {c: math.log(max(d, eps)) - log_targets[c] for c, d in D.items()}
    mean = sum(logs.values()) / len(logs)
    return {c: 2.0 * (v - mean) for c, v in logs.items()}


@dataclass
class BalanceState:
    """The smoothed balance after the latest estimate.

    Attributes:
        estimates: Valid estimates seen so far.
        kappa_bar: Geometric mean of kappa over the window (two components), else None.
        kappa_bar_c: Component -> geometric-mean kappa_c over the window.
        z_bar: Component -> mean imbalance z_c over the window.
        bias_index: max_c |z_bar_c|.
        oscillation_index: Std of the smoothed z_bar over the span (largest over c).
        flip_rate: Sign flips of the smoothed z_bar per training step over the span.
        state: ``"warming_up"`` (window not yet full once), ``"balanced"``,
            ``"biased-to-<component>"`` or ``"oscillating"``.
        collapse: True when log kappa_bar exceeds the collapse threshold (D_enc ~ 0: the
            model is falling back on its language prior).
    """

    estimates: int = 0
    kappa_bar: float | None = None
    kappa_bar_c: dict[str, float] = field(default_factory=dict)
    z_bar: dict[str, float] = field(default_factory=dict)
    bias_index: float = 0.0
    oscillation_index: float = 0.0
    flip_rate: float = 0.0
    state: str = "warming_up"
    collapse: bool = False


class BalanceTracker:
    """Keeps the estimates of the last N steps and labels the balance state.

    Args:
        names: Component names.
        pair: (numerator, denominator) of kappa for two components.
        window: N, training steps in the smoothing window.
        every: K, steps between estimates; the window is full after ceil(N / K) estimates.
        span: S, steps of smoothed values kept for the oscillation index (default 5 N).
        kappa_target: Target of kappa (two components).
        component_targets: Relative targets of D_c (n components).
        bias_threshold: State is biased when the bias index exceeds it (log units).
        oscillation_threshold: Minimum std of the smoothed imbalance for "oscillating".
        flip_threshold: Minimum sign-flip rate of the smoothed imbalance for "oscillating".
        collapse_log_kappa: log kappa_bar above which the run is flagged as collapsing.
        eps: Floor of D_c.
    """

    def __init__(
        self,
        names: Sequence[str],
        pair: tuple[str, str] | None = None,
        *,
        window: int = 20,
        every: int = 1,
        span: int | None = None,
        kappa_target: float = 1.0,
        component_targets: Mapping[str, float] | None = None,
        bias_threshold: float = math.log(3.0),
        oscillation_threshold: float = 1.0,
        flip_threshold: float = 0.05,
        collapse_log_kappa: float = 5.0,
        eps: float = 1e-12,
    ):
        if window < 1:
            raise ValueError(f"window (N) must be >= 1, got {window}")
        if every < 1:
            raise ValueError(f"every (K) must be >= 1, got {every}")
        self.names, self.pair, self.window, self.every = list(names), pair, window, every
        self.span = span or 5 * window
        #: Valid estimates that fill the window once (no decision before).
        self.needed = math.ceil(window / every)
        self.log_targets = target_log_weights(names, pair, kappa_target, component_targets)
        self.bias_threshold, self.oscillation_threshold = bias_threshold, oscillation_threshold
        self.flip_threshold, self.collapse_log_kappa, self.eps = (
            flip_threshold,
            collapse_log_kappa,
            eps,
        )
        # (step, values) pairs, oldest first.
        self._z: deque[tuple[int, dict[str, float]]] = deque()
        self._logk: deque[tuple[int, dict[str, float]]] = deque()
        self._zbar: deque[tuple[int, dict[str, float]]] = deque()
        self.estimates = 0
        self.state = BalanceState()
        self.last_z: dict[str, float] | None = None

    def active(self, m: BalanceMeasurement) -> dict[str, float] | None:
        """D_c of the moving components, or None when the estimate carries no signal.

        Frozen components are left out; an estimate with no supervised token, fewer than
        two moving components, or a trainable component whose update was exactly zero
        carries no balance signal.
        """
        if m.tokens <= 0 or any(f == "zero_update" for f in m.flags.values()):
            return None
        D = {c: d for c, d in m.D.items() if m.flags.get(c) != "frozen"}
        return D if len(D) >= 2 else None

    def update(self, m: BalanceMeasurement) -> BalanceState:
        """Add one estimate; return the new :class:`BalanceState`."""
        D = self.active(m)
        self.last_z = None
        if D is None:
            return self.state
        z = self.last_z = imbalance(D, self.log_targets, self.eps)
        mean_log = sum(math.log(max(d, self.eps)) for d in D.values()) / len(D)
        self._z.append((m.step, z))
        self._logk.append(
            (m.step, {c: math.log(max(d, self.eps)) - mean_log for c, d in D.items()})
        )
        _prune(self._z, m.step - self.window)
        _prune(self._logk, m.step - self.window)
        self.estimates += 1
        self.state = self._summarize()
        return self.state

    def _summarize(self, record: bool = True) -> BalanceState:
        step, last = self._z[-1]
        comps = list(last)
        z_bar = {c: _mean([z.get(c, 0.0) for _, z in self._z]) for c in comps}
        logk_bar = {c: _mean([lk.get(c, 0.0) for _, lk in self._logk]) for c in comps}
        kappa_bar = None
        if self.pair is not None and all(p in logk_bar for p in self.pair):
            kappa_bar = math.exp(logk_bar[self.pair[0]] - logk_bar[self.pair[1]])
        st = BalanceState(
            estimates=self.estimates,
            kappa_bar=kappa_bar,
            kappa_bar_c={c: math.exp(v) for c, v in logk_bar.items()},
            z_bar=z_bar,
            bias_index=max(abs(v) for v in z_bar.values()),
        )
        if self.estimates < self.needed:
            return st
        if record:
            self._zbar.append((step, z_bar))
            _prune(self._zbar, step - self.span)
        history = [h for _, h in self._zbar]
        st.oscillation_index = max(_std([h.get(c, 0.0) for h in history]) for c in comps)
        flips = [_flips([h.get(c, 0.0) for h in history]) for c in comps]
        covered = max(1, self._zbar[-1][0] - self._zbar[0][0]) if self._zbar else 1
        st.flip_rate = max(n / covered for n in flips)
        # One crossing is a transition; oscillation needs a swing there and back.
        if (
            st.oscillation_index >= self.oscillation_threshold
            and st.flip_rate >= self.flip_threshold
            and max(flips) >= 2
        ):
            st.state = "oscillating"
        elif st.bias_index > self.bias_threshold:
            st.state = f"biased-to-{max(z_bar, key=z_bar.get)}"
        else:
            st.state = "balanced"
        if kappa_bar is not None:
            st.collapse = math.log(kappa_bar) > self.collapse_log_kappa
        return st

    @property
    def z_bar(self) -> dict[str, float]:
        """Mean imbalance z_c over the window (empty before the first estimate)."""
        return dict(self.state.z_bar)

    def state_dict(self) -> dict:
        """Window, span history (``[step, values]`` pairs) and counters (plain Python types)."""
        return {
            "z": [[t, v] for t, v in self._z],
            "logk": [[t, v] for t, v in self._logk],
            "zbar": [[t, v] for t, v in self._zbar],
            "estimates": self.estimates,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned.

        A state written before the window was counted in steps (plain value lists) is read
        as consecutive steps ending at -1.
        """
        self._z = _timed(state["z"])
        self._logk = _timed(state["logk"])
        self._zbar = _timed(state["zbar"])
        self.estimates = int(state["estimates"])
        self.state = BalanceState()
        if self._z:
            # The span history already holds the last smoothed value: do not record it again.
            self.state = self._summarize(record=False)


def _prune(entries: deque, oldest_excluded: int) -> None:
    """Drop (step, values) entries at or before ``oldest_excluded``; keep the newest."""
    while len(entries) > 1 and entries[0][0] <= oldest_excluded:
        entries.popleft()


def _timed(entries: Sequence) -> deque:
    if entries and isinstance(entries[0], Mapping):
        return deque((i - len(entries), dict(v)) for i, v in enumerate(entries))
    return deque((int(t), dict(v)) for t, v in entries)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _flips(xs: Sequence[float]) -> int:
    signs = [x > 0 for x in xs if x != 0]
    return sum(a != b for a, b in itertools.pairwise(signs))


def state_shares(states: Sequence[str]) -> dict[str, float]:
    """Share of steps spent in each balance state, largest first (ties: first seen first).

    The state of the last window alone says little about a run (one balanced window after
    hundreds of biased ones reads "balanced"); the shares say how the run went.

    Args:
        states: The state of each logged step, in order.

    Returns:
        State -> fraction of the steps in ``[0, 1]`` (empty for no states).
    """
    counts: dict[str, int] = {}
    for st in states:
        counts[st] = counts.get(st, 0) + 1
    total = sum(counts.values())
    order = sorted(counts, key=lambda st: -counts[st])  # stable: first seen wins ties
    return {st: counts[st] / total for st in order}


def describe_states(shares: Mapping[str, float], final: str | None = None) -> str:
    """``"biased-to-llm 78%, balanced 22%; final balanced"``: shares, then the final state."""
    text = ", ".join(f"{st} {_percent(share)}" for st, share in shares.items()) or "no states"
    return f"{text}; final {final}" if final else text


def _percent(share: float) -> str:
    """``78%``; a state seen at all never reads ``0%`` (``<1%``)."""
    return "<1%" if 0 < share < 0.005 else f"{100 * share:.0f}%"
