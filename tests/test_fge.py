"""FGE (swa=fge): the reference's cyclical lr and collection points step by step, the ensemble's
prediction as the mean of its members' probabilities, its memory check, and a run that reports
FGE beside SGD and SWA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config
from torch import nn

from swa_research.averaging import METHODS
from swa_research.averaging.fge import FGE
from swa_research.config import ScheduleConfig, SwaConfig, UserError, to_config, validate
from swa_research.data import ImageSet, Preprocess
from swa_research.training.averages import plan_from_config
from swa_research.training.build import train
from swa_research.training.evaluator import eval_sets
from swa_research.training.optim import build_schedule


def reference_lr(epoch: int, it: int, ipe: int, start: int, epochs: int, cycle: int,
                 lr_init: float, lr_1: float, lr_2: float) -> float:
    """dnn-mode-connectivity, written out independently: train.py's learning_rate_schedule with
    --epochs the budget, stopped at its checkpoint of epoch ``start`` (README: checkpoint-160 of
    200), then fge.py's utils.cyclic_learning_rate(epoch, cycle, lr_1, lr_2)(iter / num_iters)
    for the FGE epochs counted from 0. ``epoch`` counts from 0 here; train.py's loop counts
    from 1 (``for epoch in range(start_epoch, args.epochs + 1)`` with start_epoch 1), so our
    epoch e is its epoch e + 1."""
    if epoch < start:
        alpha = (epoch + 1) / epochs
        factor = 1.0 if alpha <= 0.5 else (1.0 - (alpha - 0.5) / 0.4 * 0.99 if alpha <= 0.9
                                           else 0.01)
        return lr_init * factor
    t = (((epoch - start) % cycle) + it / ipe) / cycle
    if t < 0.5:
        return lr_1 * (1.0 - 2.0 * t) + lr_2 * 2.0 * t
    return lr_1 * (2.0 * t - 1.0) + lr_2 * (2.0 - 2.0 * t)


@pytest.mark.parametrize(("cycle", "start"), [(2, 6), (4, 5)])
def test_fges_lr_and_collection_points_are_the_references_step_by_step(cycle: int,
                                                                       start: int) -> None:
    ipe, epochs = 7, 14
    sched_cfg = ScheduleConfig(name="fge", fge_cycle=cycle, fge_lr_high=0.05)
    swa = SwaConfig(method="swa", also=["fge"], lr=5e-4, start=start, unit="epoch")
    plan = plan_from_config(swa, sched_cfg, epochs, ipe)
    sched = build_schedule(sched_cfg, lr=0.1, swa_lr=5e-4, iters_per_epoch=ipe,
                           total_iters=epochs * ipe, start_iter=plan.start_iter)
    for i in range(epochs * ipe):
        want = reference_lr(i // ipe, i % ipe, ipe, start, epochs, cycle, 0.1, 0.05, 5e-4)
        assert sched(i) == pytest.approx(want, rel=1e-12, abs=1e-15), i
    # fge.py collects after the FGE epoch k (from 0) with k % cycle + 1 == cycle // 2: the end of
    # the global epoch start + k + 1, at the lr's low point.
    ref = [(start + k + 1) * ipe for k in range(epochs - start) if k % cycle + 1 == cycle // 2]
    assert plan.update_points() == ref and plan.count_updates() == len(ref)
    assert plan.first_update() == ref[0]
    for n in ref:  # collected going down, one step before the cycle's lowest lr (swa.lr)
        assert sched(n - 1) < sched(n - 2) and sched(n) == pytest.approx(5e-4)


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8),
                                  nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def probs_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(x), dim=-1)


def test_the_ensemble_predicts_the_mean_of_its_members_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=g)
    data = ImageSet(images, torch.randint(0, 5, (40,), generator=g))
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, torch.device("cpu"))
    x = pre.to_float(images)
    members = [Net(s) for s in range(4)]
    for m in members:  # BN statistics of their own, which the ensemble keeps
        m.train()
        m(torch.randn(16, 3, 4, 4) * (1 + members.index(m)))
    fge = FGE(members[0], max_models=3)
    sets = {"test": data, "val": None}
    for k, m in enumerate(members[:3], start=1):
        fge.update(m)
        got = fge.collect_probs(eval_sets(sets, pre, 16), lambda: iter(()), seed=0)["test"]
        want = torch.stack([probs_of(n, x) for n in members[:k]]).mean(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The fourth pushes out the first (max_models=3): the latest three.
    fge.update(members[3])
    got = fge.collect_probs(eval_sets(sets, pre, 16), lambda: iter(()), seed=0)["test"]
    want = torch.stack([probs_of(n, x) for n in members[1:]]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (fge.n_averaged, fge.collected) == (3, 4)
    torch.testing.assert_close(torch.softmax(fge.predict(x), -1), want, rtol=1e-5, atol=1e-6)
    # A resumed ensemble sums again from its members: the same probabilities.
    again = FGE(members[0], max_models=3)
    again.load_state_dict(fge.state_dict())
    probs = again.collect_probs(eval_sets(sets, pre, 16), lambda: iter(()), 0)["test"]
    torch.testing.assert_close(probs, got)


def test_the_members_memory_is_checked_before_training() -> None:
    with pytest.raises(ValueError, match=r"^max_models=1000: FGE keeps up to 1000 copies of "
                                         r"the model, .* GiB are free; lower max_models$"):
        FGE(Net(0), max_models=1000, available=1 << 20)
    assert METHODS["fge"] is FGE


def test_swa_fge_selects_its_schedule_and_refuses_an_odd_cycle() -> None:
    cfg = compose_config(["swa=fge"])
    assert (cfg.schedule.name, cfg.swa.method, list(cfg.swa.also)) == ("fge", "swa", ["fge"])
    assert compose_config(["swa=fge", "schedule=constant"]).schedule.name == "constant"
    with pytest.raises(UserError, match=r"schedule.fge_cycle=3: an even number of epochs"):
        validate(to_config(compose_config(["swa=fge", "schedule.fge_cycle=3"])))


def test_a_run_reports_fge_beside_sgd_and_swa(tmp_path: Path) -> None:
    """Six epochs, FGE from epoch 2 with cycles of 2: members after epochs 3 and 5; SWA
    averages the same two points."""
    m = train(compose_config([*TINY, "swa=fge", "trainer.epochs=6", "swa.start=2",
                              "schedule.fge_cycle=2", "optimizer=sgd", "optimizer.lr=0.05",
                              "schedule.fge_lr_high=0.05", "swa.lr=0.005"]), tmp_path)
    assert m["status"] == "finished" and m["averages"] == ["swa", "fge"]
    assert (m["fge"]["n_averaged"], m["fge"]["collected"]) == (2, 2)
    assert m["swa"]["n_averaged"] == 2
    for key in ("test_acc", "test_loss", "val_acc"):
        assert m["fge"][key] is not None
    assert {"nll", "ece"} <= set(m["calibration"]["fge"])
    rows = (tmp_path / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"fge_test_acc", "fge_val_loss", "fge_n_averaged"} <= set(header)
    n = [r.split(",")[header.index("fge_n_averaged")] for r in rows[1:]]
    assert n == ["0", "0", "1", "1", "2", "2"]
    saved = torch.load(tmp_path / "fge.pt", weights_only=False)
    assert len(saved["members"]) == 2 and saved["method"] == "fge"


def test_a_run_starts_from_init_weights_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    """trainer.init_weights: the first evaluation (eval_at_start) is the source run's final
    SGD model's."""
    source = train(compose_config([*TINY, "trainer.epochs=1"]), tmp_path / "source")
    m = train(compose_config([*TINY, "trainer.epochs=1", "trainer.eval_at_start=true",
                              f"trainer.init_weights={tmp_path / 'source' / 'sgd_final.pt'}"]),
              tmp_path / "tuned")
    first = (tmp_path / "tuned" / "history.csv").read_text().splitlines()
    row = dict(zip(first[0].split(","), first[1].split(","), strict=True))
    assert float(row["sgd_test_acc"]) == pytest.approx(source["sgd"]["test_acc"], abs=1e-9)
    assert m["status"] == "finished"
    with pytest.raises(UserError, match=r"trainer.init_weights=.*missing.pt: no such file"):
        train(compose_config([*TINY, f"trainer.init_weights={tmp_path / 'missing.pt'}"]),
              tmp_path / "bad")
    other = tmp_path / "source" / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(UserError, match=r"trainer.init_weights=.*other.pt: does not fit the "
                                        "model"):
        train(compose_config([*TINY, f"trainer.init_weights={other}"]), tmp_path / "bad2")


FGE_PRESETS = [f"paper_fge/{m}_{d}" for m in ("vgg16", "preresnet164", "wrn28x10")
               for d in ("cifar10", "cifar100")]


@pytest.mark.parametrize("preset", FGE_PRESETS)
def test_the_fge_presets_are_the_references_recipe(preset: str) -> None:
    """train.py over 200 epochs to its checkpoint 160, then fge.py's cycles of 2 epochs:
    20 models collected, at the end of epochs 161, 163, ..., 199."""
    from swa_research.analysis import paper
    from swa_research.config import flatten_dict
    from swa_research.training.averages import check_budget
    from swa_research.training.build import config_dict_of, load_config

    ipe = 391
    config = load_config(compose_config([f"experiment={preset}"]))
    check_budget(config, ipe)
    flat = flatten_dict(config_dict_of(config))
    recipe, run = paper.classify(flat)
    assert run == "fge" and paper.recipe_differences(flat) == []
    assert paper.recipe_label(flat) == paper.PAPER_RECIPE
    assert paper.parse_preset(preset) == (recipe.model, recipe.dataset, "fge")
    s, sw = config.schedule, config.swa
    lr, wd, lr_1, lr_2 = {"vgg16": (0.05, 5e-4, 0.01, 0.01),
                          "preresnet164": (0.1, 3e-4, 0.05, 0.01),
                          "wrn28x10": (0.1, 5e-4, 0.05, 0.01)}[recipe.model]
    assert (config.optimizer.lr, config.optimizer.weight_decay, s.fge_lr_high, sw.lr) == (
        lr, wd, lr_1, lr_2)
    plan = plan_from_config(sw, s, config.trainer.epochs, ipe)
    assert plan.update_points() == [e * ipe for e in range(161, 200, 2)]
    assert sw.max_models == plan.count_updates() == 20 and list(sw.also) == ["fge"]
    sched = build_schedule(s, lr, lr_2, ipe, plan.total_iters, plan.start_iter)
    for e in range(200):
        want = reference_lr(e, 0, ipe, 160, 200, 2, lr, lr_1, lr_2)
        assert sched(e * ipe) == pytest.approx(want, rel=1e-12), e
    # train.py's epoch 160 (alpha 0.8), the checkpoint FGE starts from: 1 - 0.3 / 0.4 x 0.99.
    assert sched(159 * ipe) == pytest.approx(lr * 0.2575, rel=1e-12)


def test_an_fge_run_measures_the_fge_cell_against_the_published_figure() -> None:
    from swa_research.analysis import paper
    from swa_research.config import flatten_dict
    from swa_research.training.build import config_dict_of, load_config

    flat = flatten_dict(config_dict_of(load_config(compose_config(
        ["experiment=paper_fge/vgg16_cifar100"]))))
    metrics = {"status": "finished", "sgd": {"test_acc": 0.72}, "swa": {"test_acc": 0.73},
               "fge": {"test_acc": 0.7451}}
    (cell,) = paper.measured_cells(flat, metrics, [])
    assert (cell.column, cell.epoch, cell.acc) == ("fge", 200, pytest.approx(74.51))
    (row,) = paper.compare([cell])
    assert (row.published_mean, row.published_std) == (74.26, None)
    assert row.within == paper.NO_STD and row.difference == pytest.approx(0.25)
    cells = paper.comparison_cells(row)
    assert cells[2:5] == ["FGE 1 budget", "200", "74.26"]
    table = paper.published_table()
    assert "| SGD | FGE 1 budget | SWA 1 budget |" in table
    assert "| 72.55 ± 0.10 | 74.26 | 73.91 ± 0.12 |" in table
