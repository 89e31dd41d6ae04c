"""Training curves as a PNG: loss, accuracy and the new activations' parameters per epoch.

matplotlib is the optional ``plot`` extra: it is imported only when a plot is asked for, and
its absence is a UsageError that says how to install it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrofit.atomic import atomic_output
from retrofit.errors import UsageError

if TYPE_CHECKING:
    from retrofit.evaluation.metrics import SeedPairedDelta
    from retrofit.training.state import EpochRecord

_LABELLED_SITES = 6
"""With more activation sites than this the legend names only the parameters, not each site."""


def save_training_plot(history: Sequence["EpochRecord"], path: str | os.PathLike[str]) -> Path:
    """Write the curves of ``history`` (from :class:`~retrofit.training.results.FinetuneResult`) to ``path``
    as a PNG, atomically.

    Panels: training loss; training and validation top-1; and, when the model has new
    activations, each CompetitiveReLU's alpha (solid) and beta (dashed), MRePU's blend lam
    (dotted) and its gains a (dash-dot) and b (dense dots), on a symmetric-log axis when gains
    are there (fitted gains span decades). Returns the path.
    """
    if not history:
        raise UsageError("there is no epoch to plot: the training history is empty")
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise UsageError(
            "the training plot needs matplotlib: pip install 'cadrelu[plot]'"
        ) from error

    epochs = [record.epoch for record in history]
    sites = {name: values for record in history for name, values in record.activations.items()}
    figure = Figure(figsize=(13 if sites else 9, 3.6), layout="constrained")
    axes = figure.subplots(1, 3 if sites else 2)

    loss = axes[0]
    loss.plot(epochs, [r.train_loss for r in history], marker="o", label="train")
    loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")

    accuracy = axes[1]
    accuracy.plot(epochs, [r.train_top1 for r in history], marker="o", label="train")
    val = [(r.epoch, r.val_top1) for r in history if r.val_top1 is not None]
    if val:
        accuracy.plot(*zip(*val), marker="o", label="validation")
    accuracy.set(title="top-1 accuracy", xlabel="epoch", ylabel="%")
    accuracy.legend()

    if sites:
        _plot_activations(axes[2], history, sorted(sites))

    with atomic_output(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    return Path(path)


def _plot_activations(axis: Any, history: Sequence["EpochRecord"], sites: list[str]) -> None:
    named = len(sites) <= _LABELLED_SITES
    styles = {"alpha": "-", "beta": "--", "lam": ":", "gain_in": "-.", "gain_out": (0, (1, 1))}
    labelled: set[str] = set()
    for index, site in enumerate(sites):
        color = f"C{index % 10}"
        points = [(r.epoch, r.activations[site]) for r in history if site in r.activations]
        for key, style in styles.items():
            series = [(epoch, values[key]) for epoch, values in points if key in values]
            if not series:
                continue
            label = f"{site} {key}" if named else (key if key not in labelled else None)
            labelled.add(key)
            axis.plot(*zip(*series), linestyle=style, color=color, label=label)
    if "gain_in" in labelled:
        axis.set_yscale("symlog", linthresh=0.1)
    title = "activation parameters" + ("" if named else f" ({len(sites)} sites)")
    axis.set(title=title, xlabel="epoch", ylabel="value")
    axis.legend(fontsize="small")


def save_compare_plot(bars: Sequence[tuple[str, SeedPairedDelta]], failed: Sequence[str],
                      path: str | os.PathLike[str], *, title: str) -> Path:
    """Write ``cadrelu compare``'s answer as a PNG, atomically: one bar per ranked candidate,
    its mean top-1 change against the ReLU control (the zero line) with its 95% interval as
    whiskers, best first; ``failed`` candidates are named under the axis. Returns the path."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise UsageError("the comparison plot needs matplotlib: pip install 'cadrelu[plot]'"
                         ) from error

    names = [name for name, _ in bars]
    deltas = [delta.delta for _, delta in bars]
    whiskers = [[delta.delta - delta.ci_low for _, delta in bars],
                [delta.ci_high - delta.delta for _, delta in bars]]
    figure = Figure(figsize=(max(5.0, 1.2 * len(bars) + 2), 3.8), layout="constrained")
    axis = figure.subplots()
    colors = ["C2" if delta.ci_low > 0 else "C3" if delta.ci_high < 0 else "C0"
              for _, delta in bars]
    axis.bar(names, deltas, yerr=whiskers, capsize=6, color=colors)
    axis.axhline(0.0, color="black", linewidth=0.8)
    seeds = bars[0][1].seeds if bars else 0
    axis.set(title=title, ylabel="Δ top-1 vs ReLU control (pp)",
             xlabel=f"95% CI paired over samples and {seeds} seed(s)"
             + (f"; failed: {', '.join(failed)}" if failed else ""))
    with atomic_output(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    return Path(path)
