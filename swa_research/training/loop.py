"""The walk over the budget: epochs of steps, with the averages' and snapshots' points, the
evaluations, checkpoints and preemption between them.

The budget and the cadences count epochs (``trainer.epochs``, ``eval_every``,
``checkpoint_every``) or optimizer steps (``trainer.max_steps``, ``eval_every_steps``,
``checkpoint_every_steps``: nanoGPT's ``max_iters`` and ``eval_interval``). A run in steps ends
inside an epoch when its budget does; an evaluation or checkpoint due inside an epoch is made
there (a checkpoint holds the position in the epoch, as a preemption's does). A row evaluated
by steps reports the training metrics of the steps since the previous evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from swa_research.tracking.progress import Progress
from swa_research.training.state import partial_with_ranks


@dataclass
class Window:
    """The training steps since the previous evaluation by steps: this rank's metric sums and
    count (a checkpoint keeps their totals over the ranks) and the training seconds."""

    sums: Tensor | None = None
    seen: int = 0
    seconds: float = 0.0

    def add(self, sums: Tensor, count: int) -> None:
        self.sums = sums.clone() if self.sums is None else self.sums.add_(sums)
        self.seen += count

    def totals(self, ranks: Any, metrics: int, device: Any) -> tuple[Tensor, int]:
        """The sums (``metrics`` of them) and count over the ranks: a collective under DDP,
        made by every rank; this rank's own are left as they are."""
        sums = self.sums.clone() if self.sums is not None else \
            torch.zeros(metrics, device=device, dtype=torch.float64)
        return ranks.epoch_sums(sums, self.seen)


class Trainer(Protocol):  # what the loop reads of swa_research.training.trainer.Trainer
    cfg: Any
    plan: Any
    task: Any
    data: Any
    ranks: Any
    model: Any
    history: list[dict[str, Any]]
    iteration: int
    start_epoch: int
    train_time: float
    images_seen: int
    partial: dict[str, Any] | None
    window: Window

    def train_epoch(self, epoch: int) -> dict[str, float | None]: ...
    def save_checkpoint(self, epoch: int, partial: dict[str, Any] | None = None,
                        wall: float = 0.0) -> Any: ...


def total_steps(t: Trainer) -> int:
    """The budget in optimizer steps."""
    return t.plan.total_iters


def epochs_of(t: Trainer) -> int:
    """The epochs the budget takes, the last one cut short by a budget in steps."""
    return -(-total_steps(t) // t.plan.iters_per_epoch)


def epoch_at(t: Trainer, iteration: int) -> float | int:
    """The history's ``epoch`` of an evaluation after ``iteration`` steps: the completed epochs,
    or, inside an epoch, the fraction of epochs trained (4 decimals)."""
    whole, rest = divmod(iteration, t.plan.iters_per_epoch)
    return whole if rest == 0 else round(iteration / t.plan.iters_per_epoch, 4)


def run_budget(t: Any) -> None:
    """Train, evaluate, log and checkpoint to the end of the budget."""
    cfg, total, start = t.cfg, total_steps(t), t.run_start
    epochs = epochs_of(t)
    if cfg.eval_at_start and t.iteration == 0 and not t.history:
        t._evaluation(0, None, t0=time.perf_counter())  # the start, before any step
    for epoch in range(t.start_epoch, epochs + 1):
        t0 = time.perf_counter()
        train = t.train_epoch(epoch)
        t.train_time += time.perf_counter() - t0 - t.paused
        t.paused = 0.0
        last = t.iteration >= total
        if cfg.eval_every_steps:
            if last or t.iteration % cfg.eval_every_steps == 0:
                t._evaluation(epoch_at(t, t.iteration), *window_scores(t), t0=t0)
        elif epoch % cfg.eval_every == 0 or last:  # (a budget in steps may end inside one)
            cut = last and total % t.plan.iters_per_epoch
            t._evaluation(epoch_at(t, t.iteration) if cut else epoch, train, t0=t0)
        every = cfg.checkpoint_every_steps or cfg.checkpoint_every
        due = last or (t.iteration if cfg.checkpoint_every_steps else epoch) % max(every, 1) == 0
        if every and due:
            t.save_checkpoint(epoch, wall=time.perf_counter() - start)
        if t.ranks.stop_agreed(t.signalled):
            t._preempt(epoch + 1, None, wall=time.perf_counter() - start)


def window_scores(t: Any) -> tuple[dict[str, float | None], float | None]:
    """The task's training metrics of the steps since the previous evaluation (over the
    ranks) and their throughput (per second, in the task's unit); the window starts afresh."""
    w = t.window
    sums, seen = w.totals(t.ranks, len(t.task.spec.metrics), t.device)
    t.window = Window()
    per_s = seen / w.seconds if w.seconds > 0 else None
    return t.task.summarize([s.item() for s in sums], seen), per_s


def train_epoch(t: Any, epoch: int) -> dict[str, float | None]:
    """One epoch (or the rest of one, resuming; or its first steps, when the budget in steps
    ends inside it); the task's metrics of its batches."""
    t.model.train()
    cfg, total = t.cfg, total_steps(t)
    part, t.partial = t.partial, None
    if part is None:
        order = torch.randperm(len(t.data.train), generator=t.generator)
        # Each image's crop is seeded by this and its position in the epoch (both paths).
        # (tolist: a CPU read without the scalar dispatch a host-read count watches.)
        aug_seed = torch.randint(0, 2**62, (1,), generator=t.generator).tolist()[0]
        start, seen = 0, 0
        sums = torch.zeros(len(t.task.spec.metrics), device=t.device, dtype=torch.float64)
    else:  # resuming inside this epoch
        order, start, seen = part["order"], part["batch"], part["seen"]
        aug_seed = part.get("aug_seed")  # None in an older checkpoint: drawn now
        sums = part["sums"].to(t.device)
    batches = t.task.train_batches(t.data.train, cfg.batch_size, t.generator, t.train_pre,
                                   cfg.drop_last, order, start, t.ranks.shard, aug_seed)
    ipe = t.plan.iters_per_epoch
    steps = min(ipe, total - (epoch - 1) * ipe)  # this epoch's steps in the plan
    progress = Progress(cfg.progress if t.ranks.is_main else "none", steps, start, seen,
                        extra=getattr(batches, "describe", None), unit=t.task.spec.unit)
    i, clock = start, time.perf_counter()
    for i, (x, y) in enumerate(batches, start=start + 1):
        t.last_lr = t.current_lr()  # before the scheduler moves on to the next step's
        loss, output = t.step(x, y)
        t.scheduler.step()
        t.iteration += 1
        step_sums = t.task.train_sums(loss, output, y)  # on the device: no host sync
        count = t.task.count(y)
        sums += step_sums
        seen += count
        if cfg.eval_every_steps:
            t.window.add(step_sums, count)
        if t.plan.due_after_iter(t.iteration):
            t._update_averages()
        if t.snapshots is not None and t.snapshots.due_after_iter(t.iteration):
            t._snapshot()
        if t.posthoc_ema is not None:
            t._posthoc_ema_step()
        stop = False
        if t.iteration % t.log_every == 0:
            # The one sync every log_every steps: the logged loss, also a divergence check;
            # under DDP the mean over the ranks, with the ranks' preemption flags.
            last, stop = t.ranks.loss_and_stop(loss, t.signalled)
            t._check_finite(last, epoch)
            t.loggers.log_step(t.iteration, {"train/loss": last, "lr": t.last_lr})
        progress.update(epoch, epochs_of(t), i, sums[0], seen)
        position = {"order": order, "batch": i, "seen": seen, "sums": sums,
                    "aug_seed": aug_seed}
        if t.iteration < total and i < ipe:  # cadences in steps, inside the epoch
            now = time.perf_counter()
            t.window.seconds += now - clock
            clock = now + _inside_epoch(t, epoch, position)
        if stop or (not t.ranks.distributed and t.signalled):
            progress.close()
            t._preempt(epoch, position)
        if t.iteration >= total:  # a budget in steps ends inside this epoch
            break
    progress.close()
    t.window.seconds += time.perf_counter() - clock
    t.loader_wait = getattr(batches, "wait_fraction", None)
    sums, seen = t.ranks.epoch_sums(sums, seen)
    if steps == ipe:  # a whole epoch (a budget in steps may end inside one)
        if t.plan.due_after_epoch(epoch):
            t._update_averages()
        if t.snapshots is not None and t.snapshots.due_after_epoch(epoch):
            # Before the checkpoint of this epoch: a resume from it finds the snapshot.
            t._snapshot()
    t.images_seen += seen
    # The epoch's one read of the device: a host read per metric sum.
    scores = t.task.summarize([s.item() for s in sums], seen)
    t._check_finite(scores["loss"] if seen else 0.0, epoch)
    return scores


def _inside_epoch(t: Any, epoch: int, position: dict[str, Any]) -> float:
    """An evaluation and a checkpoint due by steps before the end of the epoch; the seconds
    they took (not training time)."""
    cfg = t.cfg
    t0 = time.perf_counter()
    if cfg.eval_every_steps and t.iteration % cfg.eval_every_steps == 0:
        t._evaluation(epoch_at(t, t.iteration), *window_scores(t), t0=t0)
        t.model.train()
    if cfg.checkpoint_every_steps and t.iteration % cfg.checkpoint_every_steps == 0:
        t.save_checkpoint(epoch - 1, partial_with_ranks(t, position),
                          wall=time.perf_counter() - t.run_start)
    seconds = time.perf_counter() - t0
    t.paused += seconds
    return seconds
