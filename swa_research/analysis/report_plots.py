"""The sweep report's plots: the SWA gain per configuration with its interval, and the test
headline metric (accuracy for classification) over epochs, mean over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from matplotlib.ticker import MaxNLocator

from swa_research.analysis.runset import Run
from swa_research.tasks import TaskMetrics
from swa_research.tracking.plots import pyplot, read_history, save_figure


class Report(Protocol):
    """What the plots read of a sweep report (:class:`swa_research.analysis.report.Report`)."""

    root: Path
    rows: Any  # its ConfigRows: label, runs, gain
    spec: TaskMetrics

    def further_columns(self) -> list[tuple[str, tuple[str, ...], str]]: ...


def plot_gain(report: Report, path: Path) -> Path:
    """SWA gain per configuration: mean with its 95% interval, and each run's gain."""
    plt = pyplot()
    rows, spec = report.rows, report.spec
    scale, unit = spec.gain_scale()
    key = f"test_{spec.headline}"
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.55 * len(rows)))
    for i, row in enumerate(rows):
        gains = [scale * spec.gain(g, s) for r in row.runs
                 if (g := r.metric(("sgd", key))) is not None
                 and (s := r.metric(("swa", key))) is not None]
        ax.scatter(gains, [i] * len(gains), s=14, color="gray", alpha=0.7, zorder=2,
                   label="run" if i == 0 else None)
        g = row.gain
        if g.mean is None:
            continue
        xerr = None
        if g.low is not None and g.high is not None:
            xerr = [[scale * (g.mean - g.low)], [scale * (g.high - g.mean)]]
        ax.errorbar([scale * g.mean], [i], xerr=xerr, fmt="o", color="tab:orange", capsize=4,
                    zorder=3, label="mean, 95% CI" if i == 0 else None)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"SWA gain: {spec.gain_text()}")
    ax.set_title(f"SWA gain per configuration ({report.root.name})")
    ax.grid(alpha=0.3, axis="x")
    if rows:
        ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path)


def _mean_curve(runs: Sequence[Run], key: str) -> tuple[list[float], list[float], list[float]]:
    by_epoch: dict[float, list[float]] = {}
    for run in runs:
        try:
            rows = read_history(run.path / "history.csv")
        except (OSError, ValueError):
            continue
        for r in rows:
            if r.get("epoch") is not None and r.get(key) is not None:
                by_epoch.setdefault(float(r["epoch"]), []).append(float(r[key]))  # type: ignore
    epochs = sorted(by_epoch)
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    spread = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, spread


def accuracy_band(means: Sequence[float], spread: Sequence[float]
                  ) -> tuple[list[float], list[float]]:
    """Mean ± one std of accuracies in percent, clipped to [0, 100] where an accuracy lies."""
    return ([max(0.0, a - b) for a, b in zip(means, spread, strict=True)],
            [min(100.0, a + b) for a, b in zip(means, spread, strict=True)])


def plot_accuracy(report: Report, path: Path) -> Path:
    """Test accuracy over epochs, SGD vs each average, mean over seeds (band: ± one std,
    within [0, 100]), one panel per configuration."""
    from swa_research.tracking.plots import color_of

    spec, h = report.spec, report.spec.headline
    scale = 100.0 if h in spec.percent else 1.0
    suffix = f"_test_{h}"
    names = ["sgd", "swa", *(c[:-len(suffix)] for c, _, _ in report.further_columns()
                            if c.endswith(suffix))]
    plt = pyplot()
    rows = report.rows
    ncols = min(3, max(1, len(rows)))
    nrows = math.ceil(max(1, len(rows)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.4 * nrows), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, rows, strict=False):
        for model in names:
            epochs, means, spread = _mean_curve(row.runs, f"{model}{suffix}")
            if not epochs:
                continue
            m = [scale * v for v in means]
            color = color_of(model, names)
            ax.plot(epochs, m, marker=".", color=color, label=f"{model.upper()} test")
            band = accuracy_band(m, [scale * v for v in spread]) if h in spec.percent else \
                ([a - b for a, b in zip(m, spread, strict=True)],
                 [a + b for a, b in zip(m, spread, strict=True)])
            ax.fill_between(epochs, *band, color=color, alpha=0.2)
        ax.set_title(f"{row.label} (n={len(row.runs)})", fontsize="small")
        if not row.runs:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"test {spec.title(h)}" + (" (%)" if h in spec.percent else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"Test {spec.title(h)}, mean over seeds ({report.root.name})")
    fig.tight_layout()
    return save_figure(fig, path)
