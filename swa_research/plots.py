"""PNG plots of a run: loss curves, and SGD vs averaged accuracy over epochs."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

PLOT_FILES = ("loss_curves.png", "accuracy.png")


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


def plot_history(rows: Sequence[dict[str, Any]], out_dir: str | Path,
                 title: str = "") -> list[Path]:
    """Writes loss_curves.png and accuracy.png into ``out_dir``; returns their paths."""
    plt = pyplot()
    out = Path(out_dir)
    written: list[Path] = []
    colors = {"sgd": "tab:blue", "swa": "tab:orange"}
    panels = (  # file, metric suffix, y label, scale, title
        (PLOT_FILES[0], "loss", "cross-entropy loss", 1.0, "Loss"),
        (PLOT_FILES[1], "acc", "accuracy (%)", 100.0, "SGD vs averaged accuracy"),
    )
    for filename, metric, ylabel, scale, heading in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if metric == "loss":
            ax.plot(*_series(rows, "train_loss"), color="gray", label="train (SGD, running)")
        for model in ("sgd", "swa"):
            for split, ls in (("val", "--"), ("test", "-")):
                xs, ys = _series(rows, f"{model}_{split}_{metric}")
                if xs:
                    ax.plot(xs, [scale * y for y in ys], ls=ls, marker=".",
                            color=colors[model], label=f"{model.upper()} {split}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{heading} {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_figure(fig, out / filename))
    return written
