"""Hydra callbacks. They run in the process that launched the sweep, whichever launcher runs
the jobs."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# The sweep dir of the multirun this process started (read by swa_research.train.main).
SWEEP: dict[str, Any] = {"dir": None}


class RecordSweepDir(Callback):
    """Remembers the sweep dir, so that the entry point can summarise the sweep at its end,
    also when a job failed (Hydra skips on_multirun_end then)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SWEEP["dir"] = str(config.hydra.sweep.dir)
