"""Where results go: local files in the run dir (always) and experiment trackers (by config).

Every file is written atomically (a temporary file in the same folder, fsync, rename), so a
reader or a crash never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from swa_research.fileio import atomic_write_text

log = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "epoch", "iteration", "lr", "train_loss", "train_acc",
    "sgd_val_loss", "sgd_val_acc", "sgd_test_loss", "sgd_test_acc",
    "swa_val_loss", "swa_val_acc", "swa_test_loss", "swa_test_acc", "swa_n_averaged",
]


def _clean(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunLogger(Protocol):
    def log_step(self, iteration: int, values: dict[str, float]) -> None: ...
    def log_eval(self, row: dict[str, Any]) -> None: ...
    def finish(self, metrics: dict[str, Any]) -> None: ...


class LocalFiles:
    """history.csv (one row per evaluation) and metrics.json in the run dir."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []

    def log_step(self, iteration: int, values: dict[str, float]) -> None:
        pass  # per-step values are for live dashboards; the files keep one row per evaluation

    def log_eval(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write_history()

    def write_history(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else repr_number(row[k]))
                             for k in HISTORY_COLUMNS})
        atomic_write_text(self.run_dir / "history.csv", buf.getvalue())

    def finish(self, metrics: dict[str, Any]) -> None:
        write_metrics(self.run_dir / "metrics.json", metrics)
        if self.rows:
            from swa_research.plots import plot_history

            try:
                plot_history(self.rows, self.run_dir, title=self.run_dir.name)
            except Exception as e:  # a plot is a convenience: never lose a run over it
                log.warning("could not write plots into %s: %s", self.run_dir, e)


def repr_number(v: Any) -> str:
    # repr round-trips floats exactly, so files from two runs compare bit for bit.
    return repr(v) if isinstance(v, float) else str(v)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_clean(metrics), indent=2, sort_keys=False) + "\n")


class Loggers:
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[RunLogger]) -> None:
        self.loggers = loggers

    def log_step(self, iteration: int, values: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log_step(iteration, values)

    def log_eval(self, row: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_eval(row)

    def finish(self, metrics: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.finish(metrics)
