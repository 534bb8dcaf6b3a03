"""The public averaging library (swa_research.averaging, docs/library.md) from a plain loop:
the examples run, and the plain-loop example given the trainer's model, data order and
settings gives the trainer's SWA weights: the framework is built on the same API."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from torch import nn

import swa_research.averaging as averaging
from swa_research.averaging import (
    average_states,
    classification_metrics,
    make_average,
    make_plan,
    predict,
    snapshot,
    swag_bma,
    update_bn,
)
from swa_research.config import iterations_per_epoch
from swa_research.data import Limits, Preprocess, build_data, train_batches
from swa_research.models import build_model
from swa_research.training.averages import plan_from_config
from swa_research.training.build import load_config, train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_plain_loop_example_runs_and_prints_sgd_and_the_averages() -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "plain_loop.py")], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["sgd", "swa", "ema"]
    assert all("test accuracy" in ln and "ECE" in ln for ln in lines)
    assert "(n=6)" in lines[1]


def test_the_posthoc_ema_example_reconstructs_the_online_width() -> None:
    """examples/posthoc_ema.py: the width it also tracks online (0.07) comes back from the two
    saved profiles with the online EMA's validation loss and accuracy (after the same BN
    update), and the widths differ from each other."""
    results, online = load_example("posthoc_ema").main()
    assert results[0.07]["loss"] == pytest.approx(online["loss"], abs=2e-4)
    assert results[0.07]["acc"] == online["acc"]
    assert len({round(r["loss"], 4) for r in results.values()}) == len(results)


# The DDP tests' configuration: a BN-free VGG11 that learns with SGD, no augmentation or
# dropout, contiguous memory (channels_last changes the convolutions' rounding).
RUN = ["experiment=smoke", "trainer.device=cpu", "model=vgg11", "model.width=0.125",
       "model.batch_norm=false", "model.dropout=0", "data.normalize=true",
       "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "optimizer=sgd",
       "optimizer.momentum=0.9", "optimizer.lr=0.01", "swa.lr=0.01", "trainer.epochs=4",
       "swa.start=0.75", "data.augment=none", "trainer.channels_last=false",
       "trainer.progress=none", "trainer.num_workers=0"]


def test_the_plain_loop_gives_the_trainers_swa_weights(tmp_path: Path) -> None:
    metrics = train(compose_config(RUN), tmp_path / "run")
    assert metrics["sgd"]["test_loss"] < 0.5 * math.log(10)  # a run that learns
    trainer_swa = torch.load(tmp_path / "run" / "swa.pt", weights_only=True)

    # The same model, data order and settings, through the example's loop.
    example = load_example("plain_loop")
    c = load_config(compose_config(RUN))
    torch.manual_seed(c.seed)
    data = build_data(c.data, c.seed, torch.device("cpu"), limits=Limits.of(c))
    model = build_model(c.model, data.num_classes, data.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.optimizer.lr, momentum=0.9,
                                weight_decay=c.optimizer.weight_decay, fused=True)
    bs = c.trainer.batch_size
    ipe = iterations_per_epoch(len(data.train), bs, c.trainer.drop_last)
    plan = make_plan(start=c.swa.start, freq=c.swa.freq, unit=c.swa.unit,
                     epochs=c.trainer.epochs, iters_per_epoch=ipe)
    pre = Preprocess(True, c.data.mean, c.data.std, torch.device("cpu"))
    generator = torch.Generator().manual_seed(c.seed)  # the trainer's data order

    def epochs():  # noqa: ANN202
        for _ in range(c.trainer.epochs):
            order = torch.randperm(len(data.train), generator=generator)
            aug_seed = torch.randint(0, 2**62, (1,), generator=generator).tolist()[0]
            yield train_batches(data.train, bs, generator, pre, c.trainer.drop_last,
                                order=order, aug_seed=aug_seed)

    averages = {"swa": make_average("swa", model)}
    example.train(model, optimizer, epochs(), plan, averages, bn_batches=lambda: [])
    assert averages["swa"].n_averaged == trainer_swa["n_averaged"] == metrics["swa"][
        "n_averaged"]
    mine = averages["swa"].module.state_dict()
    for key, value in trainer_swa["state_dict"].items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-6, msg=key)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_the_public_names_import_without_hydra_or_wandb() -> None:
    code = ("import sys; import swa_research.averaging as a; "
            "missing = [n for n in a.PUBLIC if not hasattr(a, n)]; "
            "assert not missing, missing; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'wandb')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(averaging.PUBLIC) <= set(averaging.__all__)


def test_make_average_builds_every_method_and_checks_its_options() -> None:
    model = net()
    for method in ("swa", "ema", "swag", "swag_diag"):
        avg = make_average(method, model)
        avg.update(model)
        assert avg.method == method and avg.n_averaged == 1
    assert make_average("swag_diag", model).scale == 1.0
    assert make_average("swag", model, scale=0.3).scale == 0.3
    # One-line ValueErrors in the library's own argument names (not the config's swa.*).
    with pytest.raises(ValueError, match=r"^method='polyak': expected one of swa, ema"):
        make_average("polyak", model)
    with pytest.raises(ValueError, match=r"^max_models=1: must be a whole number of at least 2"):
        make_average("swag", model, max_models=1)
    with pytest.raises(ValueError, match=r"^decay=1.5: must be in \(0, 1\)$"):
        make_average("ema", model, decay=1.5)
    with pytest.raises(ValueError, match=r"^lawa_k=2.5: must be a whole number"):
        make_average("lawa", model, lawa_k=2.5)
    with pytest.raises(ValueError, match="unit='step'"):
        make_plan(start=1, freq=1, unit="step", epochs=1, iters_per_epoch=1)


def test_a_plan_is_whole_and_within_its_budget() -> None:
    with pytest.raises(ValueError, match=r"^start=1.5: from 1 on, start counts iterations and "
                                         "must be whole"):
        make_plan(start=1.5, freq=1, epochs=2, iters_per_epoch=10)
    with pytest.raises(ValueError, match=r"^start=100: no update within the budget of 20 "
                                         r"iterations \(epochs=2, iters_per_epoch=10\)"):
        make_plan(start=100, freq=1, epochs=2, iters_per_epoch=10)
    with pytest.raises(ValueError, match=r"^start=5: no update within the budget of 2 epochs"):
        make_plan(start=5, freq=1, unit="epoch", epochs=2, iters_per_epoch=10)
    with pytest.raises(ValueError, match=r"^freq=2.0: must be a whole number"):
        make_plan(start=0, freq=2.0, epochs=2, iters_per_epoch=10)  # type: ignore[arg-type]
    assert make_plan(start=0.5, freq=1, epochs=2, iters_per_epoch=10).count_updates() == 10


def test_fge_through_the_library_is_the_frameworks_fge() -> None:
    """make_plan(collect="middle") collects at each cycle's low point of fge_lr, as the
    framework's swa=fge (its plan and lr from the same config), which follows
    dnn-mode-connectivity's fge.py: lr_1 (1 - 2t) + lr_2 2t, then back up."""
    from swa_research.averaging import fge_lr
    from swa_research.config import ScheduleConfig, SwaConfig
    from swa_research.training.optim import build_schedule

    ipe, epochs, cycle_epochs = 5, 12, 4
    lib = make_plan(start=6, freq=1, unit="epoch", epochs=epochs, iters_per_epoch=ipe,
                    cycle=cycle_epochs * ipe, collect="middle")
    sched = ScheduleConfig(name="fge", fge_cycle=cycle_epochs, fge_lr_high=0.05)
    ours = plan_from_config(SwaConfig(method="swa", start=6, unit="epoch"), sched,
                                     epochs, ipe)
    assert lib.update_points() == ours.update_points() == [40, 60]
    lr = build_schedule(sched, 0.1, 0.001, ipe, epochs * ipe, ours.start_iter)
    for i in range(30, epochs * ipe):
        t = ((i - 30) % 20) / 20  # the reference's cyclic_learning_rate
        expected = 0.05 * (1 - 2 * t) + 0.001 * 2 * t if t < 0.5 else \
            0.05 * (2 * t - 1) + 0.001 * (2 - 2 * t)
        assert fge_lr(i, start=30, cycle=20, lr_high=0.05, lr_low=0.001) == \
            pytest.approx(expected, abs=1e-15) == lr(i)
    # The models are collected after the steps at the low lr (iteration 40 = steps 0..39).
    assert fge_lr(39, start=30, cycle=20, lr_high=0.05, lr_low=0.001) == pytest.approx(
        0.05 * 0.1 + 0.001 * 0.9)
    with pytest.raises(ValueError, match=r"^cycle=5: FGE's cycle must be even"):
        make_plan(start=0, freq=1, epochs=2, iters_per_epoch=10, cycle=5, collect="middle")


def test_library_errors_are_one_line() -> None:
    model = net()
    swag = make_average("swag", model)
    with pytest.raises(ValueError, match=r"^swag_bma: the swag average was never updated"):
        swag_bma(swag, lambda: [])
    swag.update(model)
    with pytest.raises(ValueError, match=r"^swag_bma: batches\(\) gave no batch to predict$"):
        swag_bma(swag, lambda: [])
    with pytest.raises(TypeError, match=r"^update_bn: the model input read from a batch \(a "
                                        r"dict\) is a dict, not a tensor; pass input_fn="):
        update_bn(model, [{"x": torch.randn(4, 4)}])
    with pytest.raises(ValueError, match=r"^average_states: state 1 does not fit the model: "):
        average_states(model, [model.state_dict(), {"0.weight": torch.zeros(1)}])
    ema = make_average("ema", model, decay=0.9)
    ema.update(model)
    with pytest.raises(ValueError, match=r"^the state is of a ema average and cannot be loaded "
                                         "into a swa average$"):
        make_average("swa", model).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"^the ema state was formed with decay=0.9 \(this "
                                         r"average's: 0.99\)"):
        make_average("ema", model, decay=0.99).load_state_dict(ema.state_dict())
    again = make_average("ema", model, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.n_averaged == 1


def test_update_bn_takes_any_batch_structure_and_predict_scores() -> None:
    model = net()
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    avg = make_average("swa", model)
    avg.update(model)
    dicts = [{"input": x[:20], "target": y[:20]}, {"input": x[20:], "target": y[20:]}]
    update_bn(avg, dicts, input_fn=lambda b: b["input"])
    bn = avg.module[1]
    torch.testing.assert_close(bn.running_mean, model[0](x).mean(0).detach(), rtol=1e-5,
                               atol=1e-6)
    logits, labels = predict(avg, [(x, y)])
    m = classification_metrics(logits, labels)
    assert set(m) == {"loss", "acc", "nll", "ece"} and 0 <= m["acc"] <= 1
    assert m["loss"] == pytest.approx(m["nll"], rel=1e-5)


def test_swag_bma_and_post_hoc_averages_of_snapshots() -> None:
    model = net()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    swag = make_average("swag", model, max_models=3, samples=4)
    swa = make_average("swa", model)
    states = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        swag.update(model)
        swa.update(model)
        states.append(snapshot(model))
    probs = swag_bma(swag, lambda: [(x, y)], bn_batches=lambda: [(x, y)], seed=1)
    assert probs.shape == (32, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(32, dtype=torch.float64))
    assert torch.equal(probs, swag_bma(swag, lambda: [(x, y)], lambda: [(x, y)], seed=1))
    posthoc = average_states(net(), states)
    for a, b in zip(posthoc.parameters(), swa.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    with pytest.raises(TypeError, match="swag_bma needs a swag"):
        swag_bma(swa, lambda: [(x, y)])


def test_an_average_never_updated_is_not_scored() -> None:
    model = net()
    avg = make_average("swa", model)
    with pytest.raises(ValueError, match=r"^the swa average was never updated \(call "
                                         r"update\(model\)"):
        predict(avg, [torch.randn(4, 4)])
    with pytest.raises(ValueError, match="never updated"):
        update_bn(avg, [torch.randn(4, 4)])
    avg.update(model)
    assert predict(avg, [torch.randn(4, 4)])[0].shape == (4, 3)


def test_a_stale_ema_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """The first point's weight at the end, against the product written out: 0.99 over 50
    updates keeps 0.99^49 = 0.61 of it (said), 0.9 keeps 0.006 (not said)."""
    from swa_research.averaging.ema import first_point_weight, warmup_decay, warn_stale_ema

    assert first_point_weight(0.99, False, 50) == pytest.approx(0.99 ** 49, rel=1e-12)
    expected = 1.0
    for n in range(1, 50):
        expected *= min(0.99, 1 - (1 + n) ** (-2 / 3))
    assert first_point_weight(0.99, True, 50) == pytest.approx(expected, rel=1e-12)
    assert warmup_decay(0.99, 1) == pytest.approx(1 - 2 ** (-2 / 3))
    # The same arithmetic as the EMA itself: the first of 50 points' share of the weights.
    model = nn.Linear(1, 1, bias=False)
    ema = make_average("ema", model, decay=0.99)
    for i in range(50):
        model.weight.data.fill_(1.0 if i == 0 else 0.0)
        ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.99 ** 49, rel=1e-5)
    with caplog.at_level("WARNING"):
        warn_stale_ema("swa.decay", 0.99, False, 50)
        warn_stale_ema("swa.decay", 0.9, False, 50)
    assert caplog.text.count("swa.decay=0.99 over this run's 50 EMA updates: the first point "
                             "still weighs 0.61 at the end") == 1
