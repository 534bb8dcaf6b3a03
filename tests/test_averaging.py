"""swa_research.averaging: equal and exponential averages, the registry of methods, the BN
update."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import make_average
from torch import nn

from swa_research.averaging import Average, has_batch_norm
from swa_research.config import SwaConfig, UserError
from swa_research.training.averages import build_averages


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def bn_net(momentum: float | None = 0.1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Give the model new random weights in place; return a copy of them."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("factory", [lambda: nn.Linear(5, 3), small_net])
def test_swa_is_the_arithmetic_mean(factory) -> None:
    model = factory()
    avg = make_average(model, "swa")
    assert avg.n_averaged == 0
    seen = []
    for k in range(5):
        seen.append(randomize(model, seed=100 + k))  # the trainer mutates one model in place
        avg.update(model)
        assert avg.n_averaged == k + 1
    averaged = dict(avg.module.named_parameters())
    for name, last in seen[-1].items():
        expected = torch.stack([s[name] for s in seen]).mean(0)
        assert torch.allclose(averaged[name], expected, atol=1e-6), name
        assert not torch.allclose(averaged[name], last)  # really an average, not a copy
    # The average is its own copy: the training model kept its last weights.
    for name, p in model.named_parameters():
        assert torch.equal(p, seen[-1][name])


def test_swa_first_update_copies_the_weights() -> None:
    model = nn.Linear(4, 2)
    avg = make_average(model, "swa")
    w = randomize(model, seed=7)
    avg.update(model)
    for name, p in avg.module.named_parameters():
        assert torch.equal(p, w[name])


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_recursion(decay: float) -> None:
    model = small_net()
    avg = make_average(model, "ema", decay=decay)
    expected: dict[str, torch.Tensor] | None = None
    for k in range(6):
        w = randomize(model, seed=k)
        avg.update(model)
        if expected is None:
            expected = w  # avg_1 = w_1
        else:
            expected = {n: decay * expected[n] + (1 - decay) * w[n] for n in w}
    assert avg.n_averaged == 6
    assert expected is not None
    for name, p in avg.module.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-6), name


def test_ema_differs_from_swa() -> None:
    model_a, model_b = nn.Linear(3, 3), nn.Linear(3, 3)
    swa, ema = make_average(model_a, "swa"), make_average(model_b, "ema", decay=0.9)
    for k in range(3):
        randomize(model_a, k)
        randomize(model_b, k)
        swa.update(model_a)
        ema.update(model_b)
    assert not torch.allclose(swa.module.weight, ema.module.weight)


def test_unknown_method_rejected() -> None:
    with pytest.raises(UserError, match="swa.method='polyak': expected one of swa, ema, swag, "
                                        "swag_diag, lawa, fge, power_ema, none"):
        make_average(nn.Linear(2, 2), "polyak")
    with pytest.raises(UserError, match=r"swa.decay=1.5: must be in \(0, 1\)"):
        make_average(nn.Linear(2, 2), "ema", decay=1.5)
    assert build_averages(nn.Linear(2, 2), SwaConfig(method="none")) == {}


def batches(seed: int, sizes: tuple[int, ...] = (8, 8, 5)) -> list[tuple[torch.Tensor,
                                                                          torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 6, 6, generator=g) * 2 + 1, torch.zeros(n, dtype=torch.int64))
            for n in sizes]


@torch.no_grad()
def cumulative_bn_stats(conv: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SWA paper's bn_update: running stats are the per-batch statistics (batch mean,
    unbiased batch variance) of the BN layer's input, averaged with weights batch size / total."""
    means, variances, sizes = [], [], []
    for x, _ in data:
        h = conv(x)
        means.append(h.mean(dim=(0, 2, 3)))
        variances.append(h.var(dim=(0, 2, 3), unbiased=True))
        sizes.append(x.shape[0])
    w = torch.tensor(sizes, dtype=torch.float32)[:, None] / sum(sizes)
    return (torch.stack(means) * w).sum(0), (torch.stack(variances) * w).sum(0)


def test_bn_update_weights_batches_by_their_size() -> None:
    """Batches of 50, 50 and 20: the running mean is the mean over all 120 samples (an equal
    weighting of the three batches is off by about 1e-2 here)."""
    from swa_research.averaging import bn_update

    torch.manual_seed(0)
    model = bn_net(0.1)
    data = batches(seed=4, sizes=(50, 50, 20))
    data[2] = (data[2][0] + 3.0, data[2][1])  # a last batch unlike the others
    bn_update(data, model)
    with torch.no_grad():
        h = torch.cat([model[0](x) for x, _ in data])
    assert torch.allclose(model[1].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    equal = torch.stack([model[0](x).mean(dim=(0, 2, 3)) for x, _ in data]).mean(0)
    assert (equal - model[1].running_mean).abs().max() > 1e-2
    assert model[1].momentum == 0.1 and model.training


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_bn_update_recomputes_statistics(momentum: float) -> None:
    torch.manual_seed(0)
    model = bn_net(momentum)
    assert has_batch_norm(model)
    avg = make_average(model, "swa", bn_update=True)
    # Give the training model BN buffers of its own; the average copies them on update.
    model.train()
    for x, _ in batches(seed=1):
        model(x)
    for k in range(3):
        randomize(model, seed=10 + k)
        avg.update(model)
    bn = avg.module[1]
    assert torch.equal(bn.running_mean, model[1].running_mean)
    before = bn.running_mean.clone(), bn.running_var.clone()
    avg.module.eval()

    data = batches(seed=2)
    assert avg.prepare_for_eval(data) is True
    exp_mean, exp_var = cumulative_bn_stats(avg.module[0], data)
    assert torch.allclose(bn.running_mean, exp_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, exp_var, atol=1e-5)
    assert not torch.allclose(bn.running_mean, before[0])
    assert not torch.allclose(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == len(data)
    assert bn.momentum == momentum  # restored after the cumulative pass
    assert not avg.module.training  # the average's mode is restored too
    # The training model's own statistics are left alone.
    assert not torch.allclose(model[1].running_mean, bn.running_mean)

    # No new update: no recompute, even with other data.
    stats = bn.running_mean.clone(), bn.running_var.clone()
    assert avg.prepare_for_eval(batches(seed=3)) is False
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])

    # After another update it runs again, on the new average.
    randomize(model, seed=99)
    avg.update(model)
    data = batches(seed=4, sizes=(4, 6))
    assert avg.prepare_for_eval(data) is True
    exp_mean, exp_var = cumulative_bn_stats(avg.module[0], data)
    assert torch.allclose(bn.running_mean, exp_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, exp_var, atol=1e-5)
    assert bn.momentum == momentum


def test_bn_update_needs_an_update_first() -> None:
    avg = make_average(bn_net(), "swa")
    assert avg.prepare_for_eval(batches(seed=0)) is False


def test_bn_update_off_or_without_bn() -> None:
    model = small_net()
    assert not has_batch_norm(model)
    avg = make_average(model, "swa", bn_update=True)
    avg.update(model)
    assert avg.prepare_for_eval([(torch.randn(2, 3, 5, 5), torch.zeros(2))]) is False

    model = bn_net()
    avg = make_average(model, "ema", decay=0.9, bn_update=False)
    avg.update(model)
    before = avg.module[1].running_mean.clone()
    assert avg.prepare_for_eval(batches(seed=0)) is False
    assert torch.equal(avg.module[1].running_mean, before)


class LastPoint(Average):
    """A toy averaging method written for the test: the weights at the latest averaging point
    (no averaging at all), with its own state dict."""

    method = "last"
    built_with: list[dict] = []  # each instance's options, as the framework gave them

    def __init__(self, model: nn.Module, *, decay: float = 0.5) -> None:
        """One option of its own (``decay``, unused): the framework hands it swa.decay and
        nothing it does not take."""
        self._module = copy.deepcopy(model)
        self.count = 0
        LastPoint.built_with.append({"decay": decay})

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def n_averaged(self) -> int:
        return self.count

    def update(self, model: nn.Module) -> None:
        self._module.load_state_dict(model.state_dict())
        self.count += 1

    def state_dict(self) -> dict:
        return {"weights": self._module.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self._module.load_state_dict(state["weights"])
        self.count = state["count"]


def test_a_new_averaging_method_is_one_class_and_one_registry_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Registered, the toy method is selectable as the primary average (swa.method=last: the
    swa_* outputs) and as a further one beside SWA (swa.also=[last]: its own history columns,
    metrics.json entry, weights file, calibration, summary and report columns)."""
    from conftest import TINY, compose_config

    from swa_research.analysis.report import build_report
    from swa_research.averaging import METHODS, register_method
    from swa_research.training.build import train

    monkeypatch.setitem(METHODS, "last", LastPoint)  # removed again after the test
    register_method("last", LastPoint)
    # Every iteration from the middle on, the last one included: the "last" average is then
    # exactly the final SGD model (no BN in the default model, so nothing is recomputed).
    primary = train(compose_config([*TINY, "swa.method=last", "swa.freq=1"]), tmp_path / "a")
    assert primary["averages"] == ["swa"]
    assert primary["swa"]["test_acc"] == primary["sgd"]["test_acc"]
    assert primary["swa"]["test_loss"] == pytest.approx(primary["sgd"]["test_loss"], abs=1e-6)
    assert torch.load(tmp_path / "a" / "swa.pt", weights_only=True)["method"] == "last"

    assert LastPoint.built_with[-1] == {"decay": 0.999}  # swa.decay's default
    both = train(compose_config([*TINY, "swa.also=[{name:last,decay:0.9}]", "swa.freq=1"]),
                 tmp_path / "b")
    assert LastPoint.built_with[-1] == {"decay": 0.9}
    assert both["averages"] == ["swa", "last"]
    assert both["last"]["n_averaged"] == both["swa"]["n_averaged"] > 1
    assert both["last"]["test_loss"] == pytest.approx(both["sgd"]["test_loss"], abs=1e-6)
    assert both["swa"]["test_loss"] != both["last"]["test_loss"]  # a real average differs
    assert set(both["calibration"]) == {"sgd", "swa", "last"}
    assert {"swa.pt", "last.pt"} <= set(both["files"])
    header = (tmp_path / "b" / "history.csv").read_text().splitlines()[0].split(",")
    assert header[-10:] == ["swa_val_loss", "swa_val_acc", "swa_test_loss", "swa_test_acc",
                            "swa_n_averaged", "last_val_loss", "last_val_acc",
                            "last_test_loss", "last_test_acc", "last_n_averaged"]
    report = build_report([tmp_path / "b"])
    assert "LAST acc %" in report.table
    columns, rows = report.csv_rows()
    assert rows[0][columns.index("last_test_acc_mean")] == both["last"]["test_acc"]


def test_further_averages_need_their_own_names() -> None:
    with pytest.raises(UserError, match="'swa' names the primary average"):
        build_averages(nn.Linear(2, 2), SwaConfig(method="ema", also=["swa"]))
    with pytest.raises(UserError, match="swa.also: 'polyak' is not an averaging method"):
        build_averages(nn.Linear(2, 2), SwaConfig(also=["polyak"]))
    with pytest.raises(UserError, match="swa.method=none averages nothing"):
        build_averages(nn.Linear(2, 2), SwaConfig(method="none", also=["ema"]))
    names = build_averages(nn.Linear(2, 2), SwaConfig(method="swa", also=["ema"]))
    assert list(names) == ["swa", "ema"] and names["ema"].method == "ema"


@pytest.mark.parametrize(("also", "message"), [
    ("[ema,ema]", "swa.also: two averages are named 'ema'; to keep several averages of one "
                  "method, name them: swa.also=[{name:ema_a,method:ema},{name:ema_b,"
                  "method:ema,...}]"),
    ("[swa]", "swa.also: 'swa' names the primary average (swa.method=swa); name only further "
              "averages, e.g. swa.method=swa swa.also=[ema]"),
])
def test_a_repeated_or_primary_further_average_names_the_cause(also: str, message: str) -> None:
    from conftest import compose_config

    from swa_research.config import UserError
    from swa_research.training.averages import check_methods
    from swa_research.training.build import load_config

    with pytest.raises(UserError) as e:
        check_methods(load_config(compose_config([f"swa.also={also}"])).swa)
    assert str(e.value) == message


class BlowsUp(LastPoint):
    """A toy method whose average turns to NaN (as a sample at scale 1e30 did)."""

    method = "blowup"

    def update(self, model: nn.Module) -> None:
        super().update(model)
        with torch.no_grad():
            for p in self._module.parameters():
                p.fill_(float("nan"))


def test_a_non_finite_average_is_loud_and_recorded(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from conftest import TINY, compose_config

    from swa_research.averaging import METHODS
    from swa_research.tracking.loggers import run_summary
    from swa_research.training.build import train

    monkeypatch.setitem(METHODS, "blowup", BlowsUp)
    m = train(compose_config([*TINY, "swa.also=[blowup]", "swa.freq=1"]), tmp_path)
    assert set(m["nonfinite"]) == {"blowup"} and "val_loss nan at epoch" in m["nonfinite"]["blowup"]
    warnings = [r.getMessage() for r in caplog.records if "NON-FINITE" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("NON-FINITE RESULT: blowup's val_loss")
    assert "NON-FINITE results: blowup (val_loss nan at epoch" in run_summary(tmp_path, m)
    fine = train(compose_config([*TINY, "swa.freq=1"]), tmp_path / "fine")
    assert "nonfinite" not in fine


def test_named_averages_of_one_method_each_keep_their_own_options(tmp_path) -> None:  # noqa: ANN001
    """swa.also=[{name:..,method:ema,decay:..}, ...]: two EMAs in one run, each under its name
    in metrics.json, history.csv and its weight file, each equal to the EMA of a run that kept
    only that one (same seed: the averages do not change the training)."""
    import csv

    from conftest import TINY, compose_config

    from swa_research.training.build import train

    named = "swa.also=[{name:ema_fast,method:ema,decay:0.5},{name:ema_slow,method:ema,decay:0.9}]"
    m = train(compose_config([*TINY, "trainer.epochs=3", named]), tmp_path / "named")
    one = train(compose_config([*TINY, "trainer.epochs=3", "swa.also=[ema]", "swa.decay=0.9"]),
                tmp_path / "one")
    assert m["averages"] == ["swa", "ema_fast", "ema_slow"]
    assert (m["ema_fast"]["decay"], m["ema_slow"]["decay"]) == (0.5, 0.9)
    assert m["ema_slow"]["test_loss"] == one["ema"]["test_loss"]
    assert m["ema_fast"]["test_loss"] != m["ema_slow"]["test_loss"]
    a = torch.load(tmp_path / "named" / "ema_slow.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "ema.pt", weights_only=True)
    assert a["method"] == "ema" and all(torch.equal(a["state_dict"][k], b["state_dict"][k])
                                        for k in b["state_dict"])
    header = next(csv.reader((tmp_path / "named" / "history.csv").open()))
    assert {"ema_fast_test_loss", "ema_slow_test_loss"} <= set(header)


def test_named_average_errors_name_the_average() -> None:
    from conftest import TINY, compose_config

    from swa_research.training.build import load_config

    cases = {
        "swa.also=[ema,ema]": "swa.also: two averages are named 'ema'; to keep several",
        "swa.also=[{name:e,method:ema,decya:0.9}]": "swa.also (e): decya is not an option",
        "swa.also=[{name:e,method:ema,decay:1.5}]": "swa.also (e): decay=1.5: must be in",
        "swa.also=[{name:Bad,method:ema}]": "swa.also: 'Bad' cannot name an average",
        "swa.also=[{name:x,method:nope}]": "swa.also (x): 'nope' is not an averaging method",
    }
    for override, message in cases.items():
        with pytest.raises(UserError, match="^" + re.escape(message)):
            load_config(compose_config([*TINY, override]))


@pytest.mark.parametrize("warmup", [False, True])
def test_an_ema_can_average_the_bn_statistics_as_timm(warmup: bool) -> None:
    """ema_buffers="average" (timm's ModelEmaV3, Lightning's WeightAveraging): the BN running
    statistics are mixed like the weights, the first point copied, the batch counter copied;
    no BN pass then; computed here from the models' own buffers. The default recomputes them."""
    from swa_research.averaging import make_average as library_average
    from swa_research.averaging.ema import warmup_decay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg = library_average("ema", model, decay=0.8, ema_warmup=warmup, ema_buffers="average")
    plain = library_average("ema", model, decay=0.8, ema_warmup=warmup)
    want_mean, want_var = None, None
    for n in range(6):
        model.train()
        model(torch.randn(16, 3) * (n + 1) + n)  # moves the running statistics
        avg.update(model)
        plain.update(model)
        bn = model[1]
        if want_mean is None:
            want_mean, want_var = bn.running_mean.clone(), bn.running_var.clone()
        else:
            d = warmup_decay(0.8, n) if warmup else 0.8
            want_mean = d * want_mean + (1 - d) * bn.running_mean
            want_var = d * want_var + (1 - d) * bn.running_var
    mine = avg.module[1]
    torch.testing.assert_close(mine.running_mean, want_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(mine.running_var, want_var, rtol=0, atol=1e-6)
    assert int(mine.num_batches_tracked) == int(model[1].num_batches_tracked) == 6
    assert avg.settings()["ema_buffers"] == "average" and "ema_buffers" not in plain.settings()
    assert not avg.prepare_for_eval([torch.randn(8, 3)])  # averaged: no BN pass
    assert torch.equal(plain.module[1].running_mean, model[1].running_mean)  # copied
    assert plain.prepare_for_eval([torch.randn(8, 3)])  # ... and recomputed
    for a, b in zip(avg.module.parameters(), plain.module.parameters(), strict=True):
        assert torch.equal(a, b)  # the weights are the same EMA either way
    with pytest.raises(ValueError, match="ema_buffers=sometimes: expected recompute or average"):
        library_average("ema", model, ema_buffers="sometimes")
