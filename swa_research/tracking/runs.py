"""Reading run dirs back: one reader for the entry point (is there a run here already?), the
sweep summary and the report.

A run dir holds ``.hydra/`` (config.yaml, hydra.yaml, overrides.yaml: what was asked) and,
once the run has ended or failed, ``metrics.json`` (its commit point: a run whose metrics.json
says ``finished`` holds every file listed under its ``files``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swa_research.errors import UserError

log = logging.getLogger(__name__)

# The training checkpoint of a run dir, and the one before it (swa_research.training.checkpoint).
LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"

NO_METRICS = "no metrics.json"
UNREADABLE = "unreadable"


@dataclass
class RunRecord:
    run_dir: Path
    overrides: list[str] = field(default_factory=list)  # as given on the command line
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml, nested
    hydra: dict[str, Any] = field(default_factory=dict)  # .hydra/hydra.yaml's "hydra"
    metrics: dict[str, Any] | None = None
    # metrics.json's status (finished, failed, diverged, preempted, interrupted), or
    # NO_METRICS / UNREADABLE.
    status: str = NO_METRICS
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def read_metrics(run_dir: Path) -> tuple[str, dict[str, Any] | None, str | None]:
    """(status, metrics, error) from ``run_dir/metrics.json``."""
    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return NO_METRICS, None, "the job ended before writing metrics.json"
    except (OSError, ValueError) as e:
        return UNREADABLE, None, f"metrics.json: {e}"
    if not isinstance(metrics, dict):
        return UNREADABLE, None, "metrics.json: not a JSON object"
    return str(metrics.get("status", "unknown")), metrics, metrics.get("error")


def read_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    hydra_dir = run_dir / ".hydra"
    status, metrics, error = read_metrics(run_dir)
    return RunRecord(
        run_dir=run_dir,
        overrides=[str(o) for o in (_read_yaml(hydra_dir / "overrides.yaml") or [])],
        config=_read_yaml(hydra_dir / "config.yaml") or {},
        hydra=(_read_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra") or {},
        metrics=metrics, status=status, error=error)


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs at or below ``paths``: folders with metrics.json or .hydra/overrides.yaml,
    in natural order (job 2 before job 10)."""
    found: set[Path] = set()
    for top in paths:
        top = Path(top)
        if not top.is_dir():
            raise FileNotFoundError(f"{top}: no such folder")
        for dirpath, dirnames, filenames in os.walk(top):
            # W&B's folders and hidden ones (.hydra, caches) hold no runs.
            dirnames[:] = [d for d in dirnames if d != "wandb" and not d.startswith(".")]
            here = Path(dirpath)
            if "metrics.json" in filenames or (here / ".hydra" / "overrides.yaml").is_file():
                found.add(here.resolve())
    return sorted(found, key=_natural_key)


def holds_run(run_dir: Path, status: str) -> bool:
    """Whether ``run_dir`` holds a run that a new command must not overwrite unasked: a
    checkpoint, or a finished run (``status``: its :func:`read_metrics` status)."""
    if any((run_dir / n).is_file() for n in (LATEST, PREVIOUS)):
        return True
    return status == "finished"


def _kept_checkpoint(run_dir: Path) -> bool:
    """Whether the finished run asked to keep checkpoint.pt (trainer.keep_checkpoint in its
    .hydra record); True when the record cannot tell (never remove what may be wanted)."""
    try:
        record = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        return bool(record["trainer"]["keep_checkpoint"])
    except Exception:  # noqa: BLE001 - no record, another layout: keep it
        return True


def check_finished_run(run_dir: Path, status: str, metrics: dict[str, Any] | None) -> bool:
    """Never overwrite an earlier run's results (``status`` and ``metrics``: what
    :func:`read_metrics` read from ``run_dir``). A finished run whose files are all there is
    refused (UserError); True when the run finished but lacks some of them (a crash between the
    weights and metrics.json of an older version, or a file deleted since): they are completed
    from its checkpoint. False when there is no finished run."""
    if status != "finished" or metrics is None:
        return False
    # metrics.json lists the files written before it; an older metrics.json did not.
    expected = metrics.get("files", ["sgd_final.pt"])
    if all((run_dir / n).exists() for n in expected):  # a .dcp weights folder, or a file
        # A kill between metrics.json (the commit point) and the removal of the training
        # checkpoints leaves them behind for good: remove what the finished run would have
        # (its own trainer.keep_checkpoint, not the rerun's), and say so.
        leftovers = [run_dir / n for n in ((PREVIOUS,) if _kept_checkpoint(run_dir)
                                           else (PREVIOUS, LATEST))
                     if (run_dir / n).is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            log.warning("%s: removed %s, left by a run killed after it finished",
                        run_dir, " and ".join(p.name for p in leftovers))
        raise UserError(f"{run_dir} already holds a finished run ({run_dir / 'metrics.json'}); "
                        "choose another output dir with hydra.run.dir=... "
                        "(hydra.sweep.dir=... for -m)")
    return True


def is_run_dir(path: Path) -> bool:
    """A single run's dir (its metrics.json or its .hydra record), not a sweep above runs."""
    return (path / "metrics.json").is_file() or (path / ".hydra" / "config.yaml").is_file()
