"""The debug group (debug=smoke|fdr|limit|overfit, lightning-hydra-template's convention) and
data.subset: shortened runs that never touch the model, so they work with every model in the
registry, alone and under -m."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from swa_research.data import Limits, apply_limits, balanced_index, build_data
from swa_research.models import MODELS, resolve_model_config
from swa_research.training.averages import plan_from_config
from swa_research.training.build import load_config, train

OPTIONS = ["smoke", "fdr", "limit", "overfit"]
CPU = ["trainer.device=cpu", "trainer.progress=none", "trainer.num_workers=0"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_debug_option_composes_with_every_model(option: str, model: str) -> None:
    """The model group is untouched: the model's own options, checked by the registry."""
    c = load_config(compose_config([f"debug={option}", f"model={model}", "data=synthetic"]))
    assert c.model["name"] == model
    resolve_model_config(c.model)  # raises on an option the model does not take
    if option == "fdr":
        assert (c.trainer.epochs, c.trainer.limit_train_batches, c.trainer.limit_eval_batches) \
            == (1, 1, 1)


def test_experiment_smoke_still_picks_its_narrow_vgg() -> None:
    c = load_config(compose_config(["experiment=smoke"]))
    assert c.model["name"] == "simplified" and c.model["width"] == 0.125


@pytest.mark.parametrize("model", ["simplified", "preresnet110", "torchvision"])
def test_debug_smoke_runs_with_models_of_each_family(model: str, tmp_path: Path) -> None:
    m = train(compose_config(["debug=smoke", f"model={model}", *CPU]), tmp_path)
    assert m["status"] == "finished" and m["train"]["iterations"] == 8  # 2 epochs x 4 batches
    assert m["swa"]["n_averaged"] == 4 and m["swa"]["test_acc"] is not None
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert len(rows) == 2


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(m for m, e in MODELS.items()
                                         if e.task == "classification"))
def test_debug_fdr_runs_with_every_model_in_the_registry(model: str, tmp_path: Path) -> None:
    """One step of 8 images through every path, for every registered image model (WRN-28-10
    takes 134 s at fdr's batch 128 on two cores, hence the small batches; the language models
    run in tests/test_lm.py)."""
    small = ["data=synthetic", "data.train_size=64", "data.test_size=16",
             "trainer.batch_size=8", "trainer.eval_batch_size=8"]
    m = train(compose_config(["debug=fdr", f"model={model}", *CPU, *small]), tmp_path)
    assert m["status"] == "finished"
    assert m["swa"]["n_averaged"] >= 1 and m["swa"]["test_loss"] is not None
    assert (tmp_path / "swa.pt").is_file()


def test_fdr_passes_one_batch_through_every_path(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """One step; the average updated after it, with its BN update (a BN model); one eval batch
    of validation and test; calibration and the files."""
    caplog.set_level("INFO", logger="swa_research.data")
    m = train(compose_config(["debug=fdr", "data=synthetic", "model=vgg11",
                              "model.batch_norm=true", "model.width=0.125", "swa.also=[ema]",
                              *CPU]), tmp_path)
    assert m["train"]["iterations"] == 1 and m["train"]["epochs"] == 1
    assert m["swa"]["n_averaged"] == m["ema"]["n_averaged"] == 1
    assert set(m["calibration"]["swa"]) == {"nll", "ece"}
    assert {"sgd_final.pt", "swa.pt", "ema.pt"} <= set(m["files"])
    caplog.set_level("INFO", logger="swa_research.data")
    assert "train 128 of" in caplog.text and "test 200 of 200" in caplog.text  # batch 128


def test_limit_and_overfit_cut_the_sets(tmp_path: Path) -> None:
    c = load_config(compose_config(["debug=limit", "data=synthetic", "data.train_size=2000",
                                    "data.test_size=3000", "trainer.batch_size=32",
                                    "trainer.eval_batch_size=100"]))
    splits = build_data(c.data, c.seed, torch.device("cpu"), limits=Limits.of(c))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (320, 200, 500)
    c = load_config(compose_config(["debug=overfit", "data=synthetic", "trainer.batch_size=8"]))
    splits = build_data(c.data, c.seed, torch.device("cpu"), limits=Limits.of(c))
    assert len(splits.train) == 32 and splits.val is splits.train
    m = train(compose_config(["debug=overfit", "data=synthetic", "model.width=0.125",
                              "model.dropout=0", "optimizer.lr=3e-3", "trainer.batch_size=8",
                              "data.normalize=true", *CPU]), tmp_path)
    # It fits its 32 images: validation (the same images) far below chance (ln 10 = 2.30;
    # measured 0.003).
    assert m["sgd"]["val_loss"] < 0.1, m["sgd"]


def test_data_subset_is_seeded_and_class_balanced() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    index = balanced_index(labels, 20, seed=3)
    assert len(set(index.tolist())) == 20
    counts = Counter(labels[index].tolist())
    assert counts == {2: 5, 0: 8, 1: 7} or counts == {2: 5, 0: 7, 1: 8}
    assert torch.equal(index, balanced_index(labels, 20, seed=3))
    assert not torch.equal(index, balanced_index(labels, 20, seed=4))
    c = load_config(compose_config(["data=synthetic", "data.subset=30"]))
    splits = build_data(c.data, c.seed, torch.device("cpu"), limits=Limits.of(c))
    assert len(splits.train) == 30 and Counter(splits.train.labels.tolist()) == \
        dict.fromkeys(range(10), 3)
    # Nothing to cut: the same sets back.
    same = apply_limits(splits, Limits(), 0)
    assert same.train is splits.train and same.test is splits.test


def test_bad_limits_are_one_line_errors() -> None:
    from swa_research.config import UserError

    for key in ("data.subset", "trainer.limit_train_batches", "trainer.limit_eval_batches",
                "trainer.overfit_batches"):
        with pytest.raises(UserError, match=rf"^{key}=-1: must be >= 0"):
            load_config(compose_config([f"{key}=-1"]))


@pytest.mark.slow
def test_debug_smoke_under_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "swa_research.train", "-m", "debug=smoke",
                        "model=simplified,preresnet110", *CPU, f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(json.loads((d / "metrics.json").read_text())["model"]["name"]
                   for d in sweep.iterdir() if (d / "metrics.json").is_file())
    assert names == ["preresnet110", "simplified"]


def _checked_budget(overrides: list[str]) -> int:
    """The checks a run makes once its data is known (the averaging and the schedule fit the
    budget), and the number of averaging points its plan holds."""
    from swa_research.config import iterations_per_epoch
    from swa_research.tasks import build_task
    from swa_research.training.averages import check_budget
    from swa_research.training.optim import check_schedule

    c = load_config(compose_config(overrides))
    data = build_task(c.task.name).build_data(c, torch.device("cpu"))
    iters = iterations_per_epoch(len(data.train), c.trainer.batch_size, c.trainer.drop_last)
    check_budget(c, iters)
    check_schedule(c.schedule, c.trainer.epochs * iters, "test")
    return plan_from_config(c.swa, c.schedule, c.trainer.epochs, iters).count_updates()


METHOD_OPTIONS = sorted(p.stem for p in (Path(__file__).parents[1] / "swa_research" / "conf"
                                         / "swa").glob("*.yaml"))


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_every_debug_option_fits_every_averaging_method(option: str, method: str) -> None:
    """Each debug preset leaves the averaging at least one point with every swa option (FGE
    included: its first model comes half a schedule.fge_cycle after the start)."""
    n = _checked_budget([f"debug={option}", f"swa={method}", "data=synthetic"])
    assert n >= 1 or method == "none"


@pytest.mark.parametrize("method", METHOD_OPTIONS)
def test_experiment_smoke_fits_every_averaging_method(method: str) -> None:
    assert _checked_budget(["experiment=smoke", f"swa={method}"]) >= 1 or method == "none"


@pytest.mark.parametrize("preset", ["debug=smoke", "experiment=smoke"])
def test_fge_runs_under_the_smoke_presets(preset: str, tmp_path: Path) -> None:
    m = train(compose_config([preset, "swa=fge", *CPU]), tmp_path)
    assert m["status"] == "finished" and m["fge"]["n_averaged"] >= 1


def test_a_fge_budget_error_names_the_users_key() -> None:
    from swa_research.config import UserError

    with pytest.raises(UserError, match=r"^schedule.fge_cycle=8: FGE collects its first model "
                                        r"half a cycle \(4 epochs\) after the start .* at most "
                                        r"2 epochs"):
        _checked_budget(["debug=smoke", "swa=fge", "schedule.fge_cycle=8", "data=synthetic"])


def test_best_by_val_without_a_validation_split_is_said(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        m = train(compose_config(["debug=fdr", "data=synthetic", "data.val_fraction=0", *CPU]),
                  tmp_path)
    assert m["sgd_best_val"]["epoch"] is None and not (tmp_path / "sgd_best_val.pt").exists()
    assert "no validation split (data.val_fraction=0): trainer.best_by=val_loss selects no " \
        "epoch" in caplog.text
