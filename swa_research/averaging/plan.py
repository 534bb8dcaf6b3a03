"""When the averages are updated: a pure function of the iteration (the framework builds its
plan from the config in :mod:`swa_research.training.averages`; a library user with
:func:`~swa_research.averaging.make_plan`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AveragingPlan:
    """When the average is updated.

    unit iter (torchcontrib's SWA, the seed): after the n-th step (n counted from 1) when
      n > start and n % freq == 0. The lr phase starts at iteration ``start``.
    unit epoch (timgaripov/swa): after the E-th epoch (E counted from 1) when E >= start and
      (E - start) % freq == 0. The lr phase (the schedule's horizon) is ``start`` epochs.
    cyclical schedule: at the end of every cycle after the start, whatever the unit.
    fge schedule: at the middle of every cycle of ``schedule.fge_cycle`` epochs after the start
      (the lr's low point: timgaripov/dnn-mode-connectivity fge.py collects after the epochs
      where epoch % cycle + 1 == cycle / 2, counted from the start), whatever the unit.
    """

    method: str  # the primary average's method, or none
    unit: str
    start: int  # resolved to iterations (unit iter) or epochs (unit epoch)
    freq: int
    iters_per_epoch: int
    epochs: int
    cycle: int | None = None  # iterations per cycle: set for the cyclical and fge schedules
    phase: int | None = None  # the first point's distance from the start (None: a cycle)
    steps: int = 0  # a budget in steps (trainer.max_steps), else 0: epochs x iters_per_epoch

    @property
    def first_offset(self) -> int:
        """Iterations from the start to the first point of a cyclical plan."""
        return self.cycle if self.phase is None else self.phase  # type: ignore[return-value]

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def total_iters(self) -> int:
        return self.steps or self.epochs * self.iters_per_epoch

    @property
    def whole_epochs(self) -> int:
        """The budget's complete epochs (a budget in steps may end inside one)."""
        return self.total_iters // self.iters_per_epoch

    @property
    def start_iter(self) -> int | None:
        """First iteration of the averaging phase, for the lr schedule; None when off."""
        if not self.enabled:
            return None
        return self.start * self.iters_per_epoch if self.unit == "epoch" else self.start

    @property
    def lr_switch_iter(self) -> int | None:
        """Where the constant schedule switches to swa.lr: so that the first average is taken
        after steps at swa.lr in either unit. unit iter: iteration ``start`` (the first average
        follows a step n > start). unit epoch: the first iteration of epoch ``start`` (counted
        from 1), whose end gives the first average, as in the paper's code, where the averaged
        epochs are trained at the SWA lr."""
        if not self.enabled:
            return None
        if self.unit == "epoch" and self.cycle is None:
            return max(0, self.start - 1) * self.iters_per_epoch
        return self.start_iter

    def due_after_iter(self, n: int) -> bool:
        if not self.enabled:
            return False
        if self.cycle is not None:
            k = n - (self.start_iter or 0) - self.first_offset
            return k >= 0 and k % self.cycle == 0
        return self.unit == "iter" and n > self.start and n % self.freq == 0

    def due_after_epoch(self, epoch: int) -> bool:
        if not self.enabled or self.cycle is not None or self.unit != "epoch":
            return False
        return epoch >= self.start and (epoch - self.start) % self.freq == 0

    def update_points(self) -> list[int]:
        """When the average is updated: the iterations (unit iter, cyclical) or epochs (unit
        epoch) after which it is, in order."""
        points = []
        for e in range(1, self.epochs + 1):
            if self.cycle is not None or self.unit == "iter":
                lo = (e - 1) * self.iters_per_epoch + 1
                hi = min(e * self.iters_per_epoch, self.total_iters)
                points.extend(n for n in range(lo, hi + 1) if self.due_after_iter(n))
            if e <= self.whole_epochs and self.due_after_epoch(e):
                points.append(e)
        return points

    def _arithmetic(self) -> tuple[int, int, int]:
        """The update points as (first, step, count), in closed form (no walk through the
        budget: a budget of 10^13 epochs is planned at once)."""
        if not self.enabled:
            return 0, 1, 0
        if self.cycle is not None:
            first = (self.start_iter or 0) + self.first_offset
            count = max(0, (self.total_iters - first) // self.cycle + 1) \
                if first <= self.total_iters else 0
            return first, self.cycle, count
        if self.unit == "iter":  # n > start, n % freq == 0, n <= total
            first = (self.start // self.freq + 1) * self.freq
            count = max(0, self.total_iters // self.freq - self.start // self.freq)
            return first, self.freq, count
        first = self.start if self.start >= 1 else self.start + -(-(1 - self.start)
                                                                   // self.freq) * self.freq
        last = self.whole_epochs
        count = max(0, (last - first) // self.freq + 1) if first <= last else 0
        return first, self.freq, count

    def count_updates(self) -> int:
        return self._arithmetic()[2]

    def first_update(self) -> int | None:
        """The first update point (iteration or epoch, as update_points), None if none."""
        first, _, count = self._arithmetic()
        return first if count else None
