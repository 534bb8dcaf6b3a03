"""Progress inside an epoch: a live bar in a terminal, or a log line every 30 s for the log
files of cluster jobs."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from swa_research.tasks import TaskMetrics

log = logging.getLogger(__name__)


def eval_line(row: dict[str, Any], spec: TaskMetrics, averages: Sequence[str], epochs: int,
              seconds: float, loader_wait: float | None = None) -> str:
    """The log line of an evaluation: the lr, the epoch's training metrics, then the SGD model's
    and each average's on val and test (the task's metrics; percent metrics with a % sign)."""
    def scores(prefix: str) -> str:
        return " ".join(spec.show(m, row[f"{prefix}_{m}"]) for m in spec.metrics)

    msg = (f"epoch {row['epoch']}/{epochs} it {row['iteration']} lr {row['lr']:.3g} | "
           f"train {scores('train')} | sgd val {scores('sgd_val')} test {scores('sgd_test')}")
    for name in averages:
        if row[f"{name}_n_averaged"]:
            msg += (f" | {name} val {scores(f'{name}_val')} test {scores(f'{name}_test')} "
                    f"(n={row[f'{name}_n_averaged']})")
    msg += f" | {seconds:.1f}s"
    per_s = row.get(f"{spec.unit}_per_s")  # training throughput so far, in the task's unit
    if per_s:
        msg += f", {per_s:,.0f} {spec.unit}/s"
        if row.get("mfu") is not None:  # a model that counts its FLOPs, on a known peak
            msg += f", MFU {100 * row['mfu']:.1f}%"
    if loader_wait is not None:
        msg += f" (loader wait {100 * loader_wait:.0f}% of training)"
    return msg


def start_lines(name: str | None, parameters: int, epochs: int, iters: int, device: Any,
                sizes: tuple[int, int | None, int]) -> str:
    """The line a run starts with: the model, its size, the budget and the data."""
    train, val, test = sizes
    return (f"training {name or 'the model'} ({parameters:,} parameters) for {epochs} "
            f"epoch{'' if epochs == 1 else 's'} of {iters} iterations on {device} ({train} "
            f"train, {val or 0} val, {test} test samples)")


def batch_lines(batch_size: int, grad_accum: int, ranks: int, block: int | None,
                strategy: str = "DDP") -> list[str]:
    """The lines that say how a step's batch is made: across the ranks (``strategy``: DDP,
    FSDP), and (a language model's windows of ``block`` tokens, or trainer.grad_accum) in
    micro-batches."""
    lines = []
    if ranks > 1:
        lines.append(f"{strategy}: {ranks} ranks, global batch {batch_size} "
                     f"({batch_size // ranks} per rank)")
    if block or grad_accum > 1:
        tokens = f" ({batch_size * block:,} tokens)" if block else ""
        lines.append(f"each step: {batch_size} samples{tokens} in {grad_accum} micro-batch(es) "
                     f"of {batch_size // ranks // grad_accum} per rank")
    return lines


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
    ``extra`` adds to both (a streamed data set's ``loader wait 12%``: a starved GPU shows).
    """

    line_every_s = 30.0

    def __init__(self, mode: str, total: int, done: int = 0, seen: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 extra: Callable[[], str] | None = None, unit: str = "images") -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.mode = mode
        self.total = total
        self._clock = clock
        self._t0 = clock()
        # The bar draws at the first update; lines come only after line_every_s.
        self._last = 0.0 if mode == "bar" else self._t0
        self._done0, self._seen0 = done, seen
        self._extra = extra
        self.unit = unit  # what ``seen`` counts: the task's throughput unit

    def _suffix(self) -> str:
        return f", {self._extra()}" if self._extra is not None else ""

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
                         f"{done}/{self.total} loss {loss_sum.item() / max(1, seen):.4f}"
                         f"{self._suffix()}")
        sys.stderr.flush()

    def _line(self, epoch: int, epochs: int, done: int, loss_sum: torch.Tensor,
              seen: int) -> None:
        now = self._clock()
        if now - self._last < self.line_every_s or done >= self.total:
            return  # the epoch's own summary follows its last iteration
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        per_iter = elapsed / max(1, done - self._done0)
        log.info("epoch %d/%d: iteration %d/%d (%d%%), train loss %.4f, %.0f %s/s, "
                 "epoch done in %s%s", epoch, epochs, done, self.total,
                 100 * done // max(1, self.total), loss_sum.item() / max(1, seen),
                 (seen - self._seen0) / elapsed, self.unit, _hms(per_iter * (self.total - done)),
                 self._suffix())

    def close(self) -> None:
        if self.mode == "bar":
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
