"""Experiment trackers besides W&B, behind the trainer's one logger interface (``log_step``,
``log_eval``, ``finish``; :class:`swa_research.tracking.loggers.RunLogger`): TensorBoard
(``logger=tensorboard``, event files in RUN_DIR/tensorboard), CSV (``logger=csv``: every logged
value, per step and per evaluation, in RUN_DIR/csv/metrics.csv) and MLflow (``logger=mlflow``,
optional extra ``[mlflow]``). Several at once: ``logger=[wandb,tensorboard,csv]``.

Every tracker logs the same names as W&B (``train/loss``, ``lr``, ``sgd/val_loss``,
``swa/test_acc``, ``epoch/train_loss``, ...; :func:`swa_research.tracking.loggers.eval_values`)
against the iteration, and at the end the run's summary (``summary_values``: final SGD, best-val SGD
and every average). A tracker that fails while logging warns once and stops; the run goes on.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swa_research.config import LoggerConfig, UserError, flatten_dict
from swa_research.fileio import atomic_write_text
from swa_research.tracking.loggers import applicable_config, eval_values, summary_values

log = logging.getLogger(__name__)

__all__ = ["CSVLogger", "MLflowLogger", "TensorBoardLogger", "check_trackers",
           "build_trackers"]


def check_trackers(cfg: LoggerConfig) -> None:
    """The packages the chosen trackers need, before anything trains (a one-line error)."""
    for flag, module, extra in (("tensorboard", "tensorboard", "tensorboard"),
                                ("mlflow", "mlflow", "mlflow")):
        if getattr(cfg, flag) and importlib.util.find_spec(module) is None:
            raise UserError(f"logger={flag} needs the {module} package: pip install "
                            f"\"swa_research[{extra}]\"")


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


class _Tracker:
    """A tracker that warns once and stops when its backend fails: never a lost run. The
    subclasses write with ``_record(kind, values, step)`` (kind: step, eval or summary)."""

    name = "tracker"
    broken = False
    averages: list[str]
    last_iteration = 0

    def _record(self, kind: str, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_step(self, iteration: int, values: dict[str, float]) -> None:
        self.last_iteration = iteration
        self._guard("logging", self._record, "step", _numbers(values), iteration)

    def log_eval(self, row: dict[str, Any]) -> None:
        data = eval_values(row, self.averages)
        step = int(data.pop("iteration"))
        self.last_iteration = max(self.last_iteration, step)
        self._guard("logging", self._record, "eval", _numbers(data), step)

    def _guard(self, action: str, fn: Any, *args: Any) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker must not end the run
            self.broken = True
            log.warning("%s: %s failed (%s: %s); %s logging is off for this run", self.name,
                        action, type(e).__name__, e, self.name)


class TensorBoardLogger(_Tracker):
    """Scalars against the iteration in RUN_DIR/tensorboard; the config as text; the summary
    as ``summary/...`` scalars at the last iteration."""

    name = "TensorBoard"

    def __init__(self, run_dir: Path, config: dict[str, Any], averages: list[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.averages = list(averages)
        self.last_iteration = 0
        table = "\n".join(f"    {k}: {v}" for k, v in applicable_config(config).items())
        self._guard("writing the config", self.writer.add_text, "config", table, 0)

    def _record(self, kind: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, metrics: dict[str, Any]) -> None:
        summary = {f"summary/{k}": v for k, v in _numbers(summary_values(metrics)).items()}
        self._guard("writing the summary", self._record, "summary", summary,
                    self.last_iteration)
        self.writer.close()


class CSVLogger(_Tracker):
    """RUN_DIR/csv/metrics.csv: one row per logged call (``kind`` step, eval or summary, the
    iteration, then a column per name; a new name rewrites the file with the wider header), as
    Lightning's CSVLogger keeps it. history.csv stays the run's table of evaluations."""

    name = "CSV"

    def __init__(self, run_dir: Path, averages: list[str]) -> None:
        self.path = Path(run_dir) / "csv" / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.averages = list(averages)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["kind", "iteration"]
        if self.path.is_file():  # a resumed run appends to what it logged before
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.columns)
                self.rows = list(reader)
        self.last_iteration = 0

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def _record(self, kind: str, values: dict[str, float], step: int) -> None:
        row = {"kind": kind, "iteration": step, **{k: repr(v) for k, v in values.items()}}
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        self.rows.append(row)
        self._write()

    def finish(self, metrics: dict[str, Any]) -> None:
        self._guard("writing the summary", self._record, "summary",
                    _numbers(summary_values(metrics)), self.last_iteration)


@contextlib.contextmanager
def bounded_http(timeout: float) -> Iterator[None]:
    """MLflow's first requests bounded by ``logger.init_timeout``: one try of at most that many
    seconds (MLflow's defaults, 120 s a request and 7 retries with backoff, held a run's start
    for minutes against an unreachable server); its defaults come back after."""
    keys = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MLflowLogger(_Tracker):
    """An MLflow run per job in experiment ``logger.project`` at ``logger.mlflow_uri`` (default:
    MLFLOW_TRACKING_URI, else MLflow's own ./mlruns): the config as parameters, the metrics
    against the iteration, the summary, status FINISHED or FAILED. Its run id is kept in
    RUN_DIR/mlflow_run_id.txt, so a resumed job continues its MLflow run."""

    name = "MLflow"

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any],
                 averages: list[str], run_name: str | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        self.averages = list(averages)
        self.last_iteration = 0
        self.client = mlflow.MlflowClient(tracking_uri=cfg.mlflow_uri)
        with bounded_http(cfg.init_timeout):  # an unreachable server: a warning, not a hang
            experiment = self.client.get_experiment_by_name(cfg.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.project))
        id_file = Path(run_dir) / "mlflow_run_id.txt"
        self.run_id = None
        if id_file.is_file():
            self.run_id = id_file.read_text().strip() or None
        if self.run_id is None:
            run = self.client.create_run(experiment_id, run_name=cfg.name or run_name,
                                         tags={"run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
            params = {k: str(v)[:500] for k, v in flatten_dict(
                {"config": applicable_config(config)}).items()}
            self._guard("logging the parameters", self._params, params)

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k.removeprefix("config."), v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _record(self, kind: str, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("/", "."), v, now, step) for k, v in values.items()
                 if math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def finish(self, metrics: dict[str, Any]) -> None:
        summary = {f"summary/{k}": v for k, v in _numbers(summary_values(metrics)).items()}
        self._guard("writing the summary", self._record, "summary", summary,
                    self.last_iteration)
        status = "FINISHED" if metrics.get("status") == "finished" else "FAILED"
        self._guard("ending the run", self.client.set_terminated, self.run_id, status)


def build_trackers(cfg: LoggerConfig, run_dir: Path, config: dict[str, Any],
                   averages: list[str], run_name: str | None = None) -> list[Any]:
    """The trackers ``cfg`` turns on (W&B is built by the caller: it has its own modes)."""
    check_trackers(cfg)
    makers: list[tuple[str, Any]] = []
    if cfg.tensorboard:
        makers.append(("TensorBoard", lambda: TensorBoardLogger(run_dir, config, averages)))
    if cfg.csv:
        makers.append(("CSV", lambda: CSVLogger(run_dir, averages)))
    if cfg.mlflow:
        makers.append(("MLflow",
                       lambda: MLflowLogger(cfg, run_dir, config, averages, run_name)))
    out: list[Any] = []
    for name, make in makers:
        try:
            out.append(make())
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start costs no run
            first = (str(e).strip().splitlines() or [""])[0][:300]
            log.warning("%s: could not start (%s: %s); %s logging is off for this run", name,
                        type(e).__name__, first, name)
    return out
