"""The post-hoc tool's results in the run's own W&B record: ``python -m swa_research.posthoc
RUN_DIR`` resumes the W&B run that trained RUN_DIR (its id is kept in ``wandb_run_id.txt``, its
project, group and mode in the run's config) and logs there the rows as ``posthoc/table``, the
post-hoc EMA widths as ``posthoc_ema/table`` with W&B's line plot of the validation loss
against sigma_rel (``posthoc_ema/val_loss_vs_sigma_rel``: EDM2's Figure 5 kind of plot), the
plots the tool drew (``plots/posthoc``, ``plots/posthoc_ema``: the run's SGD and SWA marked) and
the best width in the summary. An offline run gets a second offline record of the same id, which
``wandb sync`` uploads into the same run. Any W&B failure is a warning: the local files are
written before and unaffected."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swa_research.analysis.runset import load_run
from swa_research.tasks import TaskMetrics
from swa_research.tracking.loggers import (
    WANDB_ID_FILE,
    first_line,
    offline_run_folder,
    start_run,
)

log = logging.getLogger(__name__)


def _table_of(wandb: Any, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Any:
    return wandb.Table(columns=list(columns), data=[[r.get(c) for c in columns] for r in rows],
                       allow_mixed_types=True)


def posthoc_logs(wandb: Any, rows: Sequence[dict[str, Any]], plots: Sequence[Path],
                 spec: TaskMetrics) -> tuple[dict[str, Any], dict[str, Any]]:
    """What is logged (tables, the line plot, the images) and what goes in the summary."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    logged: dict[str, Any] = {"posthoc/table": _table_of(wandb, rows, columns)}
    summary: dict[str, Any] = {}
    ema = sorted((r for r in rows if r["kind"] == "posthoc_ema"), key=lambda r: r["sigma_rel"])
    if ema:
        split = "val" if all(r.get("val_loss") is not None for r in ema) else "test"
        metrics = [f"{split}_{m}" for m in spec.metrics if f"{split}_{m}" in ema[0]]
        table = _table_of(wandb, ema, ["sigma_rel", "n_points", "last", *metrics])
        logged["posthoc_ema/table"] = table
        logged[f"posthoc_ema/{split}_loss_vs_sigma_rel"] = wandb.plot.line(
            table, "sigma_rel", f"{split}_loss",
            title=f"post-hoc EMA: {split} loss against sigma_rel")
        best = min(ema, key=lambda r: r[f"{split}_loss"])
        summary.update({"posthoc_ema/best_sigma_rel": best["sigma_rel"],
                        **{f"posthoc_ema/best_{m}": best[m] for m in metrics}})
    for p in plots:
        logged[f"plots/{p.stem}"] = wandb.Image(str(p))
    return logged, summary


# Set once W&B did not answer in this process: the next runs' records go offline at once
# instead of each waiting out its timeout (a sweep dir on a node without network).
_UNREACHABLE = [False]


def log_to_run(run_dir: Path, rows: Sequence[dict[str, Any]], plots: Sequence[Path],
               spec: TaskMetrics) -> str | None:
    """The rows and plots in RUN_DIR's own W&B run (resumed by its id); where they went, or
    None when the run did not log to W&B or logging failed (a warning). An online run that W&B
    does not answer within the run's ``logger.init_timeout`` gets an offline record instead
    (with its ``wandb sync`` command), as in training."""
    try:
        record = load_run(run_dir, run_dir)
        target = record.wandb
        timeout = float(record.config.get("logger.init_timeout") or 90.0)
    except Exception:  # no readable config: the run's W&B record cannot be found
        target = None
    if target is None:
        return None
    try:
        run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    except OSError:
        run_id = ""
    if not run_id:
        log.warning("W&B: %s holds no %s, so the run's W&B record is not known; the post-hoc "
                    "results are in the local files only", run_dir, WANDB_ID_FILE)
        return None
    try:
        import wandb

        mode = "offline" if target.mode == "online" and _UNREACHABLE[0] else target.mode
        run, failure = start_run(wandb, mode, timeout, project=target.project,
                                 entity=target.entity, group=target.group, id=run_id,
                                 resume="allow", dir=str(run_dir), reinit="finish_previous")
        if failure is not None:
            _UNREACHABLE[0] = True
            mode = "offline"
            log.warning("W&B: could not reach W&B (%s: %s); the post-hoc results go to an "
                        "offline record of the run: upload it with wandb sync %s",
                        type(failure).__name__, first_line(failure), offline_run_folder(run))
        with run:
            logged, summary = posthoc_logs(wandb, rows, plots, spec)
            run.log(logged)
            run.summary.update(summary)
            for p in plots:  # uploaded with the run's files
                shutil.copy2(p, Path(run.dir) / p.name)
            return run.path if mode == "online" else str(offline_run_folder(run))
    except Exception as e:
        log.warning("W&B: the post-hoc results were not logged to the run's W&B record (%s: %s);"
                    " the local files are unaffected", type(e).__name__, first_line(e))
        return None

