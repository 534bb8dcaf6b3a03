"""Config -> objects -> :class:`~swa_research.training.trainer.Trainer`, and :func:`train`: one run
in a run dir, from a notebook, a test or the entry point, without Hydra.

:func:`train` guards the run dir (a lock, no overwriting of a finished run, resume from its
checkpoint), records a failure before training in metrics.json, and returns the run's metrics.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from swa_research.averaging import PRIMARY, Average
from swa_research.averaging.ema import warn_stale_ema
from swa_research.config import Config, iterations_per_epoch, to_config, validate
from swa_research.data import Preprocess
from swa_research.distributed import agree, group_of_one, world
from swa_research.errors import DataError, UserError, one_line
from swa_research.fileio import probe_writable, remove_stale_temporaries
from swa_research.locks import GpuClaim, RunDirLock
from swa_research.models import build_model, resolve_model_config
from swa_research.tasks import Task, build_task
from swa_research.tracking.loggers import (
    LocalFiles,
    Loggers,
    RunLogger,
    WandbLogger,
    run_summary,
    write_metrics,
)
from swa_research.tracking.plots import SCHEDULE_FILE, plot_schedule
from swa_research.tracking.runs import check_finished_run, holds_run, read_metrics
from swa_research.tracking.trackers import build_trackers, check_trackers
from swa_research.training.averages import (
    average_config,
    build_averages,
    check_budget,
    check_methods,
    plan_from_config,
)
from swa_research.training.checkpoint import (
    RETIRED_KEYS,
    config_differences,
    find_resume_checkpoint,
)
from swa_research.training.evaluator import check_best_by
from swa_research.training.fsdp import check_fsdp, shard_model
from swa_research.training.init_weights import load_init_weights
from swa_research.training.optim import (
    LRSchedule,
    build_optimizer,
    build_schedule,
    build_scheduler,
    check_schedule,
)
from swa_research.training.posthoc_ema import PosthocEma
from swa_research.training.preemption import stop_on_signals
from swa_research.training.snapshots import SnapshotWriter
from swa_research.training.step import compile_in_place, memory_format, resolve_precision
from swa_research.training.trainer import Trainer

log = logging.getLogger(__name__)


def resolve_device(name: str, key: str = "trainer.device=") -> torch.device:
    """The device a name asks for; ``key`` is how the user gave it (``trainer.device=`` here,
    ``--device `` on a command line), for the error messages."""
    w = world()
    if w.distributed and name != "cpu":
        # Under DDP each rank trains on the GPU of its local rank (or on the CPU).
        if name not in ("auto", "cuda"):
            raise UserError(f"{key}{name}: under DDP each rank uses the GPU of its "
                            f"local rank; use {key}auto, cuda or cpu")
        if torch.cuda.is_available():
            if w.local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {w.local_rank} has no GPU: "
                                f"{torch.cuda.device_count()} visible on this machine; start "
                                "at most that many processes per node")
            name = f"cuda:{w.local_rank}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key}{name}: no CUDA GPU is available here; "
                            f"use {key}cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{key}{name}: only {torch.cuda.device_count()} "
                            "GPU(s) visible")
        return dev
    return torch.device(name)


def check_strategy(config: Config) -> None:
    """trainer.strategy against the processes the launcher started; the global batch must
    split evenly over the ranks."""
    w = world()
    strategy = config.trainer.strategy
    if strategy == "single" and w.size > 1:
        raise UserError(f"trainer.strategy=single, but this process is {w.describe()}: use "
                        "trainer.strategy=auto or ddp, or start one process")
    if strategy == "ddp" and not w.distributed:
        raise UserError(f"trainer.strategy={strategy} needs several processes started by "
                        "torchrun or srun, and this is one: torchrun --nproc-per-node N -m "
                        "swa_research.train ... (docs/distributed.md)")
    check_fsdp(config)
    if w.size > 1 and config.trainer.batch_size % w.size:
        raise UserError(f"trainer.batch_size={config.trainer.batch_size}: the global batch "
                        f"must split evenly over the {w.size} ranks")
    if w.distributed and config.model.get("sync_bn") and not (
            config.trainer.device in ("auto", "cuda") and torch.cuda.is_available()):
        raise UserError("model.sync_bn=true needs CUDA GPUs (SyncBatchNorm does not run on "
                        "the CPU)")


def check_writable(run_dir: Path) -> None:
    try:
        probe_writable(run_dir)
    except OSError as e:
        raise UserError(f"output dir {run_dir} is not writable ({e.strerror or e}); "
                        "choose another with hydra.run.dir=... or hydra.sweep.dir=...") from e


def load_config(cfg: DictConfig | Config | dict[str, Any]) -> Config:
    """The typed, validated config: a wrong type, an unknown key, a missing value, an unknown
    model or averaging method, or a bad option of either is a UserError naming the key. The
    model's options are completed with its builder's defaults."""
    try:
        config = to_config(cfg)
    except OmegaConfBaseException as e:
        raise UserError(one_line(e)) from e
    validate(config)
    config.model = resolve_model_config(config.model)
    check_methods(config.swa)
    return config


def load_run_config(run_dir: Path) -> Config:
    """The validated config of the run in ``run_dir`` (its ``.hydra/config.yaml``); keys that
    no longer exist are dropped, so that older runs still load."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found: {run_dir} must be a run dir written by "
                        "python -m swa_research.train")
    try:  # OmegaConf's loader is yaml's safe one: a python tag is refused, never run
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} cannot be read as a run's config ({type(e).__name__}: "
                        f"{first})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} holds no config mapping")
    for key in RETIRED_KEYS:
        group, _, leaf = key.partition(".")
        (cfg.get(group) or {}).pop(leaf, None)
    return load_config(with_legacy_split(cfg))


def with_legacy_split(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run written before ``data.split_seed`` existed drew its validation split with its
    training seed: its config is read with that split seed, so that the tools rebuild the
    split it held out."""
    data = cfg.get("data")
    if isinstance(data, dict) and "split_seed" not in data and "seed" in cfg:
        data["split_seed"] = cfg["seed"]
    return cfg


def config_dict_of(config: Config) -> dict[str, Any]:
    """The plain nested dict of a typed config (what checkpoints and trackers record)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


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
    is_main = world().is_main
    with ExitStack() as stack:
        stack.enter_context(stop_on_signals())
        error: UserError | None = None
        if is_main:  # under DDP rank 0 alone writes the run dir, and holds its lock
            try:
                check_writable(run_dir)
                stack.enter_context(RunDirLock(run_dir))
            except UserError as e:
                error = e
        agree(error, "opening the run dir")
        if error is not None:
            raise error
        if is_main:
            for path in remove_stale_temporaries(run_dir):
                log.info("removed %s, left by a write that was interrupted", path)
        return _train_locked(cfg, run_dir, run_name, group, job_num,
                             write_record if is_main else None)


def _train_locked(cfg: DictConfig | Config | dict[str, Any], run_dir: Path,
                  run_name: str | None, group: str | None, job_num: int,
                  write_record: Callable[[], None] | None) -> dict[str, Any]:
    status, earlier, _ = read_metrics(run_dir)  # read once: the run dir is locked
    fresh = not holds_run(run_dir, status)
    if fresh and write_record is not None:
        write_record()  # a failure below is then recorded with the config that caused it
    try:
        config = load_config(cfg)
        complete = check_finished_run(run_dir, status, earlier)
        config_dict = config_dict_of(config)
        trainer_cfg = config.trainer
        resume = find_resume_checkpoint(run_dir, "auto" if complete else trainer_cfg.resume)
        if complete and resume is None:
            raise UserError(f"{run_dir} already holds a finished run ({run_dir / 'metrics.json'})"
                            " whose files are incomplete, and no checkpoint to complete them "
                            "from; choose another output dir with hydra.run.dir=...")
        if resume is not None:
            diffs = config_differences(resume[0]["config"], config_dict)
            if diffs and not trainer_cfg.resume_override:
                raise UserError(
                    f"checkpoint {resume[1]} was written with another config "
                    f"({'; '.join(diffs)}); resume anyway with trainer.resume_override=true, "
                    "or start afresh in another output dir")
        check_strategy(config)
        device = resolve_device(trainer_cfg.device)
        resolve_precision(trainer_cfg.precision, device)  # fail before loading any data
        check_trackers(config.logger)  # a tracker's missing package, before any data
    except UserError as e:
        if fresh and world().is_main:
            write_failure(run_dir, str(e))
        agree(e, "checking the config")
        raise
    agree(None, "checking the config")
    if not fresh and write_record is not None:
        write_record()
    if complete:
        log.info("%s: the run finished but its files are incomplete; completing them from %s",
                 run_dir, resume[1])  # type: ignore[index]
    claim = None
    if trainer_cfg.device == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1 \
            and not world().distributed:
        # Jobs sharing a machine (joblib, several agents) each take a GPU of their own.
        claim = GpuClaim.acquire(torch.cuda.device_count(), preferred=job_num)
        device = torch.device("cuda", claim.index)
        log.info("using GPU %d of %d", claim.index, torch.cuda.device_count())
    own_resume = resume is not None and resume[1].parent.resolve() == run_dir.resolve()
    try:
        with ExitStack() as alone:
            if trainer_cfg.strategy == "fsdp" and not world().distributed:
                alone.enter_context(group_of_one())  # FSDP over one rank
            return _build_and_fit(config, config_dict, run_dir, device, run_name, group,
                                  resume, own_resume)
    except UserError as e:
        if fresh and world().is_main and not (run_dir / "metrics.json").is_file():
            write_failure(run_dir, str(e))
        raise
    finally:
        if claim is not None:
            claim.release()


def _build_and_fit(config: Config, config_dict: dict[str, Any], run_dir: Path,
                   device: torch.device, run_name: str | None, group: str | None,
                   resume: tuple[dict[str, Any], Path] | None, own_resume: bool
                   ) -> dict[str, Any]:
    """The trainer built (and its checkpoint loaded) on every rank, then trained."""
    try:
        trainer = build_trainer(config, config_dict, run_dir, device, run_name, group,
                                resuming=own_resume)
        if resume is not None:
            try:
                trainer.load_state(resume[0])
            except (RuntimeError, KeyError, ValueError) as e:
                raise UserError(f"checkpoint {resume[1]} does not fit this model/run "
                                f"({one_line(e)[:300]})") from e
            log.info("resuming from %s", resume[1])
    except Exception as e:
        agree(e, "building the run")
        raise
    agree(None, "building the run")
    metrics = trainer.fit()
    if world().is_main:
        log.info("%s", run_summary(run_dir, metrics))
    return metrics


def build_trainer(config: Config, config_dict: dict[str, Any], run_dir: Path,
                  device: torch.device, run_name: str | None = None, group: str | None = None,
                  resuming: bool = False) -> Trainer:
    """Config -> data, model, optimizer, schedule, averages, loggers -> a :class:`Trainer` on
    ``device``, writing into ``run_dir``. ``config`` comes from :func:`load_config`;
    ``config_dict`` is its plain form (recorded in checkpoints and trackers)."""
    trainer_cfg = config.trainer
    prepare_device(device, trainer_cfg.deterministic)
    torch.manual_seed(config.seed)
    fmt = memory_format(trainer_cfg.channels_last)
    task = build_task(config.task.name)
    task.check(config)
    check_best_by(task, trainer_cfg.best_by)
    try:
        data = task.build_data(config, device, trainer_cfg.num_workers, fmt)
    except DataError:
        raise
    except UserError as e:
        raise DataError(str(e)) from e
    if data.val is None and trainer_cfg.best_by.startswith("val_"):
        log.warning("no validation split (data.val_fraction=%g): trainer.best_by=%s selects no "
                    "epoch, and sgd_best_val is not written", config.data.val_fraction,
                    trainer_cfg.best_by)
    iters = iterations_per_epoch(len(data.train), trainer_cfg.batch_size, trainer_cfg.drop_last)
    check_budget(config, iters)
    steps = trainer_cfg.max_steps
    total = steps or trainer_cfg.epochs * iters
    check_schedule(config.schedule, total, f"trainer.max_steps={steps}" if steps else
                   f"trainer.epochs={trainer_cfg.epochs} x {iters} an epoch")
    if steps:  # the epochs the budget takes (the last one cut short)
        trainer_cfg = dataclasses.replace(trainer_cfg, epochs=-(-steps // iters))
        log.info("trainer.max_steps=%d: %d epoch%s of %d steps (trainer.epochs is not read)",
                 steps, trainer_cfg.epochs, "" if trainer_cfg.epochs == 1 else "s", iters)
    try:  # reading model.weights (a file, or torchvision's download) fails here, not on meta
        model = build_model(config.model, task.output_size(data), data.image_size).to(
            device, memory_format=fmt)
    except ValueError as e:
        raise UserError(str(e)) from e
    if trainer_cfg.init_weights:
        load_init_weights(model, trainer_cfg.init_weights, getattr(data, "tokenizer", None))
    sharded = trainer_cfg.strategy == "fsdp"
    if sharded:  # before the optimizer and the averages: they take
        # the sharded parameters (each average sharded beside the model)
        train_model = shard_model(model, config.model.get("name"), trainer_cfg.fsdp.wrap,
                                  trainer_cfg.fsdp.reshard_after_forward, device)
    optimizer = build_optimizer(config.optimizer, model)
    plan = plan_from_config(config.swa, config.schedule, trainer_cfg.epochs, iters,
                                     steps)
    schedule = build_schedule(config.schedule, config.optimizer.lr, config.swa.lr, iters,
                              total, plan.start_iter, plan.lr_switch_iter)
    averages = build_averages(model, config.swa)
    check_task_methods(task, averages)
    for name in (n for n, a in averages.items() if a.method == "ema"):
        c = average_config(config.swa, name)
        warn_stale_ema("swa.decay" if name == PRIMARY else f"swa.also ({name}): decay",
                       c.decay, c.ema_warmup, plan.count_updates())
    if trainer_cfg.strategy != "fsdp":
        train_model = wrap_for_ddp(model, config, device)
    if world().rank > 0:
        # The weights are rank 0's; dropout on this rank's shard draws from a stream of its own.
        torch.manual_seed(config.seed * 1_000_003 + world().rank)
    if trainer_cfg.compile:
        # In place, after the averages' deepcopy: an average stays an eager module (its BN
        # update and evaluation never recompile) and state dicts keep their keys.
        compile_in_place(model, trainer_cfg.compile_mode)
    dc = config.data
    train_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, augment=dc.augment,
                           memory_format=fmt)
    eval_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, memory_format=fmt)
    loggers: list[RunLogger] = []
    if world().is_main:  # under DDP rank 0 alone writes files and logs to W&B
        loggers.append(LocalFiles(run_dir, title=config.logger.name or run_name,
                                  averages=list(averages), metrics=task.spec.metrics))
    if config.logger.backend == "wandb" and world().is_main:
        loggers.append(WandbLogger(config.logger, run_dir, config_dict, run_name, group,
                                   resuming=resuming, averages=list(averages)))
    if world().is_main:
        loggers += build_trackers(config.logger, run_dir, config_dict, list(averages),
                                  run_name)
        write_schedule_plot(schedule, run_dir, plan.start_iter, config.logger.name or run_name)
    return Trainer(
        model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, schedule),
        plan=plan, averages=averages, data=data, train_pre=train_pre, eval_pre=eval_pre,
        cfg=trainer_cfg, seed=config.seed, run_dir=run_dir, loggers=Loggers(loggers),
        config_dict=config_dict, log_every=config.logger.log_every,
        bn_batch_size=config.swa.bn_batch_size,
        snapshots=SnapshotWriter(run_dir, trainer_cfg, iters, total, sharded=sharded,
                                 main=world().is_main)
        if trainer_cfg.snapshot_every and (world().is_main or sharded) else None,
        posthoc_ema=PosthocEma(model, run_dir, trainer_cfg, iters, total,
                               main=world().is_main, sharded=sharded)
        if trainer_cfg.posthoc_ema and (world().is_main or sharded) else None,
        train_model=train_model, device=device, task=task,
        grad_clip=config.optimizer.grad_clip)


def write_schedule_plot(schedule: LRSchedule, run_dir: Path, averaging_start: int | None,
                        title: str | None) -> None:
    """lr_schedule.png: the lr of every step of the budget, before the first step (a plot is
    a convenience: a failure is a warning)."""
    try:
        plot_schedule(schedule, schedule.total_iters, schedule.iters_per_epoch,
                      run_dir / SCHEDULE_FILE, averaging_start, title or "")
    except Exception as e:
        log.warning("could not write %s into %s: %s", SCHEDULE_FILE, run_dir, e)


def check_task_methods(task: Task, averages: dict[str, Average]) -> None:
    """An average that predicts whole sets itself (SWAG's model average of class
    probabilities) needs a task that predicts class probabilities."""
    for average in averages.values():
        if type(average).collect_probs is not Average.collect_probs and not task.probabilistic:
            raise UserError(f"averaging method {average.method} (swa.method or swa.also): its "
                            "model average averages class probabilities, which task "
                            f"{task.name} does not predict; use swa, ema or another method that "
                            "averages weights")


def wrap_for_ddp(model: torch.nn.Module, config: Config, device: torch.device
                 ) -> torch.nn.Module:
    """Under DDP the module the step trains: ``model`` (with SyncBatchNorm layers when
    model.sync_bn) in DistributedDataParallel, which averages the gradients over the ranks.
    Its buffers are not broadcast from rank 0 at each step (``broadcast_buffers=False``): each
    rank keeps the BN statistics of its shard, averaged over the ranks before an evaluation.
    Alone: ``model`` itself."""
    if not world().distributed:
        if config.model.get("sync_bn"):
            log.info("model.sync_bn: one process, nothing to synchronise")
        return model
    from torch.nn.parallel import DistributedDataParallel

    if config.model.get("sync_bn"):
        # In place for a whole network: its BN layers become SyncBatchNorm with the same
        # parameters and buffers, so the averages (deep copies made before) and the optimizer
        # keep theirs, and state dicts keep their layout.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    # The keyword that keeps buffers out of the forward pass's sync: newer torch names it
    # forward_sync_buffers (and deprecates broadcast_buffers).
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params
               else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, **no_sync)


def prepare_device(device: torch.device, deterministic: bool) -> None:
    """Make ``device`` current and set the determinism switches for a run on it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def write_failure(run_dir: Path, error: str) -> None:
    """metrics.json for a run that failed before training: the record is complete (the sweep
    summary and report show why), and nothing else is touched."""
    try:
        write_metrics(run_dir / "metrics.json", {"status": "failed", "error": error})
    except OSError:
        pass
