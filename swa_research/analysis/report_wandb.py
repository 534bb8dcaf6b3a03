"""The sweep report in W&B: its table, the paper table and the plots in a run of job_type
"report", beside the runs it summarises."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from swa_research.analysis.paper import CSV_HEADER, comparison_csv_row


class Report(Protocol):
    """What W&B is given of a sweep report (:class:`swa_research.analysis.report.Report`)."""

    root: Path
    keys: list[str]
    runs: Any
    paper: Any
    files: list[Path]

    @property
    def failed(self) -> list[Any]: ...

    def csv_rows(self) -> tuple[list[str], list[list[Any]]]: ...

log = logging.getLogger(__name__)


def ensemble_logs(wandb: Any, root: Path) -> dict[str, Any]:
    """``ensemble.csv`` (python -m swa_research.ensemble) as a W&B table and ``ensemble.png``,
    when the sweep has them."""
    import csv

    out: dict[str, Any] = {}
    try:
        with open(root / "ensemble.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError:
        return out
    if rows:
        out["report/ensemble_table"] = wandb.Table(columns=rows[0], data=rows[1:])
    if (root / "ensemble.png").is_file():
        out["report/ensemble"] = wandb.Image(str(root / "ensemble.png"))
    return out


def log_ensemble(targets: list[Any], root: Path) -> str | None:
    """The ensembles and soups of a sweep in a W&B run of job_type "ensemble" beside its runs
    (the first run's project, group and mode); None when the runs had no W&B or it failed (a
    warning: the local files are unaffected)."""
    if not targets:
        return None
    target = targets[0]
    try:
        import wandb

        with wandb.init(project=target.project, entity=target.entity, group=target.group,
                        job_type="ensemble", name=f"ensemble {root.name}", dir=str(root),
                        mode=target.mode, reinit="finish_previous",
                        config={"ensemble.path": str(root)},
                        settings=wandb.Settings(console="off", silent=True,
                                                init_timeout=90)) as run:
            run.log(ensemble_logs(wandb, root))
            return run.path if target.mode == "online" else str(Path(run.dir).parent)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        log.warning("the ensembles were not logged to W&B (%s: %s); the local files are "
                    "unaffected", type(e).__name__, first)
        return None


def log_to_wandb(report: Report, out: Path) -> str | None:
    """The table and the plots in a W&B run of job_type "report", in the project, group and
    mode the runs used; returns the run's path, or None when the runs had no W&B or it
    failed (a warning: the local files are unaffected)."""
    targets = [r.wandb for r in report.runs if r.wandb is not None]
    if not targets:
        return None
    target = targets[0]
    try:
        import shutil

        import wandb

        columns, data = report.csv_rows()
        with wandb.init(project=target.project, entity=target.entity, group=target.group,
                        job_type="report", name=f"report {out.name}", dir=str(out),
                        mode=target.mode, reinit="finish_previous",
                        config={"report.path": str(report.root),
                                "report.keys": report.keys, "report.n_runs": len(report.runs),
                                "report.n_failed": len(report.failed)},
                        settings=wandb.Settings(console="off", silent=True,
                                                init_timeout=90)) as run:
            logged: dict[str, Any] = {"report/table": wandb.Table(columns=columns, data=data)}
            if report.paper:
                logged["report/paper_table"] = wandb.Table(
                    columns=CSV_HEADER, data=[comparison_csv_row(c) for c in report.paper])
            logged.update(ensemble_logs(wandb, report.root))
            for p in report.files:
                if p.suffix == ".png" and p.is_file():
                    logged[f"report/{p.stem}"] = wandb.Image(str(p))
            run.log(logged)
            for p in report.files:
                if p.is_file():
                    shutil.copy2(p, Path(run.dir) / p.name)
            where = run.path if target.mode == "online" else str(Path(run.dir).parent)
        return where
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        log.warning("the report was not logged to W&B (%s: %s); the local files are "
                    "unaffected", type(e).__name__, first)
        return None
