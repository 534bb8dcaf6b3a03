"""The training loop: step -> average -> evaluate SGD and averaged -> log -> save."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swa_research.averaging import Averager, AveragingPlan
from swa_research.calibration import calibrate_run
from swa_research.checkpoint import (
    remove_finished_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from swa_research.config import TrainerConfig, UserError
from swa_research.data import DataSplits, ImageSet, Preprocess, eval_batches, train_batches
from swa_research.faults import fault_point
from swa_research.fileio import atomic_torch_save, describe_write_error
from swa_research.loggers import Loggers
from swa_research.step import TrainStep, autocast, peak_gpu_mb, peak_rss_mb, resolve_precision

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again": asks for a requeue


class Preempted(SystemExit):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was written; the process exits for a requeue.

    A SystemExit, so that Hydra's job runner and launchers let it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.signum = signum


@dataclass
class EvalResult:
    loss: float | None = None
    acc: float | None = None


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageSet | None, preprocess: Preprocess,
             batch_size: int) -> EvalResult:
    """Mean cross-entropy and accuracy over the whole set; restores the model's mode."""
    if data is None or len(data) == 0:
        return EvalResult()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=data.images.device, dtype=torch.float64)
    correct = torch.zeros((), device=data.images.device, dtype=torch.int64)
    for x, y in eval_batches(data, batch_size, preprocess):
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(data)
    return EvalResult(loss=loss_sum.item() / n, acc=correct.item() / n)


def _hms(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


class Progress:
    """Progress inside an epoch.

    ``bar``: a live bar on stderr (at most two redraws a second). ``line``: a log record every
    :attr:`line_every_s` seconds with the iteration, the running training loss, the speed and
    the time left in the epoch, for logs that are files (a cluster job's output, Hydra's
    ``<job>.log``); an epoch shorter than that prints none. ``auto``: the bar in a terminal, else
    lines. ``none``: nothing. The running loss is read from the device only when shown.
    """

    line_every_s = 30.0

    def __init__(self, mode: str, total: int, done: int = 0, seen: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.mode = mode
        self.total = total
        self._clock = clock
        self._t0 = clock()
        # The bar draws at the first update; lines come only after line_every_s.
        self._last = 0.0 if mode == "bar" else self._t0
        self._done0, self._seen0 = done, seen

    def update(self, epoch: int, epochs: int, done: int, loss_sum: torch.Tensor,
               seen: int) -> None:
        if self.mode == "bar":
            self._bar(epoch, epochs, done, loss_sum, seen)
        elif self.mode == "line":
            self._line(epoch, epochs, done, loss_sum, seen)

    def _bar(self, epoch: int, epochs: int, done: int, loss_sum: torch.Tensor,
             seen: int) -> None:
        now = self._clock()
        if now - self._last < 0.5 and done < self.total:
            return
        self._last = now
        width = 30
        filled = int(width * done / max(1, self.total))
        sys.stderr.write(f"\repoch {epoch}/{epochs} [{'=' * filled}{' ' * (width - filled)}] "
                         f"{done}/{self.total} loss {loss_sum.item() / max(1, seen):.4f}")
        sys.stderr.flush()

    def _line(self, epoch: int, epochs: int, done: int, loss_sum: torch.Tensor,
              seen: int) -> None:
        now = self._clock()
        if now - self._last < self.line_every_s or done >= self.total:
            return  # the epoch's own summary follows its last iteration
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        per_iter = elapsed / max(1, done - self._done0)
        log.info("epoch %d/%d: iteration %d/%d (%d%%), train loss %.4f, %.0f images/s, "
                 "epoch done in %s", epoch, epochs, done, self.total,
                 100 * done // max(1, self.total), loss_sum.item() / max(1, seen),
                 (seen - self._seen0) / elapsed, _hms(per_iter * (self.total - done)))

    def close(self) -> None:
        if self.mode == "bar":
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@dataclass
class Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: AveragingPlan
    averager: Averager | None
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

    def __post_init__(self) -> None:
        self.device = self.data.train.images.device
        self.iters_per_epoch = self.plan.iters_per_epoch
        self.generator = torch.Generator().manual_seed(self.seed)
        self.iteration = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best: dict[str, Any] | None = None
        self.last_sgd: dict[str, Any] = {}
        self.last_swa: dict[str, Any] = {}
        self.train_time = 0.0
        self.images_seen = 0
        self.wall_before = 0.0  # wall time of earlier processes of this run (resume)
        self.start_epoch = 1
        self.history: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None  # a mid-epoch position to resume from
        self._stop_signal: int | None = None
        self.calibration: dict[str, Any] | None = None
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.eval_precision = resolve_precision(self.cfg.eval_precision, self.device)
        self.last_lr = self.current_lr()  # the lr the latest step used
        self.step = TrainStep(self.model, self.optimizer, self.precision, self.device)

    # -- one epoch ------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        part, self.partial = self.partial, None
        if part is None:
            order = torch.randperm(len(self.data.train), generator=self.generator)
            start, seen = 0, 0
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.int64)
        else:  # resuming inside this epoch
            order, start, seen = part["order"], part["batch"], part["seen"]
            loss_sum = part["loss_sum"].to(self.device)
            correct = part["correct"].to(self.device)
        progress = Progress(self.cfg.progress, self.iters_per_epoch, start, seen)
        batches = train_batches(self.data.train, self.cfg.batch_size, self.generator,
                                self.train_pre, self.cfg.drop_last, order=order, start=start)
        for i, (x, y) in enumerate(batches, start=start + 1):
            self.last_lr = self.current_lr()  # before the scheduler moves on to the next step's
            loss, logits = self.step(x, y)
            self.scheduler.step()
            self.iteration += 1
            # Accumulated on the device: no host sync inside the step loop.
            loss_sum.add_(loss.detach(), alpha=y.shape[0])
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            fault_point("step")
            if self.averager is not None and self.plan.due_after_iter(self.iteration):
                self.averager.update(self.model)
                fault_point("averaged")
            if self.iteration % self.log_every == 0:
                # The one sync every log_every steps: the logged loss, also a divergence check.
                last = loss.detach().item()
                self._check_finite(last, epoch)
                self.loggers.log_step(self.iteration, {"train/loss": last,
                                                       "lr": self.last_lr})
            progress.update(epoch, self.cfg.epochs, i, loss_sum, seen)
            if self._stop_signal is not None:
                progress.close()
                self._preempt(epoch, {"order": order, "batch": i, "seen": seen,
                                      "loss_sum": loss_sum, "correct": correct})
        progress.close()
        if self.averager is not None and self.plan.due_after_epoch(epoch):
            self.averager.update(self.model)
            fault_point("averaged")
        self.images_seen += seen
        train_loss = loss_sum.item() / max(1, seen)
        self._check_finite(train_loss, epoch)
        return train_loss, correct.item() / max(1, seen)

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
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        return train_batches(self.data.train, self.bn_batch_size or self.cfg.batch_size, gen,
                             self.train_pre, drop_last=False)

    @staticmethod
    def _with_fault(batches: Any, point: str) -> Any:
        for batch in batches:
            fault_point(point)
            yield batch

    def evaluate_all(self, epoch: int, train_loss: float, train_acc: float) -> dict[str, Any]:
        with autocast(self.eval_precision, self.device):
            return self._evaluate_all(epoch, train_loss, train_acc)

    def _evaluate_all(self, epoch: int, train_loss: float, train_acc: float) -> dict[str, Any]:
        bs = self.cfg.eval_batch_size
        fault_point("eval")
        sgd_val = evaluate(self.model, self.data.val, self.eval_pre, bs)
        sgd_test = evaluate(self.model, self.data.test, self.eval_pre, bs)
        swa_val, swa_test, n_avg = EvalResult(), EvalResult(), 0
        if self.averager is not None and self.averager.n_averaged > 0:
            # The BN pass runs the average in train mode, so its dropout draws from the global
            # RNG that training uses: fork it, so that evaluating (and trainer.eval_every)
            # does not change the training run.
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                self.averager.prepare_for_eval(self._with_fault(self.bn_batches(), "bn_update"))
            swa_val = evaluate(self.averager.module, self.data.val, self.eval_pre, bs)
            swa_test = evaluate(self.averager.module, self.data.test, self.eval_pre, bs)
            n_avg = self.averager.n_averaged
        self.model.train()
        row = {
            "epoch": epoch, "iteration": self.iteration, "lr": self.last_lr,
            "train_loss": train_loss, "train_acc": train_acc,
            "sgd_val_loss": sgd_val.loss, "sgd_val_acc": sgd_val.acc,
            "sgd_test_loss": sgd_test.loss, "sgd_test_acc": sgd_test.acc,
            "swa_val_loss": swa_val.loss, "swa_val_acc": swa_val.acc,
            "swa_test_loss": swa_test.loss, "swa_test_acc": swa_test.acc,
            "swa_n_averaged": n_avg,
        }
        self.last_sgd = {"test_acc": sgd_test.acc, "test_loss": sgd_test.loss,
                         "val_acc": sgd_val.acc, "val_loss": sgd_val.loss}
        self.last_swa = {"test_acc": swa_test.acc, "test_loss": swa_test.loss,
                         "val_acc": swa_val.acc, "val_loss": swa_val.loss, "n_averaged": n_avg}
        self._track_best(epoch)
        return row

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
        log.info("training %d epoch%s of %d iterations on %s (%d train, %s val, %d test images)",
                 epochs, "" if epochs == 1 else "s", self.iters_per_epoch, self.device,
                 len(self.data.train), len(self.data.val) if self.data.val is not None else 0,
                 len(self.data.test))
        if self.start_epoch > 1 or self.partial is not None:
            log.info("resumed at iteration %d (epoch %d)", self.iteration,
                     self.start_epoch - (self.partial is None))
        start = time.perf_counter()
        status = "failed"
        error: str | None = None
        handlers = self._install_signal_handlers()
        try:
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
                if self._stop_signal is not None:
                    self._preempt(epoch + 1, None, wall=time.perf_counter() - start)
            # After the final evaluation, so the average's BN statistics are fresh.
            averaged = self.averager.module if self.averager and self.averager.n_averaged else None
            with autocast(self.eval_precision, self.device):
                self.calibration = calibrate_run(self.model, averaged, self.data.test,
                                                 self.eval_pre, self.cfg.eval_batch_size,
                                                 self.run_dir)
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
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._restore_signal_handlers(handlers)
            wall = self.wall_before + time.perf_counter() - start
            if status != "finished":
                self.loggers.finish(self.metrics(status, wall, error))
        # metrics.json is the commit point, written last: a run dir that says "finished" holds
        # every file it lists. A crash before it leaves a run that a rerun completes from its
        # checkpoint.
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
            "averager": None if self.averager is None else self.averager.state_dict(),
            "best": self.best,
            "best_state": self.best_state,
            "last_sgd": self.last_sgd,
            "last_swa": self.last_swa,
            "history": self.history,
            "scaler": self.step.scaler.state_dict(),
            "rng": rng_state(self.generator, self.device),
            "timing": {"train_time": self.train_time, "images_seen": self.images_seen,
                       "wall": self.wall_before + wall},
        }

    def save_checkpoint(self, epoch: int, partial: dict[str, Any] | None = None,
                        wall: float = 0.0) -> Path:
        return save_checkpoint(self.run_dir, self.state(epoch, partial, wall))

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.step.scaler.load_state_dict(state["scaler"])
        if self.averager is not None and state["averager"] is not None:
            self.averager.load_state_dict(state["averager"])
        self.best, self.best_state = state["best"], state["best_state"]
        if self.best_state is not None:
            self.best_state = {k: v.to(self.device) for k, v in self.best_state.items()}
        self.last_sgd, self.last_swa = state["last_sgd"], state["last_swa"]
        self.history = [dict(r) for r in state["history"]]
        self.loggers.restore_history(self.history)
        self.iteration = state["iteration"]
        self.partial = state["partial"]
        self.start_epoch = state["epoch"] + 1
        timing = state["timing"]
        self.train_time, self.images_seen = timing["train_time"], timing["images_seen"]
        self.wall_before = timing["wall"]
        set_rng_state(state["rng"], self.generator, self.device)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM, SIGUSR1 or SIGUSR2 (what SLURM and submitit send before preemption or the
        time limit): finish the current step, write a checkpoint, exit for a requeue."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        # SIGUSR2 too: submitit's default preemption signal.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _preempt(self, epoch: int, partial: dict[str, Any] | None, wall: float = 0.0) -> None:
        """Checkpoint at the current position (inside ``epoch``, or before it when
        ``partial`` is None) and stop with the requeue status."""
        signum = self._stop_signal or signal.SIGTERM
        path = self.save_checkpoint(epoch - 1, partial, wall)
        log.warning("%s received: checkpoint %s written at iteration %d; exiting with status "
                    "%d for a requeue", signal.Signals(signum).name, path, self.iteration,
                    REQUEUE_EXIT_CODE)
        raise Preempted(signum)

    def metrics(self, status: str, wall: float, error: str | None = None) -> dict[str, Any]:
        none4 = {"test_acc": None, "test_loss": None, "val_acc": None, "val_loss": None}
        best = self.best or {"epoch": None, **none4}
        swa = self.last_swa or {**none4, "n_averaged": 0}
        out: dict[str, Any] = {
            "status": status,
            "sgd": self.last_sgd or none4,
            "sgd_best_val": best,
            "swa": swa,
            "calibration": self.calibration,
            "train": {
                "epochs": self.cfg.epochs,
                "iterations": self.iteration,
                "wall_time_s": round(wall, 3),
                "images_per_s": round(self.images_seen / self.train_time, 1)
                if self.train_time > 0 else None,
                # Of this process (a resumed run: since the resume).
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "peak_gpu_mb": None if (gpu := peak_gpu_mb(self.device)) is None
                else round(gpu, 1),
            },
        }
        if error:
            out["error"] = error
        return out

    def save_weights(self) -> list[str]:
        """sgd_final.pt, sgd_best_val.pt and swa.pt (those that exist); returns their names."""
        cfg = self.config_dict
        blobs = {"sgd_final.pt": {"state_dict": self.model.state_dict(), "config": cfg,
                                  "iteration": self.iteration}}
        if self.best_state is not None:
            blobs["sgd_best_val.pt"] = {"state_dict": self.best_state, "config": cfg,
                                        "epoch": self.best["epoch"] if self.best else None}
        if self.averager is not None and self.averager.n_averaged > 0:
            blobs["swa.pt"] = {"state_dict": self.averager.module.state_dict(), "config": cfg,
                               "n_averaged": self.averager.n_averaged,
                               "method": self.averager.method}
        for name, blob in blobs.items():
            atomic_torch_save(blob, self.run_dir / name)
        return list(blobs)

    def _log_line(self, row: dict[str, Any], seconds: float) -> None:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}%"

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        msg = (f"epoch {row['epoch']}/{self.cfg.epochs} it {row['iteration']} "
               f"lr {row['lr']:.3g} | train {num(row['train_loss'])} {pct(row['train_acc'])} | "
               f"sgd val {num(row['sgd_val_loss'])} {pct(row['sgd_val_acc'])} "
               f"test {num(row['sgd_test_loss'])} {pct(row['sgd_test_acc'])}")
        if row["swa_n_averaged"]:
            msg += (f" | swa val {num(row['swa_val_loss'])} {pct(row['swa_val_acc'])} "
                    f"test {num(row['swa_test_loss'])} {pct(row['swa_test_acc'])} "
                    f"(n={row['swa_n_averaged']})")
        msg += f" | {seconds:.1f}s"
        log.info(msg)
