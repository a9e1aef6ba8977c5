"""The loss plots: one run's cross-entropy, regularizer term and eval accuracy; across runs."""

from __future__ import annotations

from pathlib import Path

from .figures import draw_band, legend, new_figure, run_title, save_figure
from .runs import Groups, Run
from .smoothing import moving_average


def plot_run_loss(run: Run, path: Path, window: int) -> str | None:
    """Loss = cross-entropy (raw and moving average) with eval accuracy on a second axis.

    The auxiliary regularizer's term (``aux_loss``, an entropy bonus: negative) is drawn in
    its own panel below when it is not zero, never added to the loss: a run with the
    regularizer would otherwise look better than one without at the same cross-entropy.
    """
    steps, loss = run.loss_series()
    if not steps.size:
        return "no loss values"
    aux_steps, aux = run.aux_series()
    two = bool(aux_steps.size)
    fig, axes = new_figure(
        2 if two else 1,
        1,
        sharex=True,
        size=(8.0, 6.0 if two else 4.5),
        **({"gridspec_kw": {"height_ratios": [3, 1]}} if two else {}),
    )
    ax = axes[0, 0]
    ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8, label="loss (CE)")
    ax.plot(steps, moving_average(loss, window), color="C0", lw=2, label=f"loss (CE, MA {window})")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(run_title(run, "loss and evaluation accuracy"))
    handles = []
    ev_steps, acc = run.eval_series("accuracy")
    if ev_steps.size:
        acc_ax = ax.twinx()
        acc_ax.plot(ev_steps, acc, "o-", color="C3", label="eval accuracy")
        types = sorted({k for r in run.evals for k in r if k.startswith("accuracy/")})
        for i, key in enumerate(types):
            ts, tv = run.eval_series(key)
            acc_ax.plot(ts, tv, ":", marker=".", color=f"C{4 + i}", lw=1, label=key)
        acc_ax.set_ylabel("accuracy")
        handles = acc_ax.get_legend_handles_labels()[0]
    legend(ax, handles, loc="best")
    if two:
        aux_ax = axes[1, 0]
        aux_ax.plot(aux_steps, aux, color="C1", alpha=0.25, lw=0.8)
        aux_ax.plot(aux_steps, moving_average(aux, window), color="C1", lw=2, label="aux_loss (MA)")
        aux_ax.axhline(0.0, color="k", lw=0.8)
        aux_ax.set_ylabel("regularizer term")
        legend(aux_ax, loc="best")
    axes[-1, 0].set_xlabel("step")
    save_figure(fig, path)
    return None


def plot_compare_loss(groups: Groups, path: Path, window: int) -> str | None:
    """Smoothed CE loss per label with a seed band; the regularizer's term and eval beside it.

    Panels: the cross-entropy loss; the auxiliary term (``aux_loss``) when a run has one, so
    it never hides inside the loss; evaluation accuracy when logged.
    """
    all_runs = [r for runs in groups.values() for r in runs]
    has_aux = any(r.aux_series()[0].size for r in all_runs)
    has_eval = any(r.eval_series()[0].size for r in all_runs)
    panels = ["loss", *(["aux"] if has_aux else []), *(["eval"] if has_eval else [])]
    fig, axes = new_figure(
        1, len(panels), size=(6.0 * len(panels) if len(panels) > 1 else 8.0, 4.5)
    )
    ax = {name: axes[0, k] for k, name in enumerate(panels)}
    drawn = 0
    for i, (label, runs) in enumerate(groups.items()):
        series = {"loss": [r.loss_series() for r in runs], "aux": [r.aux_series() for r in runs]}
        for name in ("loss", "aux"):
            traces = [(st, moving_average(v, window)) for st, v in series[name] if st.size]
            if traces and name in ax:
                draw_band(ax[name], traces, f"C{i}", label)
                drawn += name == "loss"
        evals = [t for t in (r.eval_series() for r in runs) if t[0].size]
        if has_eval and evals:
            draw_band(ax["eval"], evals, f"C{i}", label)
    if not drawn:
        return "no run has loss values"
    ax["loss"].set(
        xlabel="step", ylabel=f"loss (CE, MA {window})", title="training loss (cross-entropy)"
    )
    if has_aux:
        ax["aux"].axhline(0.0, color="k", lw=0.8)
        ax["aux"].set(xlabel="step", ylabel=f"aux_loss (MA {window})", title="regularizer term")
    if has_eval:
        ax["eval"].set(xlabel="step", ylabel="accuracy", title="evaluation accuracy")
    for a in ax.values():
        legend(a)
    save_figure(fig, path)
    return None
