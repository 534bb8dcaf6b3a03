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
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from swa_research.config import LoggerConfig, flatten_dict
from swa_research.config.keys import unused_keys
from swa_research.fileio import atomic_write_text
from swa_research.tasks import CLASSIFICATION, TaskMetrics, row_metrics

log = logging.getLogger(__name__)

OFFLINE_INIT_TIMEOUT = 300.0  # seconds for wandb's local service to start, offline

def eval_keys(metrics: Sequence[str] = CLASSIFICATION.metrics) -> list[str]:
    """An evaluation's keys per model: ``val_<m>``, then ``test_<m>``, for the task's metrics."""
    return [f"{split}_{m}" for split in ("val", "test") for m in metrics]


EVAL_KEYS = tuple(eval_keys())


def history_columns(averages: Sequence[str] = ("swa",),
                    metrics: Sequence[str] = CLASSIFICATION.metrics) -> list[str]:
    """history.csv's columns: the step's, the SGD model's, then each average's by name (the
    primary's ``swa_*`` columns are there also when the run averages nothing), for the task's
    metrics (classification: loss, acc)."""
    names = ["swa", *[n for n in averages if n != "swa"]]
    keys = eval_keys(metrics)
    cols = ["epoch", "iteration", "lr", *(f"train_{m}" for m in metrics),
            *(f"sgd_{k}" for k in keys)]
    for name in names:
        cols += [*(f"{name}_{k}" for k in keys), f"{name}_n_averaged"]
    return cols


HISTORY_COLUMNS = history_columns()


def average_names(metrics: dict[str, Any]) -> list[str]:
    """The averages a metrics.json holds, primary first (older files: ``swa`` only)."""
    return list(metrics.get("averages") or ["swa"])


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


def eval_values(row: dict[str, Any], averages: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """An evaluation row under the names every tracker uses: ``epoch``, ``iteration``,
    ``epoch/lr``, ``epoch/train_loss``, ``MODEL/val_loss`` ... for ``sgd`` and each average,
    ``NAME/n_averaged``; values that are not there (no validation split) are left out."""
    data: dict[str, Any] = {"epoch": row["epoch"], "iteration": row["iteration"],
                            "epoch/lr": row["lr"]}
    metrics = row_metrics(row)
    for key in (f"train_{m}" for m in metrics):  # none at an evaluation before training
        if row.get(key) is not None:
            data[f"epoch/{key}"] = row[key]
    for name in averages:
        data[f"{name}/n_averaged"] = row.get(f"{name}_n_averaged", 0)
    for model in ("sgd", *averages):
        for key in eval_keys(metrics):
            if row.get(f"{model}_{key}") is not None:
                data[f"{model}/{key}"] = row[f"{model}_{key}"]
    for key in [k for k in row if k.endswith("_per_s")] + ["mfu"]:  # images_per_s, ...
        if row.get(key) is not None:
            data[f"epoch/{key}"] = row[key]
    return data


class LocalFiles:
    """history.csv (one row per evaluation) and metrics.json in the run dir."""

    def __init__(self, run_dir: Path, title: str | None = None,
                 averages: list[str] | tuple[str, ...] = ("swa",),
                 metrics: Sequence[str] = CLASSIFICATION.metrics) -> None:
        self.run_dir = Path(run_dir)
        self.columns = history_columns(averages, metrics)
        self.title = title or self.run_dir.name  # the plots' title: the job's overrides
        self.rows: list[dict[str, Any]] = []

    def log_step(self, iteration: int, values: dict[str, float]) -> None:
        pass  # per-step values are for live dashboards; the files keep one row per evaluation

    def log_eval(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write_history()

    def restore_history(self, rows: list[dict[str, Any]]) -> None:
        """On resume: the rows written before the checkpoint."""
        self.rows = [dict(r) for r in rows]

    def write_history(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else repr_number(row[k]))
                             for k in self.columns})
        atomic_write_text(self.run_dir / "history.csv", buf.getvalue())

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.rows:
            from swa_research.tracking.plots import plot_history

            try:
                plot_history(self.rows, self.run_dir, title=self.title)
            except Exception as e:  # a plot is a convenience: never lose a run over it
                log.warning("could not write plots into %s: %s", self.run_dir, e)
        # Last: metrics.json is the run's commit point.
        write_metrics(self.run_dir / "metrics.json", metrics)


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

    def restore_history(self, rows: list[dict[str, Any]]) -> None:
        for lg in self.loggers:
            restore = getattr(lg, "restore_history", None)
            if restore is not None:
                restore(rows)

def applicable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config W&B records: the keys that act in this run (not another data set's or
    averaging method's: ``config.keys.unused_keys``); the whole record is .hydra/config.yaml."""
    unused = set(unused_keys(config))
    return {k: v for k, v in flatten_dict(config).items() if k not in unused}


def run_summary(run_dir: Path, metrics: dict[str, Any]) -> str:
    """The line a finished run ends with: where it is, what it scored (the task's headline
    metric on the test set: accuracy for classification), how long it took."""
    spec = TaskMetrics.of_run(metrics)
    key, m = f"test_{spec.headline}", spec.headline

    def show(v: float | None) -> str:
        return spec.show(m, v)

    sgd, best = metrics["sgd"].get(key), metrics["sgd_best_val"].get(key)
    swa = metrics["swa"].get(key)
    others = [(n, (metrics.get(n) or {}).get(key)) for n in average_names(metrics)
              if n != "swa"]
    minutes, seconds = divmod(int(round(metrics["train"]["wall_time_s"])), 60)
    hours, minutes = divmod(minutes, 60)
    wall = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    text = f"finished in {wall}: test {spec.title(m)} SGD final {show(sgd)}, " \
           f"SGD best-val {show(best)}"
    if swa is not None:
        text += f", SWA {show(swa)}"
        if sgd is not None:
            text += f" (gain {spec.show_gain(m, spec.gain(sgd, swa))})"
    for name, value in others:
        if value is not None:
            text += f", {name.upper()} {show(value)}"
    bad = metrics.get("nonfinite") or {}
    if bad:
        text += "; NON-FINITE results: " + ", ".join(f"{n} ({w})" for n, w in bad.items())
    return text + f"; results in {run_dir}"


def summary_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run summary: the dashboard's table columns. ``swa_gain``: SWA minus final SGD on
    the task's headline test metric (accuracy for classification)."""
    spec = TaskMetrics.of_run(metrics)
    out: dict[str, Any] = {"status": metrics.get("status")}
    averages = average_names(metrics)
    keys = [f"{split}_{m}" for split in ("test", "val") for m in spec.metrics[::-1]]
    for model in ("sgd", "sgd_best_val", *averages):
        for key in keys:
            out[f"{model}/{key}"] = (metrics.get(model) or {}).get(key)
    for name in averages:
        out[f"{name}/n_averaged"] = (metrics.get(name) or {}).get("n_averaged")
    out["sgd_best_val/epoch"] = (metrics.get("sgd_best_val") or {}).get("epoch")
    for key in spec.metrics[::-1]:
        swa, sgd = out[f"swa/test_{key}"], out[f"sgd/test_{key}"]
        out[f"swa_gain/test_{key}"] = None if swa is None or sgd is None else swa - sgd
    # The headline's improvement (for a metric where lower is better, SGD minus SWA).
    swa, sgd = out[f"swa/test_{spec.headline}"], out[f"sgd/test_{spec.headline}"]
    out["swa_gain"] = None if swa is None or sgd is None else spec.gain(sgd, swa)
    calibration = metrics.get("calibration") or {}
    for model in ("sgd", *averages):
        for key in ("nll", "ece"):
            out[f"calibration/{model}_{key}"] = (calibration.get(model) or {}).get(key)
    for k, v in (metrics.get("train") or {}).items():
        out[f"train/{k}"] = v
    return out


def _wandb_settings() -> Any:
    """wandb's own global settings (WANDB_BASE_URL, the settings file of `wandb login --host`,
    ...), loaded without starting its service process."""
    from wandb.sdk import wandb_setup

    setup = wandb_setup.singleton()
    if setup is None:  # older wandb: singleton() does not create it
        setup = wandb_setup._setup(start_service=False)
    return setup.settings


def api_key_configured() -> bool:
    """True when wandb itself finds credentials for its server without asking: the session's
    (wandb.login), WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, the netrc entry for its host (the
    one `wandb login` writes) or the settings file. Never a prompt, never the network."""
    try:
        settings = _wandb_settings()
        try:
            from wandb.sdk.lib import wbauth
        except ImportError:  # wandb before wbauth: its older read-only lookup
            from wandb.sdk.lib import apikey

            return bool(os.environ.get("WANDB_API_KEY") or apikey.api_key(settings=settings))
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        auth = wbauth.authenticate_session(host=host, source="swa_research", prompt=False,
                                           verify=False, update_session=False)
    except Exception as e:  # a malformed key or URL: wandb.init would fail on it as well
        log.warning("W&B credentials are not usable (%s: %s); W&B runs offline",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return auth is not None


def resolve_mode(mode: str) -> str:
    """auto: WANDB_MODE if the user set it, online when wandb has credentials, else offline.
    Never a prompt: wandb.init without a key and without a mode would ask for one."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if api_key_configured() else "offline"


def offline_run_folder(run: Any) -> Path:
    """The folder `wandb sync` takes: .../wandb/offline-run-<time>-<id> (run.dir is its files/)."""
    return Path(run.dir).parent


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def start_run(wandb: Any, mode: str, timeout: float, **kwargs: Any
              ) -> tuple[Any, BaseException | None]:
    """``wandb.init(mode=mode, **kwargs)``, quiet, within ``timeout`` seconds. An online run
    that W&B does not answer in time (no network) becomes an offline run instead of losing the
    record; the failure is returned beside it for the caller's warning (None when online
    worked or was not asked for). Any other failure raises."""
    def init(mode: str, timeout: float) -> Any:
        return wandb.init(mode=mode, **kwargs, settings=wandb.Settings(
            console="off", silent=True, init_timeout=timeout))

    try:
        return init(mode, timeout), None
    except (wandb.errors.CommError, TimeoutError, ConnectionError) as e:
        if mode != "online":
            raise
        # wandb's service keeps the failed attempt's stream open under the same run id
        # ("run ID ... is in use"): shut the service down, the next init starts anew.
        wandb.teardown()
        # Starting the local service offline needs no network, only a (possibly busy)
        # machine: a timeout of its own, not the online one.
        return init("offline", max(OFFLINE_INIT_TIMEOUT, timeout)), e


class WandbLogger:
    """One W&B run per job, on top of the local files. An online run that cannot reach W&B
    within logger.init_timeout becomes an offline run (one warning, with its `wandb sync`
    command). Any other W&B failure (bad settings, service error) prints one warning and turns
    W&B off for the run: training goes on and the local files are never affected."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any],
                 name: str | None = None, group: str | None = None,
                 resuming: bool = False, averages: list[str] | tuple[str, ...] = ("swa",)
                 ) -> None:
        self.run: Any = None
        self.run_dir = Path(run_dir)
        self.averages = ["swa", *[n for n in averages if n != "swa"]]
        self._warned = False
        try:
            import wandb

            # A fresh id for every new run, kept in the run dir: a resumed run (a requeued job)
            # continues its own W&B run, and a new run in a reused dir never joins the old
            # one. Under a W&B agent the agent chooses the id.
            run_id = None if os.environ.get("WANDB_SWEEP_ID") else run_id_for(self.run_dir,
                                                                              resuming)
            kwargs = dict(
                project=cfg.project, entity=cfg.entity, group=cfg.group or group,
                name=cfg.name or name, tags=list(cfg.tags) or None,
                config=applicable_config(config),
                dir=str(self.run_dir), id=run_id, resume="allow" if run_id else None,
                reinit="finish_previous")
            mode = resolve_mode(cfg.mode)
            no_key = mode == "online" and not api_key_configured()
            if no_key:  # offline keeps the record, and `wandb sync` uploads it after a login
                mode = "offline"
            self.run, failure = start_run(wandb, mode, cfg.init_timeout, **kwargs)
            if failure is not None:  # any other failure turns W&B off below
                log.warning("W&B: could not start an online run (%s: %s); logging to an "
                            "offline run instead. Upload it later with: wandb sync %s",
                            type(failure).__name__, first_line(failure),
                            offline_run_folder(self.run))
            elif no_key:
                log.warning("W&B: logger.mode=online, but no W&B API key is configured "
                            "(wandb login, or WANDB_API_KEY); logging to an offline run. "
                            "Upload it after a login with: wandb sync %s",
                            offline_run_folder(self.run))
            else:
                self._say_mode()
            if run_id is None:  # a W&B agent's: kept for the post-hoc tool and dashboards
                atomic_write_text(self.run_dir / WANDB_ID_FILE, f"{self.run.id}\n")
            self.run.define_metric("iteration")
            self.run.define_metric("train/*", step_metric="iteration")
            self.run.define_metric("lr", step_metric="iteration")
            self.run.define_metric("epoch")
            for prefix in ("sgd/*", *(f"{n}/*" for n in self.averages), "epoch/*"):
                self.run.define_metric(prefix, step_metric="epoch")
        except Exception as e:
            self._disable(e)

    def _say_mode(self) -> None:
        """One line in the terminal: where this run's W&B record goes."""
        run = self.run
        mode = run.settings.mode
        if getattr(run, "disabled", mode == "disabled"):
            log.info("W&B: disabled (logger.mode or WANDB_MODE); only the local files are "
                     "written")
        elif getattr(run, "offline", mode in ("offline", "dryrun")):
            log.info("W&B: offline run in %s; upload it later with: wandb sync %s",
                     offline_run_folder(run), offline_run_folder(run))
        else:
            log.info("W&B: online run %s", run.url)

    def _disable(self, e: BaseException) -> None:
        if not self._warned:
            first = str(e).splitlines()[0] if str(e) else ""
            log.warning("W&B logging is off for this run (%s: %s); the local files are "
                        "unaffected", type(e).__name__, first)
            self._warned = True
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def _log(self, data: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data)
        except Exception as e:
            self._disable(e)

    def log_step(self, iteration: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self._log({"iteration": iteration, **{k: float(v) for k, v in values.items()}})

    def log_eval(self, row: dict[str, Any]) -> None:
        self._log(eval_values(row, self.averages))

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        files = [self.run_dir / n for n in ("metrics.json", "history.csv")]
        files += sorted(self.run_dir.glob("*.png"))
        files = [p for p in files if p.is_file()]
        try:
            import wandb

            images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"}
            if images:
                self.run.log(images)
            self.run.summary.update(summary_values(metrics))
            # Files in the run's own folder are uploaded when it finishes (or is synced).
            for p in files:
                shutil.copy2(p, Path(self.run.dir) / p.name)
            # A failed or diverged job shows as failed in the dashboard.
            self.run.finish(exit_code=0 if metrics.get("status") == "finished" else 1)
            self.run = None
        except Exception as e:
            self._disable(e)


WANDB_ID_FILE = "wandb_run_id.txt"


def run_id_for(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of the run in ``run_dir``: the one kept there when this run resumes,
    else a new one (then kept there)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if resuming:
        try:
            kept = path.read_text().strip()
        except OSError:
            kept = ""
        if kept:
            return kept
    run_id = secrets.token_hex(8)
    atomic_write_text(path, run_id + "\n")
    return run_id
