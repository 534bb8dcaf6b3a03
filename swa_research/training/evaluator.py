"""The evaluations of a run: the SGD model and every average on the validation and test sets,
as one history row with the task's metric names, and what the run keeps of them (the latest
results, the best SGD model by validation, the non-finite results); the final calibration.

Row columns: ``epoch``, ``iteration``, ``lr``, ``train_<m>``, ``<model>_<split>_<m>`` for
``sgd`` and each average (``<name>_n_averaged`` beside), for each metric ``m`` of the task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging import PRIMARY, Average
from swa_research.averaging.base import EvalSet
from swa_research.config import TrainerConfig, UserError
from swa_research.data import eval_batches
from swa_research.tasks import Task
from swa_research.tasks.classification import log_probs
from swa_research.training.evaluation import (
    Scores,
    calibrate_run,
    evaluate,
    evaluate_probs,
)

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def forked_rng(device: torch.device) -> Any:
    """Preparing an average (the BN pass) runs it in train mode, so its dropout draws from the
    global RNG that training uses: fork it, so that evaluating (and trainer.eval_every) does not
    change the training run."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def check_best_by(task: Task, best_by: str) -> str:
    """``trainer.best_by`` is ``val_<metric>`` of one of the task's metrics."""
    choices = [f"val_{m}" for m in task.spec.metrics]
    if best_by not in choices:
        raise UserError(f"trainer.best_by={best_by}: task {task.name} reports "
                        f"{', '.join(choices)}")
    return best_by


class Evaluator:
    """Evaluates a run's models; holds their latest results (checkpointed with
    :meth:`state_dict`)."""

    def __init__(self, task: Task, data: Any, eval_pre: Any, cfg: TrainerConfig, seed: int,
                 averages: dict[str, Average], device: torch.device,
                 bn_batches: Callable[[int], Any]) -> None:
        self.task, self.data, self.eval_pre, self.cfg = task, data, eval_pre, cfg
        self.seed, self.averages, self.device = seed, averages, device
        self.bn_batches = bn_batches  # iteration -> the BN pass's batches
        self.best_by = check_best_by(task, cfg.best_by)
        self.last_sgd: dict[str, Any] = {}
        self.last_avg: dict[str, dict[str, Any]] = {}  # the latest evaluation of each average
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, Tensor] | None = None
        # Models whose evaluation gave a non-finite loss: name -> where (first time only).
        self.nonfinite: dict[str, str] = {}
        # Test-set (logits, labels) of the averages that predict whole sets (SWAG), from the
        # final evaluation: calibration reuses them instead of sampling again.
        self.final_logits: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.task.spec.metrics

    def _scores(self, model: Any, split: str) -> Scores:
        return evaluate(model, getattr(self.data, split), self.eval_pre,
                        self.cfg.eval_batch_size, self.task)

    def _all_scores(self, model: Any) -> dict[str, Scores]:
        """Each split's scores; a set that stands for two splits (the validation tokens when a
        language model holds out no test split) is evaluated once."""
        out: dict[str, Scores] = {}
        for split in SPLITS:
            data = getattr(self.data, split)
            same = next((s for s in out if data is not None and getattr(self.data, s) is data),
                        None)
            out[split] = dict(out[same]) if same is not None else self._scores(model, split)
        return out

    def _columns(self, prefix: str, scores: dict[str, Scores]) -> dict[str, Any]:
        return {f"{prefix}_{split}_{m}": scores[split][m] for split in SPLITS
                for m in self.metrics}

    def _entries(self, scores: dict[str, Scores]) -> dict[str, Any]:
        """metrics.json's entries of a model: ``<split>_<m>``, test first."""
        return {f"{s}_{m}": scores[s][m] for s in ("test", "val") for m in self.metrics}

    def row(self, model: nn.Module, epoch: float, iteration: int, lr: float,
            train: Scores | None, history: list[dict[str, Any]], final: bool = False
            ) -> dict[str, Any]:
        """Evaluate the SGD model and each average; the history row (``final``: at the end
        of the budget)."""
        sgd = self._all_scores(model)
        none = dict.fromkeys(self.metrics)
        row: dict[str, Any] = {"epoch": epoch, "iteration": iteration, "lr": lr,
                               **{f"train_{m}": (train or none)[m] for m in self.metrics},
                               **self._columns("sgd", sgd),
                               # The primary's columns are there also in a run without an average.
                               **self._columns(PRIMARY, {s: none for s in SPLITS}),
                               f"{PRIMARY}_n_averaged": 0}
        self.last_sgd = self._entries(sgd)
        # This evaluation's number, counted from 1 (trainer.eval_at_start's row 0 not counted).
        evaluation = sum(1 for r in history if r["epoch"] > 0) + 1
        for name, average in self.averages.items():
            scores = {s: dict(none) for s in SPLITS}
            due = average.n_averaged > 0 and average.eval_due(evaluation, final)
            if due:
                scores = self._average_scores(name, average, iteration, final)
            row.update({**self._columns(name, scores), f"{name}_n_averaged": average.n_averaged})
            if due or average.n_averaged == 0 or name not in self.last_avg:
                # An evaluation the average skips (eval_due) keeps its latest results.
                self.last_avg[name] = {**self._entries(scores),
                                       "n_averaged": average.n_averaged, **average.settings()}
        model.train()
        self._note_nonfinite(row, epoch)
        self._track_best(model, epoch)
        return row

    def _average_scores(self, name: str, average: Average, iteration: int, final: bool
                        ) -> dict[str, Scores]:
        probs = self.collect_probs(average, iteration, {s: getattr(self.data, s)
                                                        for s in SPLITS})
        if probs is None:  # one network: prepared, then evaluated batch by batch
            with forked_rng(self.device):
                average.prepare_for_eval(self.bn_batches(iteration))
            return self._all_scores(average)
        if final and "test" in probs:
            self.final_logits[name] = (log_probs(probs["test"]).cpu(),
                                       self.data.test.labels.cpu())
        return {s: evaluate_probs(probs.get(s), getattr(self.data, s), self.task)
                for s in SPLITS}

    def collect_probs(self, average: Average, iteration: int, sets: dict[str, Any]
                      ) -> dict[str, Tensor] | None:
        """The average's own probabilities of whole sets (``Average.collect_probs``), or None
        for an average that is one network. Seeded by the run's seed and the iteration: the
        same evaluation gives the same result."""
        with forked_rng(self.device):
            return average.collect_probs(eval_sets(sets, self.eval_pre, self.cfg.eval_batch_size),
                                         lambda: self.bn_batches(iteration),
                                         seed=self.seed * 1_000_003 + iteration)

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

    def _track_best(self, model: nn.Module, epoch: int) -> None:
        value = self.last_sgd.get(self.best_by)
        if value is None:
            return
        if self.best is None or self.task.spec.better(self.best_by, value,
                                                      self.best[self.best_by]):
            self.best = {"epoch": epoch, **self.last_sgd}
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # -- the end of a run -----------------------------------------------------------------
    def calibrate(self, model: nn.Module, iteration: int, run_dir: Path, plot: bool
                  ) -> dict[str, Any] | None:
        """NLL, ECE and the reliability diagram of the SGD model and each average on the test
        set (tasks that predict class probabilities; None for others)."""
        if not self.task.probabilistic:
            return None
        models: dict[str, Any] = {"sgd": model, PRIMARY: None}
        models.update({name: self._calibration_input(name, a, iteration)
                       for name, a in self.averages.items()})
        return calibrate_run(models, self.data.test, self.eval_pre, self.cfg.eval_batch_size,
                             run_dir, plot=plot)

    def _calibration_input(self, name: str, average: Average, iteration: int) -> Any:
        """What calibration evaluates for an average: the average itself, or the test-set
        (logits, labels) of one that predicts whole sets (sampled again only where the final
        evaluation's are not at hand: a run completed from its checkpoint)."""
        if not average.n_averaged:
            return None
        if name in self.final_logits:
            return self.final_logits[name]
        probs = self.collect_probs(average, iteration, {"test": self.data.test})
        if probs is None:
            return average
        return log_probs(probs["test"]).cpu(), self.data.test.labels.cpu()

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_state": self.best_state, "last_sgd": self.last_sgd,
                "last_avg": self.last_avg, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_state = state["best"], state["best_state"]
        if self.best_state is not None:
            self.best_state = {k: v.to(self.device) for k, v in self.best_state.items()}
        self.last_sgd = state["last_sgd"]
        self.nonfinite = dict(state.get("nonfinite") or {})
        self.last_avg = state.get("last_avg") or (
            {PRIMARY: state["last_swa"]} if state.get("last_swa") else {})


def eval_sets(sets: dict[str, Any], preprocess: Any, batch_size: int) -> dict[str, EvalSet]:
    """The framework's data sets (None: absent) as the averaging core's whole sets: their
    evaluation batches' inputs, in order."""
    def inputs(data: Any) -> Callable[[], Iterator[Tensor]]:
        return lambda: (x for x, _ in eval_batches(data, batch_size, preprocess))

    return {name: EvalSet(inputs(data), len(data), data.labels)
            for name, data in sets.items() if data is not None and len(data)}
