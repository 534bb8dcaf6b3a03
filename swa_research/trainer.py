"""The training loop: step -> average -> evaluate SGD and averaged -> log -> save."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swa_research.averaging import Averager, AveragingPlan
from swa_research.config import TrainerConfig
from swa_research.data import (
    DataSplits,
    ImageSet,
    Preprocess,
    atomic_torch_save,
    eval_batches,
    train_batches,
)
from swa_research.loggers import Loggers
from swa_research.step import TrainStep, autocast, resolve_precision

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


class Progress:
    """A live bar in a terminal (at most a few redraws a second); nothing otherwise."""

    def __init__(self, mode: str, total: int) -> None:
        self.enabled = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.total = total
        self._last = 0.0

    def update(self, epoch: int, epochs: int, done: int, loss_sum: torch.Tensor,
               seen: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.5 and done < self.total):
            return
        self._last = now
        width = 30
        filled = int(width * done / max(1, self.total))
        sys.stderr.write(f"\repoch {epoch}/{epochs} [{'=' * filled}{' ' * (width - filled)}] "
                         f"{done}/{self.total} loss {loss_sum.item() / max(1, seen):.4f}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
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
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.step = TrainStep(self.model, self.optimizer, self.precision, self.device)

    # -- one epoch ------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        progress = Progress(self.cfg.progress, self.iters_per_epoch)
        batches = train_batches(self.data.train, self.cfg.batch_size, self.generator,
                                self.train_pre, self.cfg.drop_last)
        for i, (x, y) in enumerate(batches, start=1):
            loss, logits = self.step(x, y)
            self.scheduler.step()
            self.iteration += 1
            # Accumulated on the device: no host sync inside the step loop.
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if self.averager is not None and self.plan.due_after_iter(self.iteration):
                self.averager.update(self.model)
            if self.iteration % self.log_every == 0:
                self.loggers.log_step(self.iteration, {"train/loss": loss.detach(),
                                                       "lr": self.current_lr()})
            progress.update(epoch, self.cfg.epochs, i, loss_sum, seen)
        progress.close()
        if self.averager is not None and self.plan.due_after_epoch(epoch):
            self.averager.update(self.model)
        self.images_seen += seen
        return loss_sum.item() / max(1, seen), correct.item() / max(1, seen)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- evaluation -----------------------------------------------------------------------
    def bn_batches(self) -> Any:
        """Training batches for the BN update of the average, with the training augmentation,
        from a generator of their own so that the training order is not disturbed."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        return train_batches(self.data.train, self.cfg.eval_batch_size, gen, self.train_pre,
                             drop_last=False)

    def evaluate_all(self, epoch: int, train_loss: float, train_acc: float) -> dict[str, Any]:
        with autocast(self.precision, self.device):
            return self._evaluate_all(epoch, train_loss, train_acc)

    def _evaluate_all(self, epoch: int, train_loss: float, train_acc: float) -> dict[str, Any]:
        bs = self.cfg.eval_batch_size
        sgd_val = evaluate(self.model, self.data.val, self.eval_pre, bs)
        sgd_test = evaluate(self.model, self.data.test, self.eval_pre, bs)
        swa_val, swa_test, n_avg = EvalResult(), EvalResult(), 0
        if self.averager is not None and self.averager.n_averaged > 0:
            # The BN pass runs the average in train mode, so its dropout draws from the global
            # RNG that training uses: fork it, so that evaluating (and trainer.eval_every)
            # does not change the training run.
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                self.averager.prepare_for_eval(self.bn_batches())
            swa_val = evaluate(self.averager.module, self.data.val, self.eval_pre, bs)
            swa_test = evaluate(self.averager.module, self.data.test, self.eval_pre, bs)
            n_avg = self.averager.n_averaged
        self.model.train()
        row = {
            "epoch": epoch, "iteration": self.iteration, "lr": self.current_lr(),
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
        log.info("training %d epochs of %d iterations on %s (%d train, %s val, %d test images)",
                 epochs, self.iters_per_epoch, self.device, len(self.data.train),
                 len(self.data.val) if self.data.val is not None else 0, len(self.data.test))
        start = time.perf_counter()
        status = "failed"
        error: str | None = None
        try:
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                train_loss, train_acc = self.train_epoch(epoch)
                self.train_time += time.perf_counter() - t0
                if not math.isfinite(train_loss):
                    raise TrainingDiverged(
                        f"training loss became {train_loss} in epoch {epoch} (iteration "
                        f"{self.iteration}); lower optimizer.lr or swa.lr")
                if epoch % self.cfg.eval_every == 0 or epoch == epochs:
                    row = self.evaluate_all(epoch, train_loss, train_acc)
                    self.loggers.log_eval(row)
                    self._log_line(row, time.perf_counter() - t0)
            status = "finished"
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
            wall = time.perf_counter() - start
            metrics = self.metrics(status, wall, error)
            self.loggers.finish(metrics)
        if self.cfg.save_checkpoints:
            self.save_weights()
        return metrics

    def metrics(self, status: str, wall: float, error: str | None = None) -> dict[str, Any]:
        none4 = {"test_acc": None, "test_loss": None, "val_acc": None, "val_loss": None}
        best = self.best or {"epoch": None, **none4}
        swa = self.last_swa or {**none4, "n_averaged": 0}
        out: dict[str, Any] = {
            "status": status,
            "sgd": self.last_sgd or none4,
            "sgd_best_val": best,
            "swa": swa,
            "train": {
                "epochs": self.cfg.epochs,
                "iterations": self.iteration,
                "wall_time_s": round(wall, 3),
                "images_per_s": round(self.images_seen / self.train_time, 1)
                if self.train_time > 0 else None,
            },
        }
        if error:
            out["error"] = error
        return out

    def save_weights(self) -> None:
        cfg = self.config_dict
        atomic_torch_save({"state_dict": self.model.state_dict(), "config": cfg,
                           "iteration": self.iteration}, self.run_dir / "sgd_final.pt")
        if self.best_state is not None:
            atomic_torch_save({"state_dict": self.best_state, "config": cfg,
                               "epoch": self.best["epoch"] if self.best else None},
                              self.run_dir / "sgd_best_val.pt")
        if self.averager is not None and self.averager.n_averaged > 0:
            atomic_torch_save({"state_dict": self.averager.module.state_dict(), "config": cfg,
                               "n_averaged": self.averager.n_averaged,
                               "method": self.averager.method}, self.run_dir / "swa.pt")

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
