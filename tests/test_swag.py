"""SWAG and SWAG-Diagonal (swa_research/averaging/swag.py): the moments and the deviation buffer
against numpy on a known trajectory, samples against the reference's formula (wjmaddox/
swa_gaussian swag/posteriors/swag.py, SWAG.sample_fullrank), the Bayesian model average,
reproducibility, checkpoints, the config, the presets, and a run with swa=swag."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, fault_env
from torch import nn

from swa_research.averaging import METHODS, SWAG, SWAGDiag, bn_update
from swa_research.averaging.swag import VAR_CLAMP, flat_parameters, load_flat
from swa_research.config import SwaConfig, UserError
from swa_research.data import ImageSet, Preprocess
from swa_research.training.averages import build_averages, plan_from_config
from swa_research.training.build import load_config, train
from swa_research.training.evaluator import eval_sets


def make_swag(model: nn.Module, method: str = "swag", **kw) -> SWAG:
    cfg = SwaConfig(method="swa", also=[method], **kw)
    avg = build_averages(model, cfg)[method]
    assert isinstance(avg, SWAG)
    return avg


def trajectory(model: nn.Module, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Known weight vectors (float32 values, as numpy float64) of ``steps`` points."""
    g = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in model.parameters())
    base = torch.randn(n, generator=g)
    return [(base + 0.3 * torch.randn(n, generator=g)).numpy().astype(np.float64)
            for _ in range(steps)]


def feed(avg: SWAG, model: nn.Module, points: list[np.ndarray]) -> None:
    for w in points:
        load_flat(model, torch.tensor(w, dtype=torch.float32))
        avg.update(model)


def test_registered() -> None:
    assert METHODS["swag"] is SWAG and METHODS["swag_diag"] is SWAGDiag


@pytest.mark.parametrize("steps", [3, 7])  # the buffer partly filled, and wrapped round
def test_moments_and_deviations_equal_numpy(steps: int) -> None:
    model = nn.Linear(3, 2)
    k = 4
    avg = make_swag(model, max_models=k)
    points = trajectory(model, steps)
    feed(avg, model, points)
    w = np.stack(points)
    mean = w.mean(0)
    var = (w ** 2).mean(0) - mean ** 2
    # The deviation taken at step t is w_t minus the mean of the first t points (the mean
    # after the update, as SWAG.collect_model); the last k of them, oldest first.
    devs = np.stack([w[t] - w[:t + 1].mean(0) for t in range(steps)])[-k:]
    assert avg.n_averaged == steps
    np.testing.assert_allclose(avg.mean.numpy(), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(avg.variance().numpy(), np.maximum(var, VAR_CLAMP), rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose(avg.deviations().numpy(), devs, rtol=0, atol=1e-6)
    assert avg.filled == min(steps, k)
    # The saved network holds the mean.
    np.testing.assert_allclose(flat_parameters(avg.module, torch.device("cpu")).numpy(), mean,
                               atol=1e-6)


def formula_sample(avg: SWAG, seed: int) -> torch.Tensor:
    """The reference's sample_fullrank written out: z1 over the weights (drawn parameter by
    parameter), then z2 over the stored deviations (oldest first); the low-rank part divided
    by sqrt(max_models - 1)."""
    g = torch.Generator().manual_seed(seed)
    var = torch.clamp(avg.sq_mean - avg.mean ** 2, VAR_CLAMP)
    z1 = torch.cat([torch.randn(p.numel(), generator=g) for p in avg.module.parameters()])
    rand = var.sqrt() * z1
    if avg.low_rank:
        d = avg.deviations()
        z2 = torch.randn(d.shape[0], generator=g)
        rand = rand + d.t().matmul(z2) / math.sqrt(avg.max_models - 1)
    return avg.mean + math.sqrt(avg.scale) * rand


@pytest.mark.parametrize(("method", "steps"), [("swag", 7), ("swag", 3), ("swag_diag", 7)])
def test_a_sample_is_the_reference_formula(method: str, steps: int) -> None:
    model = nn.Sequential(nn.Linear(3, 24), nn.Linear(24, 2))  # 96 + 50 weights: > 16 each
    avg = make_swag(model, method, max_models=5, swag_scale=0.5)
    feed(avg, model, trajectory(model, steps))
    got = avg.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, formula_sample(avg, 3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["swag", "swag_diag"])
def test_samples_have_the_mean_and_covariance_of_the_formula(method: str) -> None:
    """Monte Carlo: sample mean and covariance of many draws against mean and
    scale * (diag(var) + D^T D / (K - 1)) (swag_diag: scale * diag(var)), each entry within
    five standard errors."""
    model = nn.Linear(2, 2)  # 6 weights
    k, n = 4, 20_000
    avg = make_swag(model, method, max_models=k, swag_scale=0.5, swag_diag_scale=0.7)
    scale = avg.scale
    assert scale == {"swag": 0.5, "swag_diag": 0.7}[method]
    feed(avg, model, trajectory(model, 9, seed=1))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([avg.sample(g) for _ in range(n)]).double()
    var = avg.variance().double()
    cov = torch.diag(var)
    if method == "swag":
        d = avg.deviations().double()
        cov = cov + d.t() @ d / (k - 1)
    else:
        assert avg.buffer is None and avg.deviations().shape[0] == 0 and avg.buffer_mb == 0
    cov = scale * cov
    mean_err = (draws.mean(0) - avg.mean.double()).abs()
    assert (mean_err <= 5 * (cov.diag() / n).sqrt()).all(), mean_err
    emp = torch.cov(draws.t())
    se = ((cov.diag()[:, None] * cov.diag()[None, :] + cov ** 2) / n).sqrt()
    assert ((emp - cov).abs() <= 5 * se + 1e-12).all(), (emp - cov) / se
    if method == "swag":  # the low-rank part is there: off-diagonal covariance
        assert cov.triu(1).abs().max() > 10 * se.max()


def image_set(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8),
                    torch.randint(0, 3, (n,), generator=g))


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def trained_swag(method: str = "swag", samples: int = 4) -> tuple[nn.Module, SWAG]:
    model = bn_net()
    avg = make_swag(model, method, max_models=3, samples=samples)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        avg.update(model)
    return model, avg


PRE = Preprocess(False, [0.0] * 3, [1.0] * 3, torch.device("cpu"))
TRAIN = image_set(20, 1)


def bn_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(PRE.to_float(TRAIN.images[i:i + 8]), TRAIN.labels[i:i + 8]) for i in (0, 8, 16)]


def test_the_bma_is_the_mean_of_the_samples_probabilities() -> None:
    _, avg = trained_swag(samples=4)
    sets = {"val": image_set(10, 2), "test": image_set(13, 3)}
    probs = avg.collect_probs(eval_sets(sets, PRE, 5), bn_batches, seed=11)
    g = torch.Generator().manual_seed(11)
    net = copy.deepcopy(avg.module)
    expected = {k: torch.zeros(len(v), 3, dtype=torch.float64) for k, v in sets.items()}
    for _ in range(4):
        load_flat(net, avg.sample(g))
        bn_update(bn_batches(), net)  # BN statistics recomputed for every sample
        net.eval()
        with torch.no_grad():
            for k, v in sets.items():
                expected[k] += torch.softmax(net(PRE.to_float(v.images)), 1).double()
    for k in sets:
        torch.testing.assert_close(probs[k], expected[k] / 4, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(probs[k].sum(1), torch.ones(len(sets[k]),
                                                               dtype=torch.float64))


def test_evaluation_is_reproducible_for_a_seed_and_leaves_the_mean() -> None:
    _, avg = trained_swag(samples=3)
    before = copy.deepcopy(avg.module.state_dict())
    sets = {"test": image_set(12, 4)}
    a = avg.collect_probs(eval_sets(sets, PRE, 5), bn_batches, seed=7)["test"]
    b = avg.collect_probs(eval_sets(sets, PRE, 5), bn_batches, seed=7)["test"]
    c = avg.collect_probs(eval_sets(sets, PRE, 5), bn_batches, seed=8)["test"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    after = avg.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the mean and its buffers


def test_swag_and_swag_diag_predictions_differ() -> None:
    _, full = trained_swag("swag", samples=3)
    _, diag = trained_swag("swag_diag", samples=3)
    torch.testing.assert_close(full.mean, diag.mean, rtol=0, atol=0)
    sets = {"test": image_set(12, 4)}
    assert not torch.equal(full.collect_probs(eval_sets(sets, PRE, 5), bn_batches, seed=1)["test"],
                           diag.collect_probs(eval_sets(sets, PRE, 5), bn_batches, seed=1)["test"])


def test_eval_due() -> None:
    avg = make_swag(nn.Linear(2, 2))
    assert avg.eval_due(3, final=True) and not avg.eval_due(3, final=False)
    every = make_swag(nn.Linear(2, 2), swag_eval_every=2)
    assert [every.eval_due(i, final=False) for i in (1, 2, 3, 4)] == [False, True, False, True]


@pytest.mark.parametrize(("method", "steps"), [("swag", 7), ("swag", 2), ("swag_diag", 4)])
def test_state_dict_round_trip_is_bit_exact(method: str, steps: int) -> None:
    model = bn_net()
    a = make_swag(model, method, max_models=4)
    points = trajectory(model, steps + 3)
    feed(a, model, points[:steps])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    if method == "swag" and steps < 4:  # only the filled rows are written
        assert a.state_dict()["deviations"].shape == (steps, a.numel)
    buf.seek(0)
    b = make_swag(bn_net(), method, max_models=4)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("count", "position", "filled"):
        assert getattr(a, name) == getattr(b, name)
    for name in ("mean", "sq_mean", "buffer"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Continuing from the copy is bit for bit the same as continuing the original.
    feed(a, model, points[steps:])
    feed(b, model, points[steps:])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.sq_mean, b.sq_mean)
    assert a.buffer is None or torch.equal(a.buffer, b.buffer)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(a.sample(g1), b.sample(g2))


def test_a_checkpoint_of_another_buffer_size_is_refused() -> None:
    a = make_swag(nn.Linear(2, 2), max_models=4)
    a.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_models=4"):
        make_swag(nn.Linear(2, 2), max_models=5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="weights"):
        make_swag(nn.Linear(3, 2), max_models=4).load_state_dict(a.state_dict())


def test_buffer_cost() -> None:
    avg = make_swag(nn.Linear(100, 10), max_models=20)  # 1010 parameters
    assert avg.buffer_mb == pytest.approx(1010 * 4 * 20 / 2**20)


def test_swag_diag_samples_at_the_reference_spread_by_default() -> None:
    """swa_gaussian samples SWAG-Diagonal at scale 1.0 (SWAG at 0.5): at the defaults the
    diagonal draws' std over sqrt(var) is 1.0 (it was 0.707 when the diagonal inherited 0.5),
    the full-rank posterior's diagonal part sqrt(0.5)."""
    model = nn.Linear(8, 8)  # 72 weights
    cfg = SwaConfig(method="swa", also=["swag", "swag_diag"])
    avgs = build_averages(model, cfg)
    assert (avgs["swag"].scale, avgs["swag_diag"].scale) == (0.5, 1.0)
    points = trajectory(model, 9, seed=2)
    for avg in (avgs["swag"], avgs["swag_diag"]):
        feed(avg, model, points)
    diag = avgs["swag_diag"]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([diag.sample(g) for _ in range(4000)]).double()
    ratio = (draws.std(0) / diag.variance().double().sqrt()).mean().item()
    assert abs(ratio - 1.0) < 0.02, ratio
    assert diag.settings() == {"scale": 1.0, "samples": 30}
    assert avgs["swag"].settings() == {"scale": 0.5, "samples": 30, "max_models": 20}


def test_swag_device_cpu_keeps_the_moments_on_the_host() -> None:
    avg = make_swag(nn.Linear(2, 2), swag_device="cpu")
    assert avg.mean.device.type == "cpu" and avg.buffer.device.type == "cpu"


@pytest.mark.parametrize(("override", "key"), [
    ("swa.max_models=1", "swa.max_models"),
    ("swa.swag_scale=-1", "swa.swag_scale"),
    ("swa.swag_scale=1e30", "swa.swag_scale"),
    ("swa.swag_diag_scale=nan", "swa.swag_diag_scale"),
    ("swa.samples=0", "swa.samples"),
    ("swa.swag_eval_every=-1", "swa.swag_eval_every"),
    ("swa.swag_device=tpu", "swa.swag_device"),
])
def test_bad_swag_options_are_refused(override: str, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(compose_config(["swa=swag", override]))


@pytest.mark.parametrize(("option", "names"), [("swag", ["swag"]),
                                               ("swag_diag", ["swag_diag"])])
def test_swa_swag_keeps_swa_primary(option: str, names: list[str]) -> None:
    c = load_config(compose_config([f"swa={option}"]))
    assert c.swa.method == "swa" and c.swa.also == names
    assert (c.swa.max_models, c.swa.swag_scale, c.swa.samples) == (20, 0.5, 30)
    assert c.swa.swag_diag_scale == 1.0
    assert (c.swa.swag_device, c.swa.swag_eval_every) == ("auto", 0)


# experiment=swag/<model>_<dataset>: wjmaddox/swa_gaussian experiments/train/README.md.
PRESETS = {
    "vgg16_cifar10": (0.05, 5e-4, 0.01), "vgg16_cifar100": (0.05, 5e-4, 0.01),
    "preresnet164_cifar10": (0.1, 3e-4, 0.01), "preresnet164_cifar100": (0.1, 3e-4, 0.05),
    "wrn28x10_cifar10": (0.1, 5e-4, 0.05), "wrn28x10_cifar100": (0.1, 5e-4, 0.05),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset: str) -> None:
    from swa_research.training.averages import check_budget

    c = load_config(compose_config([f"experiment=swag/{preset}"]))
    model, data = preset.split("_")
    assert c.model["name"] == model and c.data.name == data
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.swa.lr) == PRESETS[preset]
    assert c.optimizer.name == "sgd" and c.optimizer.momentum == 0.9
    assert c.trainer.epochs == 300 and c.swa.start == 161 and c.swa.unit == "epoch"
    assert c.swa.method == "swa" and c.swa.also == ["swag", "swag_diag"]
    assert c.swa.max_models == 20 and c.swa.samples == 30 and c.swa.swag_scale == 0.5
    assert c.swa.swag_diag_scale == 1.0
    check_budget(c, 391)  # 50,000 images, batch 128, last partial batch kept
    plan = plan_from_config(c.swa, c.schedule, c.trainer.epochs, 391)
    assert plan.update_points()[0] == 161 and plan.count_updates() == 140


# ---------------------------------------------------------------------------------------------
# Runs


def test_a_run_with_swa_swag_writes_every_promised_key(tmp_path: Path) -> None:
    """Three epochs, averaged from the second: SWAG samples at the final evaluation only,
    its columns (and SWAG-Diagonal's beside it) are empty at the second."""
    m = train(compose_config([*TINY, "swa=swag", "swa.also=[swag,swag_diag]", "swa.samples=2",
                              "swa.start=0.4", "trainer.epochs=3", "model.batch_norm=true",
                              "swa.swag_eval_every=0"]), tmp_path)
    assert m["averages"] == ["swa", "swag", "swag_diag"]
    for name in ("swa", "swag", "swag_diag"):
        for key in ("test_acc", "test_loss", "val_acc", "val_loss"):
            assert m[name][key] is not None, (name, key)
        assert set(m["calibration"][name]) == {"nll", "ece"}
        assert m[name]["n_averaged"] == m["swa"]["n_averaged"] > 2
    # The BMA's test loss is the calibration NLL of the same averaged probabilities.
    assert m["swag"]["test_loss"] == pytest.approx(m["calibration"]["swag"]["nll"], rel=1e-9)
    assert m["swag"]["test_loss"] != m["swa"]["test_loss"]
    assert (m["swag"]["scale"], m["swag_diag"]["scale"]) == (0.5, 1.0)
    assert m["swag"]["samples"] == m["swag_diag"]["samples"] == 2
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    for name in ("swag", "swag_diag"):
        assert {f"{name}_{k}" for k in ("val_loss", "val_acc", "test_loss", "test_acc",
                                        "n_averaged")} <= set(rows[0])
    assert rows[1]["swa_n_averaged"] != "0" and rows[1]["swa_test_loss"] != ""
    assert rows[1]["swag_n_averaged"] == rows[1]["swa_n_averaged"]
    assert rows[1]["swag_test_loss"] == "" and rows[1]["swag_diag_test_loss"] == ""
    assert rows[2]["swag_test_loss"] != ""
    assert {"swag.pt", "swag_diag.pt"} <= set(m["files"])
    blob = torch.load(tmp_path / "swag.pt", weights_only=True)
    assert blob["method"] == "swag" and blob["n_averaged"] == m["swag"]["n_averaged"]
    assert blob["swag"]["deviations"].shape[0] == min(20, m["swag"]["n_averaged"])
    diag = torch.load(tmp_path / "swag_diag.pt", weights_only=True)["swag"]
    assert not diag["low_rank"] and diag["deviations"].shape[0] == 0
    # swag.pt's state dict loads into the model and holds the mean.
    from swa_research.models import build_model

    net = build_model(load_config(compose_config([*TINY, "model.batch_norm=true"])).model,
                      10, 32)
    net.load_state_dict(blob["state_dict"])
    torch.testing.assert_close(flat_parameters(net, torch.device("cpu")),
                               blob["swag"]["mean"])


@pytest.mark.slow
def test_swag_eval_every_and_seeded_runs_repeat(tmp_path: Path) -> None:
    args = [*TINY, "swa=swag", "swa.samples=2", "swa.start=0.4", "trainer.epochs=3",
            "swa.swag_eval_every=2"]
    a = train(compose_config(args), tmp_path / "a")
    b = train(compose_config(args), tmp_path / "b")
    assert (tmp_path / "a" / "history.csv").read_bytes() == \
        (tmp_path / "b" / "history.csv").read_bytes()
    assert a["calibration"] == b["calibration"]
    rows = list(csv.DictReader((tmp_path / "a" / "history.csv").open()))
    assert rows[1]["swag_test_loss"] != ""  # the second evaluation: due with every=2


RUN = ["experiment=smoke", *TINY, "data.train_size=256", "model.batch_norm=true",
       "trainer.epochs=3", "trainer.deterministic=true", "swa.start=0.4", "swa.freq=2",
       "swa=swag", "swa.samples=2", "swa.max_models=2"]


def launch(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env(fault)}
    return subprocess.run([sys.executable, "-m", "swa_research.train", *RUN,
                           f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


@pytest.mark.slow
def test_killed_and_resumed_run_is_identical(tmp_path: Path) -> None:
    """SIGKILL in the third epoch; the checkpoint it resumes from (end of epoch 2, iteration
    14) holds a wrapped ring buffer (updates after iterations 10, 12, 14 into 2 rows: position
    1): the resumed run's files equal an unbroken one's."""
    base, broken = tmp_path / "base", tmp_path / "broken"
    r = launch(base)
    assert r.returncode == 0, r.stdout[-2000:]
    killed = launch(broken, fault="step@18")
    assert killed.returncode == -9, killed.stdout[-2000:]
    from swa_research.training.checkpoint import LATEST, load_checkpoint

    state = load_checkpoint(broken / LATEST)["averages"]["swag"]
    assert (state["count"], state["filled"], state["position"]) == (3, 2, 1)
    resumed = launch(broken)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout[-2000:]
    assert (broken / "history.csv").read_bytes() == (base / "history.csv").read_bytes()

    def metrics(d: Path) -> dict:
        m = json.loads((d / "metrics.json").read_text())
        m.pop("train")
        return m

    assert metrics(broken) == metrics(base)
    a = torch.load(base / "swag.pt", weights_only=True)["swag"]
    b = torch.load(broken / "swag.pt", weights_only=True)["swag"]
    assert all(torch.equal(a[k], b[k]) for k in ("mean", "sq_mean", "deviations"))


def test_a_swag_buffer_beyond_the_free_memory_is_refused_before_allocating(tmp_path: Path
                                                                            ) -> None:
    from swa_research.averaging.swag import check_memory

    with pytest.raises(ValueError) as e:
        check_memory("swag", 101_650, 100_000_000, torch.device("cpu"), available=2**34)
    assert str(e.value) == (
        "max_models=100000000: swag needs 37,867.6 GiB on cpu (100000000 deviations and 4 "
        "vectors of 101,650 float32 weights), 16.0 GiB are free; lower max_models")
    check_memory("swag", 101_650, 20, torch.device("cpu"), available=2**34)  # fits
    # Through the config: the run stops before its buffer is allocated.
    with pytest.raises(UserError, match=r"^swa.max_models=100000000: swag needs 37,867.6 GiB.*"
                                        r"lower swa.max_models$"):
        train(compose_config([*TINY, "swa=swag", "swa.max_models=100000000",
                              "model.width=0.125"]), tmp_path / "run")
