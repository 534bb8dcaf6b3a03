"""PNG plots of a run: loss curves, SGD vs averaged accuracy over epochs, the learning-rate
schedule, and the reliability diagram of each model."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from swa_research.tasks import CLASSIFICATION, row_metrics

PLOT_FILES = ("loss_curves.png", "accuracy.png")



TITLE_WIDTH = 60  # characters a title line holds: a sweep job's name (its overrides) is long


def wrapped(title: str) -> str:
    """``title`` on lines of at most :data:`TITLE_WIDTH` characters (at spaces, or inside a
    long override string), so that a long run name makes the figure taller, never wider."""
    import textwrap

    return "\n".join(textwrap.wrap(title.strip(), TITLE_WIDTH)) or title.strip()

def read_history(path: str | Path) -> list[dict[str, float | None]]:
    rows: list[dict[str, float | None]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in raw.items()})
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(key) is not None:
            xs.append(float(r["epoch"]))
            ys.append(float(r[key]))
    return xs, ys


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def model_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``sgd`` and the run's averages (the history's ``<name>_n_averaged`` columns), in order."""
    names = ["sgd"]
    for r in rows[:1]:
        names += [k[:-len("_n_averaged")] for k in r if k.endswith("_n_averaged")]
    return names


def color_of(name: str, names: Sequence[str]) -> str:
    return COLORS[list(names).index(name) % len(COLORS)] if name in names else "tab:gray"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: no display needed, safe in worker processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically, then close it (also when writing fails)."""
    from swa_research.fileio import atomic_write

    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        pyplot().close(fig)
    return path


def plot_files(metrics: Sequence[str]) -> list[str]:
    """The curve files of a run with these metrics: loss_curves.png, accuracy.png
    (classification), ``<metric>.png`` for another task's metric."""
    return [PLOT_FILES[0], *(PLOT_FILES[1] if m == "acc" else f"{m}.png"
                             for m in metrics if m != "loss")]


def plot_history(rows: Sequence[dict[str, Any]], out_dir: str | Path,
                 title: str = "") -> list[Path]:
    """One plot per metric of the run's task (the rows' ``sgd_test_<m>`` columns) into
    ``out_dir``: loss_curves.png, and for classification accuracy.png; returns their paths."""
    plt = pyplot()
    out = Path(out_dir)
    written: list[Path] = []
    names = model_names(rows)
    metrics = row_metrics(rows[0] if rows else {}) or list(CLASSIFICATION.metrics)
    panels = [  # file, metric suffix, y label, scale, title
        (name, m, *(("loss", 1.0, "Loss") if m == "loss" else
                    ("accuracy (%)", 100.0, "SGD vs averaged accuracy") if m == "acc" else
                    (m, 1.0, f"SGD vs averaged {m}")))
        for name, m in zip(plot_files(metrics), ["loss", *(m for m in metrics if m != "loss")],
                           strict=True)]
    from matplotlib.ticker import MaxNLocator

    for filename, metric, ylabel, scale, heading in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if metric == "loss":
            ax.plot(*_series(rows, "train_loss"), color="gray", label="train (SGD, running)")
        for model in names:
            for split, ls in (("val", "--"), ("test", "-")):
                xs, ys = _series(rows, f"{model}_{split}_{metric}")
                if xs:
                    ax.plot(xs, [scale * y for y in ys], ls=ls, marker=".",
                            color=color_of(model, names), label=f"{model.upper()} {split}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(wrapped(f"{heading} {title}"))
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_figure(fig, out / filename))
    return written


SCHEDULE_FILE = "lr_schedule.png"


def schedule_points(lr: Callable[[int], float], total: int, max_points: int = 20_000
                    ) -> tuple[list[int], list[float]]:
    """(iterations, lr) of a schedule over ``total`` steps: every step up to ``max_points``
    steps, else evenly strided, always with the first and the last."""
    if total <= 0:
        return [], []
    stride = max(1, math.ceil(total / max_points))
    xs = list(range(0, total, stride))
    if xs[-1] != total - 1:
        xs.append(total - 1)
    return xs, [float(lr(i)) for i in xs]


def plot_schedule(lr: Callable[[int], float], total: int, iters_per_epoch: int,
                  path: str | Path, averaging_start: int | None = None, title: str = "") -> Path:
    """The learning rate of every step (``lr(i)`` for the 0-based step i) over the budget, in
    epochs below and iterations above, the averaging phase shaded."""
    plt = pyplot()
    xs, ys = schedule_points(lr, total)
    ipe = max(1, iters_per_epoch)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([x / ipe for x in xs], ys, color="tab:blue", lw=1.2, label="lr")
    if averaging_start is not None and averaging_start < total:
        ax.axvspan(averaging_start / ipe, total / ipe, color="tab:orange", alpha=0.15,
                   label="averaging")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    top = ax.secondary_xaxis("top", functions=(lambda e: e * ipe, lambda i: i / ipe))
    top.set_xlabel("iteration")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(wrapped(f"Learning rate {title}"))
    return save_figure(fig, path)


def plot_reliability(bins: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One reliability diagram per model side by side: accuracy per confidence bin against
    the diagonal (perfect calibration), and the share of samples per bin below it."""
    import torch

    plt = pyplot()
    fig, axes = plt.subplots(2, len(bins), figsize=(4.2 * len(bins), 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for col, (name, b) in enumerate(bins.items()):
        top, bottom = axes[0][col], axes[1][col]
        left = b.edges[:-1].numpy()
        width = float(b.edges[1] - b.edges[0])
        acc = torch.nan_to_num(b.accuracy, nan=0.0).numpy()
        color = color_of(name, list(bins))
        top.bar(left, acc, width=width, align="edge", color=color, alpha=0.75,
                edgecolor="black", linewidth=0.5, label="accuracy")
        top.plot([0, 1], [0, 1], ls="--", color="gray", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{name.upper()}: ECE {100 * b.ece:.2f}%")
        top.legend(loc="upper left", fontsize="small")
        share = (b.counts.double() / max(1, int(b.counts.sum()))).numpy()
        bottom.bar(left, share, width=width, align="edge", color=color, alpha=0.75)
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("share")
    if title:
        fig.suptitle(wrapped(title))
    fig.tight_layout()
    return save_figure(fig, path)
