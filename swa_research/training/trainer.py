"""The training loop: step -> average -> evaluate SGD and each average -> log -> checkpoint.

The loop only: the step is :mod:`swa_research.training.step`, the averages
:mod:`swa_research.averaging`, evaluation :mod:`swa_research.training.evaluation`, progress
:mod:`swa_research.tracking.progress`, preemption :mod:`swa_research.training.preemption` and the
run's output files :mod:`swa_research.tracking.outputs`. :mod:`swa_research.training.build` makes a
Trainer from a config.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.averaging import PRIMARY, Average, AveragingPlan
from swa_research.config import TrainerConfig, UserError
from swa_research.data import DataSplits, Preprocess, bn_pass_batches, train_batches
from swa_research.distributed import (
    all_reduce_sum_,
    as_peer_failure,
    average_buffers_,
    barrier,
    check_identical,
    gather_objects,
    world,
)
from swa_research.fileio import describe_write_error
from swa_research.tracking.loggers import Loggers
from swa_research.tracking.outputs import run_metrics, save_weights
from swa_research.tracking.progress import Progress
from swa_research.training.checkpoint import (
    remove_finished_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from swa_research.training.evaluation import (
    EvalResult,
    calibrate_run,
    evaluate,
    evaluate_probs,
    logits_from_probs,
)
from swa_research.training.preemption import (
    REQUEUE_EXIT_CODE,
    WRITING_RESULTS,
    Preempted,
    SignalFlag,
    set_phase,
)
from swa_research.training.snapshots import SnapshotWriter
from swa_research.training.step import TrainStep, autocast, resolve_precision

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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
    # What the step runs: the model, or under DDP its DistributedDataParallel wrapper (the
    # averages, evaluation, checkpoints and saved weights use ``model`` itself).
    train_model: nn.Module | None = None
    device: torch.device | None = None  # None: the in-memory training set's device

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = self.data.train.images.device
        self.loader_wait: float | None = None  # a streamed set's wait share of the last epoch
        self.world = world()
        # Under DDP: this rank's slice of every global batch.
        self.shard = (self.world.rank, self.world.size) if self.world.distributed else None
        self.iters_per_epoch = self.plan.iters_per_epoch
        self.generator = torch.Generator().manual_seed(self.seed)
        self.iteration = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best: dict[str, Any] | None = None
        self.last_sgd: dict[str, Any] = {}
        # The latest evaluation of each average, by name.
        self.last_avg: dict[str, dict[str, Any]] = {}
        # Models whose evaluation gave a non-finite loss: name -> where (first time only).
        self.nonfinite: dict[str, str] = {}
        self.train_time = 0.0
        self.images_seen = 0
        self.wall_before = 0.0  # wall time of earlier processes of this run (resume)
        self.start_epoch = 1
        self.history: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None  # a mid-epoch position to resume from
        self.signals = SignalFlag()
        self.calibration: dict[str, Any] | None = None
        # Test-set (logits, labels) of the averages that predict whole sets (SWAG), from the
        # final evaluation: calibration reuses them instead of sampling again.
        self.final_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.eval_precision = resolve_precision(self.cfg.eval_precision, self.device)
        self.last_lr = self.current_lr()  # the lr the latest step used
        self.step = TrainStep(self.train_model or self.model, self.optimizer, self.precision,
                              self.device)
        self.model_info = {"name": (self.config_dict.get("model") or {}).get("name"),
                           "parameters": sum(p.numel() for p in self.model.parameters())}

    # -- one epoch ------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        part, self.partial = self.partial, None
        if part is None:
            order = torch.randperm(len(self.data.train), generator=self.generator)
            # Each image's crop is seeded by this and its position in the epoch (both paths).
            # (tolist: a CPU read without the scalar dispatch a host-read count watches.)
            aug_seed = torch.randint(0, 2**62, (1,), generator=self.generator).tolist()[0]
            start, seen = 0, 0
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.int64)
        else:  # resuming inside this epoch
            order, start, seen = part["order"], part["batch"], part["seen"]
            aug_seed = part.get("aug_seed")  # None in an older checkpoint: drawn now
            loss_sum = part["loss_sum"].to(self.device)
            correct = part["correct"].to(self.device)
        batches = train_batches(self.data.train, self.cfg.batch_size, self.generator,
                                self.train_pre, self.cfg.drop_last, order=order, start=start,
                                shard=self.shard, aug_seed=aug_seed)
        progress = Progress(self.cfg.progress if self.world.is_main else "none",
                            self.iters_per_epoch, start, seen,
                            extra=getattr(batches, "describe", None))
        for i, (x, y) in enumerate(batches, start=start + 1):
            self.last_lr = self.current_lr()  # before the scheduler moves on to the next step's
            loss, logits = self.step(x, y)
            self.scheduler.step()
            self.iteration += 1
            # Accumulated on the device: no host sync inside the step loop.
            loss_sum.add_(loss.detach(), alpha=y.shape[0])
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if self.plan.due_after_iter(self.iteration):
                self._update_averages()
            if self.snapshots is not None and self.snapshots.due_after_iter(self.iteration):
                self.snapshots.save(self.model, self.iteration)
            stop = False
            if self.iteration % self.log_every == 0:
                # The one sync every log_every steps: the logged loss, also a divergence check;
                # under DDP the mean over the ranks, with the ranks' preemption flags.
                last, stop = self._sync_loss(loss)
                self._check_finite(last, epoch)
                self.loggers.log_step(self.iteration, {"train/loss": last,
                                                       "lr": self.last_lr})
            progress.update(epoch, self.cfg.epochs, i, loss_sum, seen)
            if stop or (self.shard is None and self.signals.signum is not None):
                progress.close()
                self._preempt(epoch, {"order": order, "batch": i, "seen": seen,
                                      "loss_sum": loss_sum, "correct": correct,
                                      "aug_seed": aug_seed})
        progress.close()
        self.loader_wait = getattr(batches, "wait_fraction", None)
        if self.shard is not None:  # the epoch's loss and accuracy over all ranks
            sums = torch.stack([loss_sum.double(), correct.double(),
                                torch.tensor(float(seen), dtype=torch.float64,
                                             device=self.device)])
            all_reduce_sum_([sums])
            loss_sum, correct, seen = sums[0], sums[1], round(sums[2].item())
        if self.plan.due_after_epoch(epoch):
            self._update_averages()
        if self.snapshots is not None and self.snapshots.due_after_epoch(epoch):
            # Before the checkpoint of this epoch: a resume from it finds the snapshot.
            self.snapshots.save(self.model, self.iteration)
        self.images_seen += seen
        train_loss = loss_sum.item() / max(1, seen)
        self._check_finite(train_loss, epoch)
        return train_loss, round(correct.item()) / max(1, seen)

    def _sync_loss(self, loss: torch.Tensor) -> tuple[float, bool]:
        """The step's loss (under DDP its mean over the ranks) and whether any rank got a
        preemption signal: one host read, and under DDP one all-reduce that the ranks make at
        the same step, so that all of them stop there."""
        if self.shard is None:
            return loss.detach().item(), False
        flag = float(self.signals.signum is not None)
        pair = torch.stack([loss.detach().double(),
                            torch.tensor(flag, dtype=torch.float64, device=self.device)])
        all_reduce_sum_([pair])
        mean, flags = pair.tolist()
        return mean / self.world.size, flags > 0

    def _stop_agreed(self) -> bool:
        """Whether this rank or any other got a preemption signal (between epochs)."""
        if self.shard is None:
            return self.signals.signum is not None
        flag = torch.tensor([float(self.signals.signum is not None)], dtype=torch.float64,
                            device=self.device)
        all_reduce_sum_([flag])
        return flag.item() > 0

    def _update_averages(self) -> None:
        for average in self.averages.values():
            average.update(self.model)

    def _check_finite(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {loss} in epoch {epoch} (iteration {self.iteration}); "
                "lower optimizer.lr or swa.lr")

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- evaluation -----------------------------------------------------------------------
    def bn_batches(self) -> Any:
        """Training batches for the BN update of the average (at the training batch size, as the
        paper's code, unless swa.bn_batch_size says otherwise), with the training augmentation,
        from a generator of their own so that the training order is not disturbed."""
        return bn_pass_batches(self.data.train, self.bn_batch_size or self.cfg.batch_size,
                               self.seed, self.iteration, self.train_pre, shard=self.shard)

    def evaluate_all(self, epoch: int, train_loss: float | None, train_acc: float | None
                     ) -> dict[str, Any]:
        with autocast(self.eval_precision, self.device):
            return self._evaluate_all(epoch, train_loss, train_acc)

    def _sync_ranks(self) -> None:
        """Under DDP, before an evaluation: the BN running statistics averaged over the ranks
        (each rank's are of its shard), then the weights and every average compared across the
        ranks by checksum: they must be identical, and an error says so if not."""
        if self.shard is None:
            return
        for module in self._networks().values():
            average_buffers_(module)
        named = {"the SGD model": list(self.model.state_dict().values())}
        for name, average in self.averages.items():
            named[f"the average {name}"] = _tensors(average.state_dict())
        check_identical(named, f"at iteration {self.iteration}")

    def _evaluate_all(self, epoch: int, train_loss: float | None, train_acc: float | None
                      ) -> dict[str, Any]:
        self._sync_ranks()
        bs = self.cfg.eval_batch_size
        val = evaluate(self.model, self.data.val, self.eval_pre, bs)
        test = evaluate(self.model, self.data.test, self.eval_pre, bs)
        row: dict[str, Any] = {
            "epoch": epoch, "iteration": self.iteration, "lr": self.last_lr,
            "train_loss": train_loss, "train_acc": train_acc,
            "sgd_val_loss": val.loss, "sgd_val_acc": val.acc,
            "sgd_test_loss": test.loss, "sgd_test_acc": test.acc,
            # The primary's columns are there also in a run without an average.
            f"{PRIMARY}_val_loss": None, f"{PRIMARY}_val_acc": None,
            f"{PRIMARY}_test_loss": None, f"{PRIMARY}_test_acc": None,
            f"{PRIMARY}_n_averaged": 0,
        }
        self.last_sgd = {"test_acc": test.acc, "test_loss": test.loss,
                         "val_acc": val.acc, "val_loss": val.loss}
        final = epoch == self.cfg.epochs
        # This evaluation's number, counted from 1 (trainer.eval_at_start's row 0 not counted).
        evaluation = sum(1 for r in self.history if r["epoch"] > 0) + 1
        for name, average in self.averages.items():
            a_val, a_test = EvalResult(), EvalResult()
            due = average.n_averaged > 0 and average.eval_due(evaluation, final)
            if due:
                probs = self._collect_probs(average, {"val": self.data.val,
                                                      "test": self.data.test})
                if probs is None:  # one network: prepared, then evaluated batch by batch
                    with self._forked_rng():
                        average.prepare_for_eval(self.bn_batches())
                    a_val = evaluate(average, self.data.val, self.eval_pre, bs)
                    a_test = evaluate(average, self.data.test, self.eval_pre, bs)
                else:
                    a_val = evaluate_probs(probs.get("val"), self.data.val)
                    a_test = evaluate_probs(probs.get("test"), self.data.test)
                    if final and "test" in probs:
                        self.final_logits[name] = (logits_from_probs(probs["test"]).cpu(),
                                                   self.data.test.labels.cpu())
            row.update({f"{name}_val_loss": a_val.loss, f"{name}_val_acc": a_val.acc,
                        f"{name}_test_loss": a_test.loss, f"{name}_test_acc": a_test.acc,
                        f"{name}_n_averaged": average.n_averaged})
            if due or average.n_averaged == 0 or name not in self.last_avg:
                # An evaluation the average skips (eval_due) keeps its latest results.
                self.last_avg[name] = {"test_acc": a_test.acc, "test_loss": a_test.loss,
                                       "val_acc": a_val.acc, "val_loss": a_val.loss,
                                       "n_averaged": average.n_averaged,
                                       **average.settings()}
        self.model.train()
        self._note_nonfinite(row, epoch)
        self._track_best(epoch)
        return row

    def _note_nonfinite(self, row: dict[str, Any], epoch: int) -> None:
        """A non-finite evaluation (an average whose weights or samples blew up) is never a
        silent row: a warning the first time per model, and metrics.json's ``nonfinite``."""
        for name in ("sgd", *self.averages):
            for key in ("val_loss", "test_loss"):
                value = row.get(f"{name}_{key}")
                if value is None or math.isfinite(value) or name in self.nonfinite:
                    continue
                self.nonfinite[name] = f"{key} {value} at epoch {epoch}"
                log.warning("NON-FINITE RESULT: %s's %s is %s at epoch %d; its results are not "
                            "numbers (metrics.json \"nonfinite\" says so)", name, key, value,
                            epoch)

    def _forked_rng(self) -> Any:
        """Preparing an average (the BN pass) runs it in train mode, so its dropout draws from
        the global RNG that training uses: fork it, so that evaluating (and
        trainer.eval_every) does not change the training run."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda)

    def _collect_probs(self, average: Average, sets: dict[str, Any]
                       ) -> dict[str, torch.Tensor] | None:
        """The average's own probabilities of whole sets (``Average.collect_probs``), or None
        for an average that is one network. Seeded by the run's seed and the iteration: the
        same evaluation gives the same result."""
        with self._forked_rng():
            return average.collect_probs(
                sets, self.eval_pre, self.cfg.eval_batch_size, self.bn_batches,
                seed=self.seed * 1_000_003 + self.iteration)

    def _calibration_input(self, name: str, average: Average) -> Any:
        """What calibration evaluates for an average: the average itself, or the test-set
        (logits, labels) of one that predicts whole sets (sampled again only where the final
        evaluation's are not at hand: a run completed from its checkpoint)."""
        if not average.n_averaged:
            return None
        if name in self.final_logits:
            return self.final_logits[name]
        probs = self._collect_probs(average, {"test": self.data.test})
        if probs is None:
            return average
        return logits_from_probs(probs["test"]).cpu(), self.data.test.labels.cpu()

    def _track_best(self, epoch: int) -> None:
        if self.last_sgd["val_loss"] is None:
            return
        if self.cfg.best_by == "val_acc":
            better = self.best is None or self.last_sgd["val_acc"] > self.best["val_acc"]
        else:
            better = self.best is None or self.last_sgd["val_loss"] < self.best["val_loss"]
        if better:
            self.best = {"epoch": epoch, **self.last_sgd}
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- the whole run --------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        epochs = self.cfg.epochs
        log.info("training %s (%s parameters) for %d epoch%s of %d iterations on %s (%d train, "
                 "%s val, %d test images)", self.model_info["name"] or "the model",
                 f"{self.model_info['parameters']:,}", epochs, "" if epochs == 1 else "s",
                 self.iters_per_epoch, self.device, len(self.data.train),
                 len(self.data.val) if self.data.val is not None else 0, len(self.data.test))
        if self.start_epoch > 1 or self.partial is not None:
            log.info("resumed at iteration %d (epoch %d)", self.iteration,
                     self.start_epoch - (self.partial is None))
        if self.world.distributed:
            log.info("DDP: %d ranks, global batch %d (%d per rank)", self.world.size,
                     self.cfg.batch_size, self.cfg.batch_size // self.world.size)
        if self.snapshots is not None:  # a plan that does not fit the disk fails here
            self.snapshots.prepare(self.model, self.iteration)
        start = time.perf_counter()
        status = "failed"
        error: str | None = None
        try:
            with self.signals:
                self._epochs(start)
            set_phase(WRITING_RESULTS)
            # After the final evaluation, so that the averages are prepared (fresh BN).
            models: dict[str, Any] = {"sgd": self.model, PRIMARY: None}
            with autocast(self.eval_precision, self.device):
                models.update({name: self._calibration_input(name, a)
                               for name, a in self.averages.items()})
                self.calibration = calibrate_run(models, self.data.test, self.eval_pre,
                                                 self.cfg.eval_batch_size, self.run_dir,
                                                 plot=self.world.is_main)
            status = "finished"
        except Preempted:
            status, error = "preempted", "stopped by a signal; resumes from its checkpoint"
            raise
        except TrainingDiverged as e:
            status, error = "diverged", str(e)
            raise
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user"
            raise
        except Exception as e:
            peer = as_peer_failure(e)
            if peer is not None and peer is not e:
                error = str(peer)
                raise peer from e
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.data.close()  # a streamed set's worker processes
            wall = self.wall_before + time.perf_counter() - start
            if status != "finished":
                self.loggers.finish(self.metrics(status, wall, error))
        # metrics.json is the commit point, written last: a run dir that says "finished" holds
        # every file it lists. A crash before it leaves a run that a rerun completes from its
        # checkpoint.
        if not self.world.is_main:  # rank 0 writes the run's files
            return self.metrics("finished", wall)
        try:
            files = self.save_weights() if self.cfg.save_checkpoints else []
        except OSError as e:
            msg = f"{describe_write_error(e, e.filename or self.run_dir)}; the run's checkpoint " \
                  "is kept: rerun the same command to complete the run"
            self.loggers.finish(self.metrics("failed", wall, msg))
            raise UserError(msg) from e
        metrics = self.metrics("finished", wall)
        metrics["files"] = files
        self.loggers.finish(metrics)
        remove_finished_checkpoints(self.run_dir, keep_latest=self.cfg.keep_checkpoint)
        return metrics

    def _epochs(self, start: float) -> None:
        """Train, evaluate, log and checkpoint epoch by epoch to the end of the budget."""
        epochs = self.cfg.epochs
        if self.cfg.eval_at_start and self.iteration == 0 and not self.history:
            t0 = time.perf_counter()
            row = self.evaluate_all(0, None, None)  # the starting point, before any step
            self.history.append(dict(row))
            self.loggers.log_eval(row)
            self._log_line(row, time.perf_counter() - t0)
        for epoch in range(self.start_epoch, epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_acc = self.train_epoch(epoch)
            self.train_time += time.perf_counter() - t0
            if epoch % self.cfg.eval_every == 0 or epoch == epochs:
                row = self.evaluate_all(epoch, train_loss, train_acc)
                self.history.append(dict(row))
                # Throughput goes to the trackers only: the files stay reproducible.
                row["images_per_s"] = self.images_seen / max(self.train_time, 1e-9)
                self.loggers.log_eval(row)
                self._log_line(row, time.perf_counter() - t0)
            every = self.cfg.checkpoint_every
            if every and (epoch % every == 0 or epoch == epochs):
                self.save_checkpoint(epoch, wall=time.perf_counter() - start)
            if self._stop_agreed():
                self._preempt(epoch + 1, None, wall=time.perf_counter() - start)

    # -- checkpoints, resume, preemption --------------------------------------------------
    def state(self, epoch: int, partial: dict[str, Any] | None, wall: float) -> dict[str, Any]:
        """Everything a resume needs to continue bit for bit."""
        return {
            "config": self.config_dict,
            "epoch": epoch,  # completed epochs
            "iteration": self.iteration,
            "partial": partial,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "averages": {name: a.state_dict() for name, a in self.averages.items()},
            "best": self.best,
            "best_state": self.best_state,
            "last_sgd": self.last_sgd,
            "last_avg": self.last_avg,
            "nonfinite": self.nonfinite,
            "history": self.history,
            "scaler": self.step.scaler.state_dict(),
            "rng": rng_state(self.generator, self.device),
            "timing": {"train_time": self.train_time, "images_seen": self.images_seen,
                       "wall": self.wall_before + wall},
            # Under DDP, what differs between the ranks: their RNG (dropout) and the BN running
            # statistics of their shards (the model's and those the averages copied).
            "ranks": gather_objects(self._rank_state()) if self.shard is not None else None,
        }

    def _networks(self) -> dict[str, nn.Module]:
        """The model and each average's network, by a key (the buffers that differ across
        ranks live in these)."""
        return {"model": self.model, **{f"average:{name}": a.module
                                        for name, a in self.averages.items()}}

    def _rank_state(self) -> dict[str, Any]:
        return {"rng": rng_state(self.generator, self.device),
                "buffers": {key: {n: b.detach().cpu().clone()
                                  for n, b in m.named_buffers() if b.is_floating_point()}
                            for key, m in self._networks().items()}}

    def _load_rank_state(self, ranks: list[dict[str, Any]] | None) -> None:
        if ranks is None or self.shard is None:
            return
        if len(ranks) != self.world.size:
            log.warning("the checkpoint was written by %d ranks, this run has %d: every rank "
                        "continues from rank 0's BN running statistics and random state",
                        len(ranks), self.world.size)
            return
        mine = ranks[self.world.rank]
        with torch.no_grad():
            for key, module in self._networks().items():
                saved = mine["buffers"].get(key, {})
                for n, b in module.named_buffers():
                    if n in saved:
                        b.copy_(saved[n])
        set_rng_state(mine["rng"], self.generator, self.device)

    def save_checkpoint(self, epoch: int, partial: dict[str, Any] | None = None,
                        wall: float = 0.0) -> Path:
        """Every rank takes part (the state gathers the ranks' own parts); rank 0 writes, and
        the others wait for it, so that no rank exits before the checkpoint is on disk."""
        state = self.state(epoch, partial, wall)
        path = self.run_dir / "checkpoint.pt"
        if self.world.is_main:
            path = save_checkpoint(self.run_dir, state)
        barrier()
        return path

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.step.scaler.load_state_dict(state["scaler"])
        saved = state.get("averages")
        if saved is None:  # a checkpoint of format 2 from before named averages: one, "swa"
            saved = {} if state.get("averager") is None else {PRIMARY: state["averager"]}
        if set(saved) != set(self.averages) and any(saved.values()):
            raise KeyError(f"the checkpoint holds the averages {sorted(saved)}, this run "
                           f"keeps {sorted(self.averages)}")
        for name, average in self.averages.items():
            if saved.get(name) is not None:
                average.load_state_dict(saved[name])
        self.best, self.best_state = state["best"], state["best_state"]
        if self.best_state is not None:
            self.best_state = {k: v.to(self.device) for k, v in self.best_state.items()}
        self.last_sgd = state["last_sgd"]
        self.nonfinite = dict(state.get("nonfinite") or {})
        self.last_avg = state.get("last_avg") or (
            {PRIMARY: state["last_swa"]} if state.get("last_swa") else {})
        self.history = [dict(r) for r in state["history"]]
        self.loggers.restore_history(self.history)
        self.iteration = state["iteration"]
        self.partial = state["partial"]
        if self.partial is not None and self.shard is not None:
            ranks = self.partial.pop("rank_sums", None)
            if ranks is not None and len(ranks) == self.world.size:
                loss_sum, correct, seen = ranks[self.world.rank]
                self.partial = {**self.partial, "loss_sum": loss_sum, "correct": correct,
                                "seen": seen}
            elif not self.world.is_main:  # the totals continue on rank 0
                self.partial = {**self.partial, "seen": 0,
                                "loss_sum": torch.zeros_like(self.partial["loss_sum"]),
                                "correct": torch.zeros_like(self.partial["correct"])}
        elif self.partial is not None:
            self.partial.pop("rank_sums", None)
        self.start_epoch = state["epoch"] + 1
        timing = state["timing"]
        self.train_time, self.images_seen = timing["train_time"], timing["images_seen"]
        self.wall_before = timing["wall"]
        set_rng_state(state["rng"], self.generator, self.device)
        self._load_rank_state(state.get("ranks"))

    def _preempt(self, epoch: int, partial: dict[str, Any] | None, wall: float = 0.0) -> None:
        """Checkpoint at the current position (inside ``epoch``, or before it when
        ``partial`` is None) and stop with the requeue status."""
        signum = self.signals.signum or signal.SIGTERM
        if partial is not None and self.shard is not None:
            # Each rank's sums of the epoch so far (a resume on as many ranks continues them
            # bit for bit), and their totals (for a resume on another number of ranks).
            ranks = gather_objects([partial["loss_sum"].cpu(), partial["correct"].cpu(),
                                    partial["seen"]])
            partial = {**partial, "rank_sums": ranks,
                       "loss_sum": sum(r[0].double() for r in ranks).float(),
                       "correct": sum(r[1] for r in ranks), "seen": sum(r[2] for r in ranks)}
        path = self.save_checkpoint(epoch - 1, partial, wall)
        why = signal.Signals(signum).name + " received" if self.signals.signum is not None \
            else "another rank was signalled"
        log.warning("%s: checkpoint %s written at iteration %d; exiting with status %d for a "
                    "requeue", why, path, self.iteration, REQUEUE_EXIT_CODE)
        raise Preempted(signum)

    def metrics(self, status: str, wall: float, error: str | None = None) -> dict[str, Any]:
        out = run_metrics(status, wall, error, epochs=self.cfg.epochs, iterations=self.iteration,
                          sgd=self.last_sgd, best=self.best, averages=self.last_avg,
                          names=list(self.averages), calibration=self.calibration,
                          model=self.model_info, images_seen=self.images_seen,
                          train_time=self.train_time, device=self.device)
        if self.nonfinite:
            out["nonfinite"] = dict(self.nonfinite)
        return out

    def save_weights(self) -> list[str]:
        return save_weights(self.run_dir, self.config_dict, self.model, self.iteration,
                            self.best_state, self.best, self.averages)

    def _log_line(self, row: dict[str, Any], seconds: float) -> None:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}%"

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        msg = (f"epoch {row['epoch']}/{self.cfg.epochs} it {row['iteration']} "
               f"lr {row['lr']:.3g} | train {num(row['train_loss'])} {pct(row['train_acc'])} | "
               f"sgd val {num(row['sgd_val_loss'])} {pct(row['sgd_val_acc'])} "
               f"test {num(row['sgd_test_loss'])} {pct(row['sgd_test_acc'])}")
        for name in self.averages:
            if row[f"{name}_n_averaged"]:
                msg += (f" | {name} val {num(row[f'{name}_val_loss'])} "
                        f"{pct(row[f'{name}_val_acc'])} test {num(row[f'{name}_test_loss'])} "
                        f"{pct(row[f'{name}_test_acc'])} (n={row[f'{name}_n_averaged']})")
        msg += f" | {seconds:.1f}s"
        if self.loader_wait is not None:
            msg += f" (loader wait {100 * self.loader_wait:.0f}% of training)"
        log.info(msg)


def _tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a nested state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []
