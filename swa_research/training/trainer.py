"""The training loop: step -> average -> evaluate SGD and each average -> log -> checkpoint.

The loop only. What it learns is the task's (:mod:`swa_research.tasks`); the step, the
evaluations, checkpoints and rank coordination (a no-op in one process) are the modules beside
this one; :mod:`~swa_research.training.build` makes a Trainer from a config.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.averaging import Average, AveragingPlan
from swa_research.averaging.sharded import is_sharded
from swa_research.config import TrainerConfig, UserError
from swa_research.data import DataSplits, Preprocess
from swa_research.fileio import describe_write_error
from swa_research.tasks import Task, build_task
from swa_research.tracking.loggers import Loggers
from swa_research.tracking.outputs import save_weights, vocabulary_record
from swa_research.tracking.progress import eval_line
from swa_research.training import loop
from swa_research.training.checkpoint import remove_finished_checkpoints
from swa_research.training.evaluator import Evaluator
from swa_research.training.optim import averaged_iterate, is_schedule_free
from swa_research.training.posthoc_ema import PosthocEma
from swa_research.training.preemption import (
    WRITING_RESULTS,
    Interrupted,
    SignalFlag,
    TrainingDiverged,
    outcome,
    set_phase,
)
from swa_research.training.ranks import Ranks
from swa_research.training.results import log_start, run_mfu, run_results
from swa_research.training.snapshots import SnapshotWriter
from swa_research.training.speed import model_flops, peak_tflops
from swa_research.training.state import load_trainer_state, preempt, write_checkpoint
from swa_research.training.step import TrainStep, autocast, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: AveragingPlan
    averages: dict[str, Average]  # by output name; the primary is "swa"
    data: DataSplits
    train_pre: Preprocess
    eval_pre: Preprocess
    cfg: TrainerConfig
    seed: int
    run_dir: Path
    loggers: Loggers
    config_dict: dict[str, Any] = field(default_factory=dict)
    log_every: int = 50
    bn_batch_size: int | None = None  # the average's BN pass; None: cfg.batch_size
    snapshots: SnapshotWriter | None = None  # trainer.snapshot_every: the trajectory
    posthoc_ema: PosthocEma | None = None  # trainer.posthoc_ema: EDM2's saved profiles
    # What the step runs: the model or its DDP wrapper (the rest uses ``model`` itself).
    train_model: nn.Module | None = None
    device: torch.device | None = None  # None: the in-memory training set's device
    task: Task = field(default_factory=lambda: build_task("classification"))
    grad_clip: float = 0.0  # optimizer.grad_clip

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = self.data.train.images.device
        self.ranks = Ranks(self.device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.iteration, self.start_epoch = 0, 1
        self.train_time, self.images_seen = 0.0, 0
        self.wall_before = 0.0  # wall time of earlier processes of this run (resume)
        self.history: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None  # a mid-epoch position to resume from
        self.window = loop.Window()  # the steps since the last evaluation by steps
        self.paused = self.run_start = 0.0  # the epoch's time not training; fit's start
        self.loader_wait: float | None = None  # a streamed set's wait share of the last epoch
        self.signals = SignalFlag()
        self.calibration: dict[str, Any] | None = None
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.eval_precision = resolve_precision(self.cfg.eval_precision, self.device)
        self.last_lr = self.current_lr()  # the lr the latest step used
        self.step = TrainStep(self.train_model or self.model, self.optimizer, self.precision,
                              self.device, loss=self.task.loss, accumulate=self.cfg.grad_accum,
                              grad_clip=self.grad_clip)
        self.evaluator = Evaluator(self.task, self.data, self.eval_pre, self.cfg, self.seed,
                                   self.averages, self.device, self.bn_batches)
        if is_schedule_free(self.optimizer):
            self.optimizer.train()  # type: ignore[attr-defined]  # a checkpoint's state keeps it
        self.model_info = {"name": (self.config_dict.get("model") or {}).get("name"),
                           "parameters": sum(p.numel() for p in self.model.parameters()),
                           "flops_per_unit": model_flops(self.model)}
        self.peak_tflops = peak_tflops(self.device, self.cfg.peak_tflops)

    # -- one epoch ------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float | None]:
        """One epoch (or the rest of one, resuming; or its first steps when a budget in steps
        ends inside it); the task's metrics of its batches (:mod:`.loop`)."""
        return loop.train_epoch(self, epoch)

    @property
    def signalled(self) -> bool:
        return self.signals.signum is not None

    def _update_averages(self) -> None:
        with self.iterate():
            for average in self.averages.values():
                average.update(self.model)

    def _posthoc_ema_step(self) -> None:
        assert self.posthoc_ema is not None
        with self.iterate():
            self.posthoc_ema.after_step(self.model, self.iteration)

    def _snapshot(self) -> None:
        assert self.snapshots is not None
        with self.iterate():
            self.snapshots.save(self.model, self.iteration)

    def iterate(self, bn: bool = False) -> Any:
        """The SGD model as the run reports it: the model, or a schedule-free optimizer's
        averaged iterate (with BN statistics of its own when ``bn``) until the block ends."""
        return averaged_iterate(self.optimizer, self.model, self.bn_batches if bn else None)

    def _check_finite(self, loss: float | None, epoch: int) -> None:
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {loss} in epoch {epoch} (iteration {self.iteration}); "
                "lower optimizer.lr or swa.lr")

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- evaluation -----------------------------------------------------------------------
    def bn_batches(self, iteration: int | None = None) -> Any:
        """Training batches for the BN update of the average (at the training batch size, as the
        paper's code, unless swa.bn_batch_size says otherwise), with the training augmentation,
        from a generator of their own so that the training order is not disturbed."""
        return self.task.bn_batches(self.data.train, self.bn_batch_size or self.cfg.batch_size,
                                    self.seed, self.iteration if iteration is None else iteration,
                                    self.train_pre, shard=self.ranks.shard)

    def evaluate_all(self, epoch: float, train: dict[str, float | None] | None) -> dict[str, Any]:
        """The SGD model and every average evaluated: the history row. Under DDP the ranks
        first average their BN statistics and check that their weights are identical."""
        self.ranks.before_eval(self.model, self.averages, f"at iteration {self.iteration}")
        with self.iterate(bn=True), autocast(self.eval_precision, self.device):
            return self.evaluator.row(self.model, epoch, self.iteration, self.last_lr, train,
                                      self.history, final=self.iteration >= self.plan.total_iters)

    # -- the whole run --------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._log_start()
        if self.snapshots is not None:  # a plan that does not fit the disk fails here
            self.snapshots.prepare(self.model, self.iteration)
        if self.posthoc_ema is not None:
            self.posthoc_ema.prepare(self.iteration)
        start = time.perf_counter()
        status, error = "failed", None
        try:
            with self.signals:
                self.run_start = start
                loop.run_budget(self)
            set_phase(WRITING_RESULTS)
            # After the final evaluation, so that the averages are prepared (fresh BN).
            with self.iterate(bn=True), autocast(self.eval_precision, self.device):
                self.calibration = self.evaluator.calibrate(
                    self.model, self.iteration, self.run_dir, plot=self.ranks.is_main)
            status = "finished"
        except BaseException as e:
            status, error, peer = outcome(e, self.iteration, self.cfg.checkpoint_every > 0)
            if peer is not None:
                raise peer from (None if isinstance(peer, Interrupted) else e)
            raise
        finally:
            self.data.close()  # a streamed set's worker processes
            wall = self.wall_before + time.perf_counter() - start
            if status != "finished":
                self.loggers.finish(self.metrics(status, wall, error))
        # metrics.json is the commit point, written last: a "finished" run holds every file it
        # lists; a crash before it leaves a run that a rerun completes from its checkpoint.
        writes = self.cfg.save_checkpoints and (self.ranks.is_main or is_sharded(self.model))
        try:  # rank 0 writes; under FSDP every rank takes part in gathering the weights
            files = self.save_weights() if writes else []
        except OSError as e:
            msg = f"{describe_write_error(e, e.filename or self.run_dir)}; the run's checkpoint " \
                  "is kept: rerun the same command to complete the run"
            self.loggers.finish(self.metrics("failed", wall, msg))
            raise UserError(msg) from e
        if not self.ranks.is_main:  # rank 0 writes the run's files
            return self.metrics("finished", wall)
        metrics = self.metrics("finished", wall)
        metrics["files"] = files
        self.loggers.finish(metrics)
        remove_finished_checkpoints(self.run_dir, keep_latest=self.cfg.keep_checkpoint)
        return metrics

    def _evaluation(self, epoch: float, train: dict[str, float | None] | None,
                    per_s: float | None = None, *, t0: float) -> None:
        """Evaluate, keep the row, log it; ``per_s``: the throughput of the steps since the last
        evaluation (by steps), else the run's so far."""
        row = self.evaluate_all(epoch, train)
        self.history.append(dict(row))
        if epoch > 0:  # throughput goes to the trackers only: the files stay reproducible
            per_s = per_s or self.images_seen / max(self.train_time, 1e-9)  # images/s, tokens/s
            row[f"{self.task.spec.unit}_per_s"], row["mfu"] = per_s, run_mfu(self, per_s)
        self.loggers.log_eval(row)
        log.info("%s", eval_line(row, self.task.spec, list(self.averages), loop.epochs_of(self),
                                 time.perf_counter() - t0, self.loader_wait))

    # -- checkpoints, preemption, results -------------------------------------------------
    def save_checkpoint(self, epoch: int, partial: dict[str, Any] | None = None,
                        wall: float = 0.0) -> Path:
        return write_checkpoint(self, epoch, partial, wall)

    def load_state(self, state: dict[str, Any]) -> None:
        load_trainer_state(self, state)

    def _preempt(self, epoch: int, partial: dict[str, Any] | None, wall: float = 0.0) -> None:
        preempt(self, epoch, partial, wall)

    def metrics(self, status: str, wall: float, error: str | None = None) -> dict[str, Any]:
        return run_results(self, status, wall, error)

    def save_weights(self) -> list[str]:
        with self.iterate(bn=True):
            return save_weights(self.run_dir, self.config_dict, self.model, self.iteration,
                                self.evaluator.best_state, self.evaluator.best, self.averages,
                                vocabulary_record(self.data), write=self.ranks.is_main,
                                sharded_format=self.cfg.fsdp.final_format == "dcp")

    def _log_start(self) -> None:
        log_start(self)
