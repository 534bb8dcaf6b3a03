"""Entry point: ``python -m swa_research.train [overrides]`` (``-m`` for a multirun sweep).

It stays thin: config -> objects -> Trainer. :func:`train` does the same without Hydra, from a
notebook or a test, given a composed config and a run dir.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from swa_research.averaging import Averager, AveragingPlan
from swa_research.callbacks import SWEEP
from swa_research.checkpoint import (
    LATEST,
    PREVIOUS,
    config_differences,
    find_resume_checkpoint,
)
from swa_research.config import (
    Config,
    UserError,
    iterations_per_epoch,
    register_configs,
    to_config,
    validate,
    validate_budget,
)
from swa_research.conv import set_conv_algorithm
from swa_research.data import Preprocess, build_data
from swa_research.fileio import atomic_write_text, probe_writable, remove_stale_temporaries
from swa_research.locks import GpuClaim, RunDirLock
from swa_research.loggers import (
    LocalFiles,
    Loggers,
    RunLogger,
    WandbLogger,
    run_summary,
    write_metrics,
)
from swa_research.models import build_model
from swa_research.optim import build_optimizer, build_schedule, build_scheduler
from swa_research.step import compile_in_place, memory_format, resolve_precision
from swa_research.sweep import format_summary, print_optuna_result, sweep_jobs
from swa_research.trainer import REQUEUE_EXIT_CODE, Preempted, Trainer, TrainingDiverged

log = logging.getLogger(__name__)

register_configs()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name}: no CUDA GPU is available here; "
                            "use trainer.device=cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"trainer.device={name}: only {torch.cuda.device_count()} "
                            "GPU(s) visible")
        return dev
    return torch.device(name)


def check_writable(run_dir: Path) -> None:
    try:
        probe_writable(run_dir)
    except OSError as e:
        raise UserError(f"output dir {run_dir} is not writable ({e.strerror or e}); "
                        "choose another with hydra.run.dir=... or hydra.sweep.dir=...") from e


def load_config(cfg: DictConfig | Config | dict[str, Any]) -> Config:
    """Typed, validated config; a wrong type, unknown key or missing value is a UserError."""
    try:
        config = to_config(cfg)
    except OmegaConfBaseException as e:
        raise UserError(one_line(e)) from e
    validate(config)
    return config


def train(cfg: DictConfig | Config | dict[str, Any], run_dir: str | Path,
          run_name: str | None = None, group: str | None = None,
          job_num: int = 0, write_record: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; writes the run's files into ``run_dir`` and
    returns the contents of its metrics.json. ``run_name`` and ``group`` name the run in
    experiment trackers unless ``logger.name`` / ``logger.group`` are set; ``job_num`` (the
    job's number in a sweep) is the GPU it tries first when several are visible.

    The run dir is locked for the whole run. ``write_record`` (the entry point's: Hydra's
    ``.hydra/`` files) is called once the run is accepted, or at once in a dir that holds no
    run yet: a refused command never rewrites the record of an existing run."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    previous = _stop_on_signals()
    try:
        with RunDirLock(run_dir):
            for path in remove_stale_temporaries(run_dir):
                log.info("removed %s, left by a write that was interrupted", path)
            return _train_locked(cfg, run_dir, run_name, group, job_num, write_record)
    except Preempted as e:
        # Under submitit (SLURM), its own handler requeues the job: hand the signal on to it.
        handler = previous.get(e.signum, signal.getsignal(e.signum))
        for sig, h in previous.items():
            signal.signal(sig, h)
        previous = {}
        if callable(handler):
            handler(e.signum, None)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_on_signals() -> dict[int, Any]:
    """Until the training loop takes over: SIGTERM/SIGUSR1/SIGUSR2 stop at once with the
    requeue status (there is nothing to checkpoint yet, or the checkpoint on disk is current)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: Any) -> None:
        log.warning("%s received before training started; exiting with status %d for a "
                    "requeue", signal.Signals(signum).name, REQUEUE_EXIT_CODE)
        raise Preempted(signum)

    return {sig: signal.signal(sig, stop)
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}


def _train_locked(cfg: DictConfig | Config | dict[str, Any], run_dir: Path,
                  run_name: str | None, group: str | None, job_num: int,
                  write_record: Callable[[], None] | None) -> dict[str, Any]:
    fresh = not holds_run(run_dir)
    if fresh and write_record is not None:
        write_record()  # a failure below is then recorded with the config that caused it
    try:
        config = load_config(cfg)
        complete = check_finished_run(run_dir)
        config_dict: dict[str, Any] = OmegaConf.to_container(  # type: ignore[assignment]
            OmegaConf.structured(config), resolve=True)
        tc = config.trainer
        resume = find_resume_checkpoint(run_dir, "auto" if complete else tc.resume)
        if complete and resume is None:
            raise UserError(f"{run_dir} already holds a finished run ({run_dir / 'metrics.json'})"
                            " whose files are incomplete, and no checkpoint to complete them "
                            "from; choose another output dir with hydra.run.dir=...")
        if resume is not None:
            diffs = config_differences(resume[0]["config"], config_dict)
            if diffs and not tc.resume_override:
                raise UserError(
                    f"checkpoint {resume[1]} was written with another config "
                    f"({'; '.join(diffs)}); resume anyway with trainer.resume_override=true, "
                    "or start afresh in another output dir")
        device = resolve_device(tc.device)
        resolve_precision(tc.precision, device)  # fail before loading any data
    except UserError as e:
        if fresh:
            write_failure(run_dir, str(e))
        raise
    if not fresh and write_record is not None:
        write_record()
    if complete:
        log.info("%s: the run finished but its files are incomplete; completing them from %s",
                 run_dir, resume[1])  # type: ignore[index]
    claim = None
    if tc.device == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1:
        # Jobs sharing a machine (joblib, several agents) each take a GPU of their own.
        claim = GpuClaim.acquire(torch.cuda.device_count(), preferred=job_num)
        device = torch.device("cuda", claim.index)
        log.info("using GPU %d of %d", claim.index, torch.cuda.device_count())
    own_resume = resume is not None and resume[1].parent.resolve() == run_dir.resolve()
    try:
        metrics = _train_on(config, config_dict, run_dir, device, resume, run_name, group,
                            own_resume)
        log.info("%s", run_summary(run_dir, metrics))
        return metrics
    except UserError as e:
        if fresh and not (run_dir / "metrics.json").is_file():
            write_failure(run_dir, str(e))
        raise
    finally:
        if claim is not None:
            claim.release()


def _train_on(config: Config, config_dict: dict[str, Any], run_dir: Path,
              device: torch.device, resume: tuple[dict[str, Any], Path] | None,
              run_name: str | None, group: str | None, own_resume: bool) -> dict[str, Any]:
    tc = config.trainer
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if tc.deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(tc.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not tc.deterministic
    torch.manual_seed(config.seed)

    data = build_data(config.data, config.seed, device, tc.num_workers)
    ipe = iterations_per_epoch(len(data.train), tc.batch_size, tc.drop_last)
    validate_budget(config, ipe)

    fmt = memory_format(tc.channels_last)
    model = build_model(config.model, data.num_classes, data.image_size).to(
        device, memory_format=fmt)
    set_conv_algorithm(model, tc.conv_algorithm)  # before the average copies the model
    optimizer = build_optimizer(config.optimizer, model.parameters())
    plan = AveragingPlan.from_config(config.swa, config.schedule, tc.epochs, ipe)
    schedule = build_schedule(config.schedule, config.optimizer.lr, config.swa.lr, ipe,
                              tc.epochs * ipe, plan.start_iter, plan.lr_switch_iter)
    scheduler = build_scheduler(optimizer, schedule)
    averager = None
    if plan.enabled:
        averager = Averager(model, config.swa.method, config.swa.decay, config.swa.bn_update)
    if tc.compile:
        # In place, after the average's deepcopy: the average stays an eager module (its BN
        # update and evaluation never recompile) and state dicts keep their keys.
        compile_in_place(model, tc.compile_mode)

    dc = config.data
    train_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, augment=dc.augment,
                           memory_format=fmt)
    eval_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, memory_format=fmt)
    loggers: list[RunLogger] = [LocalFiles(run_dir, title=config.logger.name or run_name)]
    if config.logger.backend == "wandb":
        loggers.append(WandbLogger(config.logger, run_dir, config_dict, run_name, group,
                                   resuming=own_resume))
    trainer = Trainer(
        model=model, optimizer=optimizer, scheduler=scheduler, plan=plan, averager=averager,
        data=data, train_pre=train_pre, eval_pre=eval_pre, cfg=tc, seed=config.seed,
        run_dir=run_dir, loggers=Loggers(loggers), config_dict=config_dict,
        log_every=config.logger.log_every, bn_batch_size=config.swa.bn_batch_size)
    if resume is not None:
        try:
            trainer.load_state(resume[0])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"checkpoint {resume[1]} does not fit this model/run "
                            f"({one_line(e)[:300]})") from e
        log.info("resuming from %s", resume[1])
    return trainer.fit()


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that a new command must not overwrite unasked: a
    checkpoint, or a finished run."""
    if any((run_dir / n).is_file() for n in (LATEST, PREVIOUS)):
        return True
    return _metrics_status(run_dir)[0] == "finished"


def _metrics_status(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None, {}
    if not isinstance(metrics, dict):
        return None, {}
    return metrics.get("status"), metrics


def check_finished_run(run_dir: Path) -> bool:
    """Never overwrite an earlier run's results. A finished run whose weight files are all
    there is refused; True when the run finished but lacks some of them (a crash between the
    weights and metrics.json of an older version, or a file deleted since): they are completed
    from its checkpoint."""
    status, metrics = _metrics_status(run_dir)
    if status != "finished":
        return False
    # metrics.json lists the files written before it; an older metrics.json did not.
    expected = metrics.get("files", ["sgd_final.pt"])
    missing = [n for n in expected if not (run_dir / n).is_file()]
    if not missing:
        raise UserError(f"{run_dir} already holds a finished run ({run_dir / 'metrics.json'}); "
                        "choose another output dir with hydra.run.dir=... "
                        "(hydra.sweep.dir=... for -m)")
    return True


def write_failure(run_dir: Path, error: str) -> None:
    """metrics.json for a run that failed before training: the record is complete (the sweep
    summary and report show why), and nothing else is touched."""
    try:
        write_metrics(run_dir / "metrics.json", {"status": "failed", "error": error})
    except OSError:
        pass


def write_hydra_record(run_dir: Path, task_cfg: DictConfig) -> None:
    """Hydra's record of a job (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``),
    written by the job once it is accepted instead of by Hydra before anything is checked
    (``hydra.output_subdir`` is null in config.yaml)."""
    hc = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(task_cfg))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hc.overrides.task))


# ---------------------------------------------------------------------------------------------
# Hydra


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    _STATE["job_started"] = True
    hc = HydraConfig.get()
    group = None
    if hc.mode == RunMode.MULTIRUN:
        # The sweep folder's name: the same for every job of the sweep, also after a requeue.
        group = Path(hc.sweep.dir).name
    try:
        run_dir = Path(hc.runtime.output_dir)
        metrics = train(cfg, run_dir, run_name=job_name(list(hc.overrides.task)),
                        group=group, job_num=int(hc.job.num) if group else 0,
                        write_record=lambda: write_hydra_record(run_dir, cfg))
    except UserError as e:
        _STATE["user_error"] = True
        if hc.mode == RunMode.RUN and not _STATE["full_error"]:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        log.error("error: %s", e)
        raise
    except TrainingDiverged as e:
        # Before Hydra's "Error executing job with overrides" line: the one line is enough.
        if hc.mode == RunMode.RUN and not _STATE["full_error"]:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
    # The value a sweeper (e.g. Optuna) optimises: the averaged model's validation accuracy,
    # or the SGD model's when there is no average.
    swa_acc = metrics["swa"]["val_acc"]
    return swa_acc if swa_acc is not None else metrics["sgd"]["val_acc"]


def job_name(overrides: list[str]) -> str | None:
    """A readable run name from the job's overrides: ``swa.lr=0.0005,seed=1``."""
    keep = [o for o in overrides
            if not o.lstrip("+~").startswith(("hydra.", "hydra/", "logger.", "logger="))]
    return ",".join(keep) or None


_STATE: dict[str, bool] = {"job_started": False, "user_error": False, "full_error": False}


def one_line(e: BaseException) -> str:
    """An exception and its causes as one line, without Hydra's boilerplate."""
    parts: list[str] = []
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, MissingMandatoryValue) and getattr(seen, "full_key", None):
            text = (f"{seen.full_key} has no value: set it on the command line "
                    f"({seen.full_key}=...)")
        elif isinstance(seen, OmegaConfBaseException):
            # OmegaConf appends full_key/object_type lines; the first line names the problem.
            key = getattr(seen, "full_key", None)
            text = text.splitlines()[0] if text else type(seen).__name__
            if key and key not in text:
                text += f" (key: {key})"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if any(ln.startswith("Config search path") for ln in lines):
            lines = lines[:[ln.startswith("Config search path") for ln in lines].index(True)]
        lines = [ln for ln in lines if not ln.startswith("Set the environment variable")]
        chunk = " ".join(lines)
        if chunk and chunk not in parts:
            parts.append(chunk)
        seen = seen.__cause__
    return ": ".join(parts) or type(e).__name__


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for anything else."""
    from hydra.errors import HydraException

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return one_line(e)
    if isinstance(e, OSError) and not _STATE["job_started"]:
        # Raised by Hydra while it creates the run/sweep dir or its log file.
        where = e.filename or "the output dir"
        return (f"cannot write {where}: {e.strerror or e}; choose another output dir with "
                "hydra.run.dir=... (hydra.sweep.dir=... for -m)")
    return None


def default_run_id() -> str:
    """Date, time and a random part; under SLURM the job id instead, so that a requeued job
    (a new process) finds its own run dir and resumes from its checkpoint."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task and os.environ.get("SLURM_ARRAY_JOB_ID")
                                 else "")
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3)


def main() -> None:
    # One id per command, shared by every job it starts (see hydra.run.dir in config.yaml).
    os.environ.setdefault("SWA_RUN_ID", default_run_id())
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _STATE["full_error"] = full_error  # the job's own errors then raise too
    # Hydra then raises instead of printing a trimmed traceback, and we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    code = 0
    try:
        hydra_main()
    except Exception as e:
        msg = user_error_message(e)
        if full_error:
            raise
        if msg is not None:
            print(f"error: {msg}", file=sys.stderr)
            code = 2
        elif isinstance(e, TrainingDiverged):
            print(f"error: {e}", file=sys.stderr)
            code = 1
        elif SWEEP["dir"] is None:
            raise
        else:
            # A failed job of a sweep (the summary below names it), or the launcher failed.
            print(f"error: {type(e).__name__}: {one_line(e)[:500]}", file=sys.stderr)
            code = 1
    finally:
        if not full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if SWEEP["dir"] is not None:
        sweep_dir = Path(SWEEP["dir"])
        jobs = sweep_jobs(sweep_dir)
        write_sweep_report(sweep_dir)
        print(format_summary(sweep_dir, jobs), file=sys.stderr)
        print_optuna_result(sweep_dir, sweep_failed=code != 0)  # the best, last
        if any(not j.ok for j in jobs):
            code = code or 1
    sys.exit(code)


def write_sweep_report(sweep_dir: Path) -> None:
    """The sweep's report (report.md, report.csv, plots), failed jobs included. Never raises:
    a multirun's outcome and exit code must not depend on its report."""
    from swa_research.report import write_report

    try:
        report = write_report(sweep_dir)
    except Exception as e:
        print(f"warning: no report for {sweep_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return
    print(f"\nSweep report ({sweep_dir / 'report.md'}):\n{report.text()}", flush=True)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: launchers that pickle the task
    # function (submitit, joblib) must find it by reference as swa_research.train.hydra_main.
    from swa_research.train import main as _main

    _main()
