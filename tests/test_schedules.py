"""Learning-rate schedules (swa_research.training.optim) and the averaging plan
(swa_research.averaging)."""

from __future__ import annotations

import math

import pytest
import torch

from swa_research.averaging import AveragingPlan
from swa_research.config import ScheduleConfig, SwaConfig, UserError, iterations_per_epoch
from swa_research.training.averages import plan_from_config
from swa_research.training.optim import LRSchedule, build_schedule, build_scheduler


def paper_schedule(epoch: float, lr_init: float, swa_lr: float, swa_start: float,
                   epochs: int, swa: bool) -> float:
    """timgaripov/swa train.py's schedule(epoch), written out independently."""
    t = epoch / (swa_start if swa else epochs)
    lr_ratio = swa_lr / lr_init if swa else 0.01
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - lr_ratio) * (t - 0.5) / 0.4
    else:
        factor = lr_ratio
    return lr_init * factor


def make(schedule: ScheduleConfig, swa: SwaConfig, epochs: int, ipe: int, lr: float
         ) -> tuple[LRSchedule, AveragingPlan]:
    plan = plan_from_config(swa, schedule, epochs, ipe)
    sched = build_schedule(schedule, lr=lr, swa_lr=swa.lr, iters_per_epoch=ipe,
                           total_iters=plan.total_iters, start_iter=plan.start_iter)
    return sched, plan


# --------------------------------------------------------------------------------------------
# constant


def test_constant_switches_to_swa_lr_at_start_iter() -> None:
    sched, _ = make(ScheduleConfig(name="constant"), SwaConfig(lr=5e-4, start=4000), 50, 351,
                    lr=1e-4)
    assert sched.start_iter == 4000
    for i in (0, 1, 2000, 3998, 3999):
        assert sched(i) == 1e-4
    for i in (4000, 4001, 10_000, 17_549):
        assert sched(i) == 5e-4


@pytest.mark.parametrize(("unit", "start"), [("iter", 12), ("iter", 0), ("epoch", 3),
                                            ("epoch", 1), ("epoch", 0), ("iter", 0.5),
                                            ("epoch", 0.5)])
def test_constant_first_average_follows_steps_at_swa_lr_in_both_units(unit: str,
                                                                      start: float) -> None:
    """The lr switch and the first average agree: every step since the last update point (for
    unit epoch: the whole epoch before the first average) ran at swa.lr, and no step before
    the switch did."""
    ipe, epochs = 5, 6
    swa = SwaConfig(lr=0.01, start=start, freq=1, unit=unit)
    plan = plan_from_config(swa, ScheduleConfig(name="constant"), epochs, ipe)
    sched = build_schedule(ScheduleConfig(name="constant"), lr=0.1, swa_lr=0.01,
                           iters_per_epoch=ipe, total_iters=plan.total_iters,
                           start_iter=plan.start_iter, switch_iter=plan.lr_switch_iter)
    points = plan.update_points()
    first_iter = points[0] * ipe if unit == "epoch" else points[0]  # steps 1..first_iter
    window = range(first_iter - ipe, first_iter) if unit == "epoch" else range(first_iter - 1,
                                                                                first_iter)
    assert all(sched(i) == 0.01 for i in window)  # 0-based indices of the steps before it
    switch = plan.lr_switch_iter
    assert all(sched(i) == 0.1 for i in range(switch)) and sched(switch) == 0.01


def test_constant_without_averaging_never_switches() -> None:
    sched, plan = make(ScheduleConfig(name="constant"), SwaConfig(method="none", lr=5e-4,
                                                                   start=10), 50, 351, lr=1e-4)
    assert plan.start_iter is None and sched.start_iter is None
    assert all(sched(i) == 1e-4 for i in range(0, 50 * 351, 97))


# --------------------------------------------------------------------------------------------
# decay_then_constant


def test_decay_then_constant_matches_paper_per_epoch() -> None:
    # The paper's VGG16 run: lr 0.05, swa_lr 0.01, SWA from epoch 161 of 300, 391 iters/epoch.
    ipe = 391
    sched, plan = make(ScheduleConfig(name="decay_then_constant", step_unit="epoch"),
                       SwaConfig(lr=0.01, start=161, freq=1, unit="epoch"), 300, ipe, lr=0.05)
    assert sched.start_iter == 161 * ipe
    for epoch in range(300):
        expected = paper_schedule(epoch, 0.05, 0.01, 161, 300, swa=True)
        for offset in (0, 1, 195, ipe - 1):  # constant within an epoch
            assert sched(epoch * ipe + offset) == pytest.approx(expected, rel=1e-12)
    # A few hand-checked points: flat up to t <= 0.5, swa_lr once t > 0.9 (epoch 145 on).
    assert sched(0) == pytest.approx(0.05)
    assert sched(80 * ipe) == pytest.approx(0.05)  # 80 / 161 < 0.5
    assert sched(81 * ipe) < 0.05
    assert sched(144 * ipe) > 0.01
    assert sched(145 * ipe) == pytest.approx(0.01)
    assert sched(299 * ipe + 390) == pytest.approx(0.01)


def test_decay_then_constant_without_averaging_uses_budget_and_final_ratio() -> None:
    ipe = 391
    sched, _ = make(ScheduleConfig(name="decay_then_constant", step_unit="epoch"),
                    SwaConfig(method="none", lr=0.01, start=161, unit="epoch"), 300, ipe,
                    lr=0.05)
    for epoch in range(300):
        expected = paper_schedule(epoch, 0.05, 0.01, 161, 300, swa=False)
        assert sched(epoch * ipe + 7) == pytest.approx(expected, rel=1e-12)
    # Hand-computed: t = 0.5 -> lr; t = 0.7 -> 1 - 0.99 * 0.5 = 0.505; t >= 0.9 -> 0.01.
    assert sched(150 * ipe) == pytest.approx(0.05)
    assert sched(210 * ipe) == pytest.approx(0.05 * 0.505)
    assert sched(270 * ipe) == pytest.approx(0.0005)
    assert sched(299 * ipe) == pytest.approx(0.0005)


def test_decay_then_constant_iteration_unit_start() -> None:
    # Averaging start given in iterations (the seed's unit): the horizon is a fractional epoch.
    ipe = 351
    sched, _ = make(ScheduleConfig(name="decay_then_constant", step_unit="epoch"),
                    SwaConfig(lr=5e-4, start=4000, unit="iter"), 50, ipe, lr=1e-3)
    for i in range(0, 50 * ipe, 113):
        expected = paper_schedule(i // ipe, 1e-3, 5e-4, 4000 / ipe, 50, swa=True)
        assert sched(i) == pytest.approx(expected, rel=1e-12)


def test_decay_then_constant_per_iteration_uses_fractional_epoch() -> None:
    # lr 0.1, swa_lr 0.05 (ratio 0.5), 10 iterations per epoch, SWA from epoch 10.
    common = dict(lr=0.1, swa_lr=0.05, iters_per_epoch=10, total_iters=200, start_iter=100)
    per_iter = build_schedule(ScheduleConfig(name="decay_then_constant", step_unit="iter"),
                              **common)
    per_epoch = build_schedule(ScheduleConfig(name="decay_then_constant", step_unit="epoch"),
                               **common)
    assert not per_iter.per_epoch and per_epoch.per_epoch
    # i = 65: epoch 6.5, t = 0.65, factor = 1 - 0.5 * 0.15 / 0.4 = 0.8125
    assert per_iter(65) == pytest.approx(0.08125)
    # per epoch: epoch 6, t = 0.6, factor = 1 - 0.5 * 0.1 / 0.4 = 0.875
    assert per_epoch(65) == pytest.approx(0.0875)
    # i = 51: t = 0.51, factor = 1 - 0.5 * 0.01 / 0.4 = 0.9875 (per epoch still t = 0.5: lr)
    assert per_iter(51) == pytest.approx(0.09875)
    assert per_epoch(51) == pytest.approx(0.1)
    assert per_iter(70) == pytest.approx(0.075)
    assert per_iter(50) == pytest.approx(0.1)
    assert per_iter(95) == pytest.approx(0.05)
    assert per_iter(199) == pytest.approx(0.05)
    for i in range(200):
        assert per_iter(i) == pytest.approx(paper_schedule(i / 10, 0.1, 0.05, 10, 20, True))


def test_decay_then_constant_honours_custom_decay_window() -> None:
    sched = build_schedule(
        ScheduleConfig(name="decay_then_constant", step_unit="iter", decay_start=0.2,
                       decay_end=0.6), lr=1.0, swa_lr=0.2, iters_per_epoch=10,
        total_iters=100, start_iter=100)
    assert sched(20) == pytest.approx(1.0)
    assert sched(40) == pytest.approx(0.6)  # halfway through the window: 1 - 0.8 * 0.5
    assert sched(60) == pytest.approx(0.2)
    assert sched(61) == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------
# cyclical


def test_cyclical_hand_computed() -> None:
    # lr 0.1 -> 0.01 over cycles of 4 iterations, from iteration 10.
    sched = build_schedule(ScheduleConfig(name="cyclical", cycle=4), lr=0.1, swa_lr=0.01,
                           iters_per_epoch=5, total_iters=40, start_iter=10)
    for i in range(10):
        assert sched(i) == 0.1
    cycle = [0.0775, 0.055, 0.0325, 0.01]  # (1 - t) * 0.1 + t * 0.01, t = 1/4 .. 4/4
    for k in range(3):
        for j, expected in enumerate(cycle):
            assert sched(10 + 4 * k + j) == pytest.approx(expected, abs=1e-15)
        assert sched(10 + 4 * k + 3) == 0.01  # exactly swa_lr at the end of each cycle


def test_cyclical_without_averaging_starts_at_zero() -> None:
    sched = build_schedule(ScheduleConfig(name="cyclical", cycle=5), lr=1.0, swa_lr=0.5,
                           iters_per_epoch=5, total_iters=20, start_iter=None)
    assert [sched(i) for i in range(6)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.9])


def test_cyclical_cycle_ends_are_averaging_points() -> None:
    sched, plan = make(ScheduleConfig(name="cyclical", cycle=7),
                       SwaConfig(lr=0.01, start=20, unit="iter"), 3, 30, lr=0.1)
    due = [n for n in range(1, 91) if plan.due_after_iter(n)]
    assert due == [27, 34, 41, 48, 55, 62, 69, 76, 83, 90]
    # The step that ends a cycle (0-based iteration n - 1) ran at exactly swa_lr.
    for n in range(21, 91):
        assert plan.due_after_iter(n) == (sched(n - 1) == 0.01)


def test_unknown_schedule_raises() -> None:
    sched = LRSchedule(name="bogus", lr=0.1, swa_lr=0.01, iters_per_epoch=1, total_iters=1,
                       start_iter=None)
    with pytest.raises(ValueError, match="bogus"):
        sched(0)


# --------------------------------------------------------------------------------------------
# LambdaLR


@pytest.mark.parametrize("name,step_unit,start", [
    ("constant", "epoch", 13),
    ("decay_then_constant", "epoch", 40),
    ("decay_then_constant", "iter", 40),
    ("cyclical", "epoch", 9),
])
def test_lambda_lr_follows_schedule(name: str, step_unit: str, start: int) -> None:
    sched = build_schedule(ScheduleConfig(name=name, step_unit=step_unit, cycle=6), lr=0.2,
                           swa_lr=0.03, iters_per_epoch=5, total_iters=60, start_iter=start)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.2)
    scheduler = build_scheduler(opt, sched)
    seen = []
    for k in range(60):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(sched(k), rel=1e-12), k
        seen.append(lr)
        param.grad = torch.ones(2)
        opt.step()
        scheduler.step()
    assert len(set(round(v, 12) for v in seen)) > 1  # the lr did change
    # The position is in the state dict: a fresh scheduler picks up where this one stopped.
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.2)
    scheduler2 = build_scheduler(opt2, sched)
    scheduler2.load_state_dict(scheduler.state_dict())
    assert scheduler2.last_epoch == 60


# --------------------------------------------------------------------------------------------
# AveragingPlan


def test_seed_experiment_plan() -> None:
    ipe = iterations_per_epoch(45_000, 128, drop_last=True)
    assert ipe == 351
    plan = plan_from_config(SwaConfig(method="swa", start=4000, freq=50, unit="iter"),
                                     ScheduleConfig(name="constant"), 50, ipe)
    assert plan.start == 4000 and plan.start_iter == 4000 and plan.total_iters == 17_550
    due = [n for n in range(1, plan.total_iters + 1) if plan.due_after_iter(n)]
    assert len(due) == 271
    assert due[0] == 4050 and due[-1] == 17_550
    assert all(n % 50 == 0 for n in due)
    assert not plan.due_after_iter(4000)
    assert plan.count_updates() == 271
    assert not any(plan.due_after_epoch(e) for e in range(1, 51))


def test_epoch_unit_plan_paper() -> None:
    plan = plan_from_config(SwaConfig(method="swa", start=161, freq=1, unit="epoch"),
                                     ScheduleConfig(name="decay_then_constant"), 300, 391)
    assert plan.start == 161 and plan.start_iter == 161 * 391
    assert not plan.due_after_epoch(160)
    assert plan.due_after_epoch(161)
    assert plan.due_after_epoch(300)
    due = [e for e in range(1, 301) if plan.due_after_epoch(e)]
    assert due[0] == 161 and len(due) == 140
    assert plan.count_updates() == 140
    assert not any(plan.due_after_iter(n) for n in range(1, 300 * 391 + 1, 17))


def test_epoch_unit_plan_with_freq() -> None:
    plan = plan_from_config(SwaConfig(method="swa", start=161, freq=2, unit="epoch"),
                                     ScheduleConfig(name="decay_then_constant"), 300, 391)
    due = [e for e in range(1, 301) if plan.due_after_epoch(e)]
    assert due == list(range(161, 301, 2))
    assert plan.count_updates() == 70


def test_fractional_start_is_a_share_of_the_budget() -> None:
    plan = plan_from_config(SwaConfig(start=0.5, unit="iter", freq=50),
                                     ScheduleConfig(), 50, 351)
    assert plan.start == 8775 and plan.start_iter == 8775  # half of 17550
    plan = plan_from_config(SwaConfig(start=0.5, unit="epoch", freq=1),
                                     ScheduleConfig(), 300, 391)
    assert plan.start == 150 and plan.start_iter == 150 * 391
    assert plan.count_updates() == 151  # epochs 150..300
    plan = plan_from_config(SwaConfig(start=0.75, unit="epoch", freq=1),
                                     ScheduleConfig(), 200, 10)
    assert plan.start == 150


def test_cyclical_plan_averages_at_cycle_ends() -> None:
    plan = plan_from_config(SwaConfig(start=100, unit="iter", freq=50),
                                     ScheduleConfig(name="cyclical", cycle=30), 2, 100)
    assert [n for n in range(1, 201) if plan.due_after_iter(n)] == [130, 160, 190]
    assert plan.count_updates() == 3
    # unit epoch: the start is an epoch, the cycles still count iterations.
    plan = plan_from_config(SwaConfig(start=1, unit="epoch", freq=1),
                                     ScheduleConfig(name="cyclical", cycle=50), 3, 100)
    assert plan.start_iter == 100
    assert [n for n in range(1, 301) if plan.due_after_iter(n)] == [150, 200, 250, 300]
    assert not any(plan.due_after_epoch(e) for e in range(1, 4))
    assert plan.count_updates() == 4


def test_method_none_is_never_due() -> None:
    for unit, schedule in (("iter", "constant"), ("epoch", "decay_then_constant"),
                           ("iter", "cyclical")):
        plan = plan_from_config(SwaConfig(method="none", start=2, freq=1, unit=unit),
                                         ScheduleConfig(name=schedule, cycle=3), 5, 10)
        assert not plan.enabled and plan.start_iter is None
        assert not any(plan.due_after_iter(n) for n in range(1, 51))
        assert not any(plan.due_after_epoch(e) for e in range(1, 6))
        assert plan.count_updates() == 0


def test_start_beyond_budget_counts_no_updates() -> None:
    plan = plan_from_config(SwaConfig(start=20_000, freq=50), ScheduleConfig(), 50, 351)
    assert plan.count_updates() == 0
    plan = plan_from_config(SwaConfig(start=17_500, freq=50), ScheduleConfig(), 50, 351)
    assert plan.count_updates() == 1  # only 17550


def test_the_closed_form_plan_equals_the_walk_through_the_budget() -> None:
    """count_updates and first_update (arithmetic, any budget) against update_points (a walk
    through every epoch) over iter, epoch and cyclical plans, starts below 1 and beyond."""
    import itertools

    for unit, start, freq, cyc, epochs, ipe in itertools.product(
            ["iter", "epoch"], [0, 0.5, 1, 3, 7, 40], [1, 2, 5], [None, 4], [1, 3, 6], [1, 5]):
        swa = SwaConfig(method="swa", unit=unit, start=start, freq=freq)
        sched = ScheduleConfig(name="cyclical" if cyc else "constant", cycle=cyc or 100)
        plan = plan_from_config(swa, sched, epochs, ipe)
        points = plan.update_points()
        assert plan.count_updates() == len(points), (unit, start, freq, cyc, epochs, ipe)
        assert plan.first_update() == (points[0] if points else None)


def test_a_huge_budget_is_planned_at_once_or_refused() -> None:
    import time

    from conftest import compose_config

    from swa_research.config import UserError
    from swa_research.training.averages import check_budget
    from swa_research.training.build import load_config

    t = time.perf_counter()
    c = load_config(compose_config(["experiment=smoke", "trainer.epochs=1000000000"]))
    check_budget(c, 14)  # 1.4e10 iterations
    assert plan_from_config(c.swa, c.schedule, c.trainer.epochs, 14).count_updates() \
        == (14 * 10**9 - int(0.75 * 14 * 10**9)) // 2
    assert time.perf_counter() - t < 5
    with pytest.raises(UserError, match=r"^trainer.epochs=10000000000000: at most 1,000,000,000"):
        load_config(compose_config(["experiment=smoke", "trainer.epochs=10000000000000"]))
    with pytest.raises(UserError, match=r"^seed=99999999999999999999: must be an integer in "
                                        r"\[0, 2\^63\)"):
        load_config(compose_config(["experiment=smoke", "seed=99999999999999999999"]))
    with pytest.raises(UserError, match=r"^seed=-1"):
        load_config(compose_config(["experiment=smoke", "seed=-1"]))


def test_an_empty_plan_blames_freq_when_the_start_is_inside_the_budget() -> None:
    from conftest import compose_config

    from swa_research.config import UserError
    from swa_research.training.averages import check_budget
    from swa_research.training.build import load_config

    c = load_config(compose_config(["experiment=smoke", "swa.freq=100000"]))
    with pytest.raises(UserError) as e:
        check_budget(c, 14)
    assert str(e.value) == ("swa.freq=100000: no averaging point between the start (iter 42) "
                            "and the end of the budget (56 iterations, trainer.epochs=4); "
                            "lower it below 14")
    c = load_config(compose_config(["experiment=smoke", "swa.start=100"]))
    with pytest.raises(UserError, match=r"^swa.start=100 is beyond the training budget"):
        check_budget(c, 14)


def nanogpt_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """karpathy/nanoGPT train.py's get_lr, as written there."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    decay_ratio = (it - warmup) / (decay_iters - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (lr - min_lr)


def test_warmup_cosine_is_nanogpts_schedule_step_by_step() -> None:
    cfg = ScheduleConfig(name="warmup_cosine", warmup=100, final_ratio=0.1)
    sched = build_schedule(cfg, lr=1e-3, swa_lr=5e-4, iters_per_epoch=50, total_iters=5000,
                           start_iter=2500)
    for i in range(5000):
        assert sched(i) == pytest.approx(nanogpt_lr(i, 1e-3, 1e-4, 100, 5000), rel=1e-12), i
    assert sched(4999) == pytest.approx(1e-4, rel=1e-5)


def reference_wsd(n_iterations: int, final_lr_factor: float, n_warmup: int,
                  fract_decay: float, decay_type: str, init_div_factor: float = 100):
    """epfml/schedules-and-scaling src/optim/utils.py ``wsd_schedule``, written out
    independently ("sqrt" is the project's 1-sqrt); the factor of step ``step`` (from 0)."""
    n_anneal_steps = int(fract_decay * n_iterations)
    n_hold = n_iterations - n_anneal_steps

    def schedule(step: int) -> float:
        if step < n_warmup:
            return (step / n_warmup) + (1 - step / n_warmup) / init_div_factor
        if step < n_hold:
            return 1.0
        if step < n_iterations:
            frac = (step - n_hold) / n_anneal_steps
            shape = frac if decay_type == "linear" else math.sqrt(frac)
            return final_lr_factor + (1 - final_lr_factor) * (1 - shape)
        return final_lr_factor

    return schedule


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
@pytest.mark.parametrize(("total", "warmup", "cooldown", "final"),
                         [(1000, 50, 0.2, 0.0), (997, 13, 0.15, 0.1), (40, 0, 0.33, 0.0)])
def test_wsd_is_the_references_step_for_step(shape: str, total: int, warmup: int,
                                             cooldown: float, final: float) -> None:
    cfg = ScheduleConfig(name="wsd", warmup=warmup, cooldown=cooldown, cooldown_shape=shape,
                         final_ratio=final)
    sched = build_schedule(cfg, lr=0.01, swa_lr=0.001, iters_per_epoch=10, total_iters=total,
                           start_iter=None)
    ref = reference_wsd(total, final, warmup, cooldown, "linear" if shape == "linear" else "sqrt")
    for i in range(total):
        assert sched(i) == pytest.approx(0.01 * ref(i), rel=1e-12, abs=1e-18), i
    # The last step still trains; the cooldown's length truncates (0.33 x 40 = 13 steps).
    assert sched(total - 1) > 0.01 * final
    if warmup:
        assert sched(0) == pytest.approx(0.01 / 100)  # init_div_factor
    if total == 40:
        assert [i for i in range(total) if sched(i) < 0.01][0] == 40 - 13 + 1


def test_a_schedule_that_cannot_happen_in_the_budget_is_refused() -> None:
    from swa_research.training.optim import check_schedule

    budget = "trainer.epochs=2 x 8 an epoch"
    with pytest.raises(UserError, match=r"^schedule.warmup=1000: the warm-up is not shorter "
                                        r"than the run \(16 iterations: trainer.epochs=2 x 8"):
        check_schedule(ScheduleConfig(name="warmup_cosine", warmup=1000), 16, budget)
    with pytest.raises(UserError, match=r"^schedule.warmup=130 and schedule.cooldown=0.2: the "
                                        r"warm-up runs into the cooldown, which starts at "
                                        "iteration 128 of 160"):
        check_schedule(ScheduleConfig(name="wsd", warmup=130, cooldown=0.2), 160, budget)
    with pytest.raises(UserError, match=r"^schedule.cooldown=0.01: 0.01 of 16 iterations is no "
                                        "step"):
        check_schedule(ScheduleConfig(name="wsd", warmup=0, cooldown=0.01), 16, budget)
    check_schedule(ScheduleConfig(name="wsd", warmup=10, cooldown=0), 16, budget)  # no cooldown
    check_schedule(ScheduleConfig(name="wsd", warmup=8, cooldown=0.5), 16, budget)


def test_a_run_with_an_impossible_warmup_stops_before_training(tmp_path) -> None:
    from conftest import TINY, compose_config

    from swa_research.training.build import train

    with pytest.raises(UserError, match=r"^schedule.warmup=1000: "):
        train(compose_config([*TINY, "schedule=warmup_cosine", "schedule.warmup=1000"]),
              tmp_path)
    assert not (tmp_path / "metrics.json").exists() or "finished" not in \
        (tmp_path / "metrics.json").read_text()


def test_warmup_constant_and_the_scheduler_follow_the_schedule() -> None:
    cfg = ScheduleConfig(name="warmup_constant", warmup=10)
    sched = build_schedule(cfg, lr=0.1, swa_lr=0.01, iters_per_epoch=5, total_iters=40,
                           start_iter=20)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(opt, sched)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * (i + 1) / 11 for i in range(10)] + [0.1] * 30)


def test_the_schedule_plot_draws_every_step_or_an_even_stride_with_the_last(tmp_path) -> None:
    from swa_research.tracking.plots import plot_schedule, schedule_points

    cfg = ScheduleConfig(name="wsd", warmup=10, cooldown=0.2, cooldown_shape="1-sqrt",
                         final_ratio=0.0)
    sched = build_schedule(cfg, lr=1e-3, swa_lr=1e-3, iters_per_epoch=50, total_iters=1000,
                           start_iter=500)
    xs, ys = schedule_points(sched, 1000)
    assert xs == list(range(1000)) and ys == [sched(i) for i in range(1000)]
    xs, ys = schedule_points(sched, 1000, max_points=300)  # stride 4, the last step added
    assert xs[:3] == [0, 4, 8] and xs[-1] == 999 and len(xs) == 251
    assert ys == [sched(i) for i in xs] and 0 < ys[-1] < ys[-2]  # the cooldown's last step
    assert schedule_points(sched, 0) == ([], [])
    path = plot_schedule(sched, 1000, 50, tmp_path / "lr.png", averaging_start=500)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
