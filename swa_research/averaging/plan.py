"""When the averages are updated (a pure function of the iteration), and the check that
the averaging fits in the training budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from swa_research.config import Config, ScheduleConfig, SwaConfig, UserError

log = logging.getLogger(__name__)


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

    @classmethod
    def from_config(cls, swa: SwaConfig, schedule: ScheduleConfig, epochs: int,
                    iters_per_epoch: int, max_steps: int = 0) -> AveragingPlan:
        """``max_steps`` > 0: the budget in steps (``epochs`` then the epochs it takes)."""
        if max_steps:
            epochs = -(-max_steps // iters_per_epoch)
        budget = (max_steps // iters_per_epoch if max_steps else epochs) if swa.unit == "epoch" \
            else (max_steps or epochs * iters_per_epoch)
        start = int(round(swa.start * budget)) if swa.start < 1.0 else int(round(swa.start))
        cycle = phase = None
        if schedule.name == "cyclical":
            cycle = schedule.cycle
        elif schedule.name == "fge":
            cycle = schedule.fge_cycle * iters_per_epoch
            phase = cycle // 2
        return cls(method=swa.method, unit=swa.unit, start=start, freq=swa.freq,
                   iters_per_epoch=iters_per_epoch, epochs=epochs, cycle=cycle, phase=phase,
                   steps=max_steps)

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


def check_budget(cfg: Config, iters_per_epoch: int) -> None:
    """Checks that need the data set's size: the averaging must fit in the budget."""
    if iters_per_epoch < 1:
        raise UserError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training set "
            "(drop_last leaves no batch)")
    steps = cfg.trainer.max_steps
    if steps and cfg.swa.unit == "epoch" and cfg.swa.method != "none" and \
            steps % iters_per_epoch:
        raise UserError(
            f"swa.unit=epoch counts whole epochs, and trainer.max_steps={steps} ends inside "
            f"epoch {steps // iters_per_epoch + 1} ({iters_per_epoch} steps an epoch): set "
            f"swa.unit=iter (swa.start and swa.freq in steps), or max_steps to a multiple of "
            f"{iters_per_epoch}")
    if cfg.swa.method == "none":
        return
    plan = AveragingPlan.from_config(cfg.swa, cfg.schedule, cfg.trainer.epochs, iters_per_epoch,
                                     steps)
    count, first = plan.count_updates(), plan.first_update()
    budget = plan.whole_epochs if cfg.swa.unit == "epoch" else plan.total_iters
    given = f"trainer.max_steps={steps}" if steps else f"trainer.epochs={cfg.trainer.epochs}"
    if not count and plan.start < budget:
        unit = "epochs" if cfg.swa.unit == "epoch" else "iterations"
        room = budget - plan.start  # in swa.unit
        if cfg.schedule.name == "fge":
            # The user's key counts epochs; the first model comes half a cycle after the start.
            room_epochs = room if cfg.swa.unit == "epoch" else room // iters_per_epoch
            raise UserError(
                f"schedule.fge_cycle={cfg.schedule.fge_cycle}: FGE collects its first model "
                f"half a cycle ({cfg.schedule.fge_cycle // 2} epochs) after the start "
                f"({cfg.swa.unit} {plan.start}), beyond the end of the budget "
                f"({given}); set schedule.fge_cycle to an even "
                f"number of at most {2 * room_epochs} epochs, or move swa.start earlier")
        what = f"schedule.cycle={plan.cycle}" if plan.cycle is not None else \
            f"swa.freq={cfg.swa.freq}"
        raise UserError(
            f"{what}: no averaging point between the start ({cfg.swa.unit} {plan.start}) and "
            f"the end of the budget ({budget} {unit}, {given}); "
            f"lower it below {room}")
    if not count:
        unit = "epochs" if cfg.swa.unit == "epoch" else "iterations"
        raise UserError(
            f"swa.start={cfg.swa.start:g} is beyond the training budget of {budget} {unit} "
            f"({given}): no weights would be averaged; give the "
            "start as a fraction of the budget, e.g. swa.start=0.75")
    if count == 1 and plan.cycle is None:
        # An average of one point is that checkpoint (with recomputed BN statistics): almost
        # always a swa.freq meant for a longer run, e.g. the group's 50 with swa.unit=epoch.
        unit = "epoch" if cfg.swa.unit == "epoch" else "iteration"
        log.warning("swa.freq=%d with swa.unit=%s averages only once in this run (after %s %d "
                    "of %d): the 'average' is that one checkpoint; lower swa.freq to average "
                    "more", cfg.swa.freq, cfg.swa.unit, unit, first, budget)
