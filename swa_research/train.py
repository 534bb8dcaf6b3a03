"""The command line: ``python -m swa_research.train [overrides]`` (``-m`` for a multirun sweep).

The ``@hydra.main`` entry and nothing else: it names the run and its dir, calls
:func:`swa_research.training.build.train`, turns errors into one line and an exit status (2: a
problem with what was asked; 1: training diverged or a job failed; 75: preempted, requeue), and ends
a sweep with each job's status, the sweep report and, under Optuna, the best parameters.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from swa_research.config.keys import also_methods
from swa_research.errors import DataError, UserError, one_line
from swa_research.versions import require_torch_pair

try:  # the versions, before anything below imports torchvision: a mismatched pair is one line,
    # not 68; the import itself is checked where a run first needs it (a language model never)
    require_torch_pair(check_import=False)
except UserError as _e:
    print(f"error: {_e}", file=sys.stderr)
    sys.exit(2)

from swa_research import distributed  # noqa: E402
from swa_research.conf import register_configs  # noqa: E402
from swa_research.fileio import atomic_write_text  # noqa: E402
from swa_research.tasks import TaskMetrics  # noqa: E402
from swa_research.tracking.callbacks import SWEEP  # noqa: E402
from swa_research.tracking.sweep import format_summary, print_optuna_result, sweep_jobs  # noqa: E402
from swa_research.training.build import train  # noqa: E402
from swa_research.training.trainer import TrainingDiverged  # noqa: E402

log = logging.getLogger(__name__)

register_configs()


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


def check_swa_choice(choice: str, cfg: DictConfig) -> None:
    """``swa=swag`` (or swag_diag, fge) keeps its method beside the primary through the group's
    ``swa.also``; an experiment that sets ``swa.also`` replaces that list, which would drop the
    method without a word (``experiment=lm/char_cpu swa=swag``: its ``[ema]`` instead of
    ``[swag]``). A one-line UserError instead."""
    path = Path(__file__).parent / "conf" / "swa" / f"{choice}.yaml"
    if not choice or not path.is_file():
        return
    wanted = [str(m) for m in (OmegaConf.load(path).get("also") or [])]
    swa = cfg.get("swa") or {}
    kept = [str(swa.get("method")), *also_methods(swa.get("also"))]
    for method in wanted:
        if method not in kept:
            also = [*kept[1:], method]
            raise UserError(f"swa={choice} keeps {method} beside the primary average, but "
                            f"swa.also={kept[1:]} (set by the experiment or an override) "
                            f"replaced the group's list, so no {method} would be kept; add it: "
                            f"swa.also=[{','.join(also)}]")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    _STATE["job_started"] = True
    # A launcher may run the job in processes of its own (submitit's tasks): join there.
    if not distributed.setup().is_main:
        quiet_follower_logging()
    hc = HydraConfig.get()
    group = None
    if hc.mode == RunMode.MULTIRUN:
        # The sweep folder's name: the same for every job of the sweep, also after a requeue.
        group = Path(hc.sweep.dir).name
    try:
        check_swa_choice(str(hc.runtime.choices.get("swa", "")), cfg)
        run_dir = Path(hc.runtime.output_dir)
        metrics = train(cfg, run_dir, run_name=job_name(list(hc.overrides.task)),
                        group=group, job_num=int(hc.job.num) if group else 0,
                        write_record=lambda: write_hydra_record(run_dir, cfg))
    except distributed.PeerFailed as e:
        # Another rank failed: its own log says why; this one says that much.
        _STATE["user_error"] = True
        if hc.mode == RunMode.RUN and not _STATE["full_error"]:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
    except UserError as e:
        _STATE["user_error"] = True
        if hc.mode == RunMode.RUN and not _STATE["full_error"]:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, DataError) and not _STATE["full_error"]:
            # The next jobs would fail alike: stop the sweep here (the job's metrics.json says
            # why), with no report of jobs that never trained.
            print(f"error: {e}; the sweep stops at its first job with this error",
                  file=sys.stderr)
            sys.exit(2)
        log.error("error: %s", e)
        raise
    except TrainingDiverged as e:
        # Before Hydra's "Error executing job with overrides" line: the one line is enough.
        if hc.mode == RunMode.RUN and not _STATE["full_error"]:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
    # The value a sweeper (e.g. Optuna) optimises: the averaged model's validation value of the
    # task's headline metric (classification: accuracy; lm: loss), or the SGD model's when
    # there is no average.
    key = f"val_{TaskMetrics.of_run(metrics).headline}"
    value = metrics["swa"].get(key)
    return value if value is not None else metrics["sgd"].get(key)


def quiet_follower_logging() -> None:
    """Under DDP the ranks other than 0 write no log file (rank 0's is the run's) and print
    warnings and errors only, marked with their rank."""
    rank = distributed.world().rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)
            handler.setFormatter(logging.Formatter(f"[rank {rank}][%(levelname)s] %(message)s"))


def job_name(overrides: list[str]) -> str | None:
    """A readable run name from the job's overrides: ``swa.lr=0.0005,seed=1``."""
    keep = [o for o in overrides
            if not o.lstrip("+~").startswith(("hydra.", "hydra/", "logger.", "logger="))]
    return ",".join(keep) or None


_STATE: dict[str, bool] = {"job_started": False, "user_error": False, "full_error": False}


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


def job_config_text(overrides: list[str]) -> str:
    """What ``--cfg job`` prints: the run's validated config, the keys that act in it first,
    then those that do not (another data set's, another method's: :func:`unused_keys`) in a
    group of their own, commented out."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from swa_research.config.keys import unused_keys
    from swa_research.training.build import config_dict_of, load_config

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="swa_research.conf", version_base="1.3"):
            composed = compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    config = config_dict_of(load_config(composed))
    unused = unused_keys(config)
    used = OmegaConf.create(config)
    rest: dict[str, Any] = {}
    for key in unused:
        group, _, leaf = key.partition(".")
        rest[key] = used[group].pop(leaf)  # type: ignore[union-attr]
    text = OmegaConf.to_yaml(used)
    if rest:
        text += ("# Not used by this run (another data set's, schedule's, optimizer's or "
                 "averaging method's options):\n")
        text += "".join(f"#   {OmegaConf.to_yaml({k: v}).strip()}\n" for k, v in rest.items())
    return text


def cfg_job_overrides(argv: list[str]) -> list[str] | None:
    """The overrides of a plain ``--cfg job`` command (no multirun, no --package), else None:
    Hydra's own printing then applies."""
    args = list(argv)
    for flag in ("--cfg", "-c"):
        if flag in args:
            i = args.index(flag)
            if i + 1 < len(args) and args[i + 1] == "job":
                del args[i:i + 2]
                break
    else:
        return None
    args = [a for a in args if a not in ("--resolve",)]
    if any(a.startswith("-") for a in args):  # -m, --package, --info, ...: Hydra's
        return None
    return args


def main() -> None:
    overrides = cfg_job_overrides(sys.argv[1:])
    if overrides is not None:
        try:
            print(job_config_text(overrides), end="")
        except Exception as e:
            msg = user_error_message(e)
            if msg is None:
                raise
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    try:
        # Under torchrun or srun: join the other ranks of this run (docs/distributed.md).
        world = distributed.setup()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # One id per command, shared by every job it starts (see hydra.run.dir in config.yaml),
    # and under DDP by every rank: rank 0's.
    os.environ["SWA_RUN_ID"] = distributed.broadcast_str(
        os.environ.get("SWA_RUN_ID") or default_run_id())
    if not world.is_main:
        sys.argv.append("hydra/hydra_logging=disabled")  # Hydra's own lines: rank 0's
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _STATE["full_error"] = full_error  # the job's own errors then raise too
    # Hydra then raises instead of printing a trimmed traceback, and we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    code = 0
    try:
        hydra_main()
    except KeyboardInterrupt as e:
        if full_error:
            raise
        # One line, and the shell's code for Ctrl-C; the run's checkpoint and record stay.
        print(f"{e or 'interrupted'}", file=sys.stderr, flush=True)
        distributed.teardown()
        sys.exit(130)
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
        distributed.teardown()
    if SWEEP["dir"] is not None and world.is_main:
        sweep_dir = Path(SWEEP["dir"])
        jobs = sweep_jobs(sweep_dir)
        if any(j.ok for j in jobs):
            write_sweep_report(sweep_dir)
        else:  # a report of dashes and an empty gain plot would say nothing
            print(f"no sweep report: no job of {sweep_dir} finished", file=sys.stderr)
        from swa_research.analysis.dashboard import end_of_sweep

        end_of_sweep(sweep_dir)  # with logger=wandb logger.dashboard=true; never raises
        print(format_summary(sweep_dir, jobs), file=sys.stderr)
        print_optuna_result(sweep_dir, sweep_failed=code != 0)  # the best, last
        if any(not j.ok for j in jobs):
            code = code or 1
    sys.exit(code)


def write_sweep_report(sweep_dir: Path) -> None:
    """The sweep's report (report.md, report.csv, plots), failed jobs included. Never raises:
    a multirun's outcome and exit code must not depend on its report."""
    from swa_research.analysis.report import write_report

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
