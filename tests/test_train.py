"""``train(cfg, run_dir)`` in-process on tiny synthetic data: every preset, every averaging
path, the run's files, reproducibility, and that the smoke preset learns."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, compose_config, group_options
from omegaconf import OmegaConf

from swa_research.averaging import AveragingPlan, has_batch_norm
from swa_research.config import Config, iterations_per_epoch, to_config
from swa_research.data import ImageSet, Preprocess, build_data
from swa_research.models import build_model
from swa_research.training.averages import plan_from_config
from swa_research.training.build import load_config, train
from swa_research.training.evaluation import evaluate

TOP_KEYS = {"status", "task", "sgd", "sgd_best_val", "swa", "averages", "calibration", "model",
            "train", "files", "split"}
EVAL_KEYS = {"test_acc", "test_loss", "val_acc", "val_loss"}
HISTORY_COLUMNS = [
    "epoch", "iteration", "lr", "train_loss", "train_acc",
    "sgd_val_loss", "sgd_val_acc", "sgd_test_loss", "sgd_test_acc",
    "swa_val_loss", "swa_val_acc", "swa_test_loss", "swa_test_acc", "swa_n_averaged",
]
CPU = torch.device("cpu")


class Run:
    """One finished in-process run and what it left in its run dir."""

    def __init__(self, overrides: list[str], run_dir: Path) -> None:
        self.overrides = overrides
        self.cfg = compose_config(overrides)
        self.config: Config = load_config(self.cfg)
        self.run_dir = run_dir
        self.returned = train(self.cfg, run_dir)
        self.metrics: dict[str, Any] = json.loads((run_dir / "metrics.json").read_text())
        with open(run_dir / "history.csv", newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or [])
            self.history = list(reader)

    @property
    def ipe(self) -> int:
        d, t = self.config.data, self.config.trainer
        n_train = d.train_size - int(d.val_fraction * d.train_size)
        return iterations_per_epoch(n_train, t.batch_size, t.drop_last)

    def plan(self) -> AveragingPlan:
        c = self.config
        return plan_from_config(c.swa, c.schedule, c.trainer.epochs, self.ipe)

    def checkpoint(self, name: str) -> dict[str, Any]:
        return torch.load(self.run_dir / name, map_location="cpu", weights_only=False)

    def model_from(self, name: str) -> torch.nn.Module:
        ckpt = self.checkpoint(name)
        model = build_model(ckpt["config"]["model"], self.config.data.num_classes)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return model


def run(overrides: list[str], run_dir: Path) -> Run:
    return Run(overrides, run_dir)


def expected_eval_epochs(config: Config) -> list[int]:
    t = config.trainer
    return [0] * t.eval_at_start + [e for e in range(1, t.epochs + 1)
                                    if e % t.eval_every == 0 or e == t.epochs]


def check_eval_values(values: dict[str, Any], has_val: bool) -> None:
    assert EVAL_KEYS <= set(values)
    for split in ("test", "val"):
        acc, loss = values[f"{split}_acc"], values[f"{split}_loss"]
        if split == "val" and not has_val:
            assert acc is None and loss is None
            continue
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0
        assert isinstance(loss, float) and math.isfinite(loss) and loss > 0


def check_run(r: Run) -> None:
    """Everything a finished run must satisfy, whatever its config."""
    m = r.metrics
    c = r.config
    has_val = int(c.data.val_fraction * c.data.train_size) > 0
    averaging = c.swa.method != "none"

    assert r.returned == m  # train() returns what it wrote
    assert set(m) == TOP_KEYS
    assert m["status"] == "finished"

    assert set(m["sgd"]) == EVAL_KEYS
    check_eval_values(m["sgd"], has_val)

    assert set(m["sgd_best_val"]) == EVAL_KEYS | {"epoch"}
    if has_val:
        check_eval_values(m["sgd_best_val"], has_val)
        assert m["sgd_best_val"]["epoch"] in expected_eval_epochs(c)
    else:
        assert all(v is None for v in m["sgd_best_val"].values())

    # An EMA records the settings its weights depend on beside its scores.
    settings = {"decay", "ema_warmup"} if c.swa.method == "ema" else set()
    assert set(m["swa"]) == EVAL_KEYS | {"n_averaged"} | settings
    assert m["averages"] == (["swa"] if averaging else [])
    assert m["model"]["name"] == c.model["name"]
    if c.trainer.save_checkpoints:
        net = r.model_from("sgd_final.pt")
        assert m["model"]["parameters"] == sum(p.numel() for p in net.parameters()) > 0
    expected_updates = r.plan().count_updates()
    if averaging:
        check_eval_values(m["swa"], has_val)
        assert expected_updates > 0
        assert m["swa"]["n_averaged"] == expected_updates
    else:
        assert all(m["swa"][k] is None for k in EVAL_KEYS)
        assert m["swa"]["n_averaged"] == 0

    # Calibration of both models on the test set: the NLL is the test cross-entropy.
    cal = m["calibration"]
    assert set(cal) == {"sgd", "swa"}
    assert cal["sgd"]["nll"] == pytest.approx(m["sgd"]["test_loss"], abs=1e-5)
    assert 0.0 <= cal["sgd"]["ece"] <= 1.0
    if averaging:
        assert cal["swa"]["nll"] == pytest.approx(m["swa"]["test_loss"], abs=1e-5)
        assert 0.0 <= cal["swa"]["ece"] <= 1.0
    else:
        assert cal["swa"] is None

    assert set(m["train"]) == {"epochs", "iterations", "wall_time_s", "images_per_s",
                               "peak_rss_mb", "peak_gpu_mb", "mfu", "average_bytes"}
    # Each average's bytes in this process, whole (no sharding here): its parameters and
    # buffers, counted independently.
    for name, sizes in m["train"]["average_bytes"].items():
        assert sizes["this_rank"] == sizes["whole"] > 0, name
    if averaging and c.swa.method in ("swa", "ema"):
        net = r.model_from("swa.pt")
        assert m["train"]["average_bytes"]["swa"]["whole"] == sum(
            t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    assert m["train"]["mfu"] is None  # a VGG does not count its FLOPs; a CPU has no peak
    # This process's peak so far: at least what torch and the data take, and not the machine.
    assert 100 < m["train"]["peak_rss_mb"] < 24 * 1024
    assert m["train"]["peak_gpu_mb"] is None  # on the CPU
    assert m["train"]["epochs"] == c.trainer.epochs
    assert m["train"]["iterations"] == c.trainer.epochs * r.ipe
    assert m["train"]["wall_time_s"] > 0
    assert m["train"]["images_per_s"] > 0

    # history.csv: one row per evaluation, the documented columns, the last row = metrics.
    assert r.columns == HISTORY_COLUMNS
    epochs = expected_eval_epochs(c)
    assert [int(row["epoch"]) for row in r.history] == epochs
    assert [int(row["iteration"]) for row in r.history] == [e * r.ipe for e in epochs]
    last = r.history[-1]
    for k in EVAL_KEYS:
        sgd, swa = m["sgd"][k], m["swa"][k]
        assert last[f"sgd_{k}"] == ("" if sgd is None else repr(sgd))
        assert last[f"swa_{k}"] == ("" if swa is None else repr(swa))
    assert int(last["swa_n_averaged"]) == m["swa"]["n_averaged"]
    n_avg = [int(row["swa_n_averaged"]) for row in r.history]
    assert n_avg == sorted(n_avg)  # the count only grows
    for row in r.history:
        assert float(row["lr"]) > 0
        if row["epoch"] == "0":  # trainer.eval_at_start: before any training
            assert row["train_loss"] == row["train_acc"] == ""
            continue
        assert math.isfinite(float(row["train_loss"]))
        assert 0.0 <= float(row["train_acc"]) <= 1.0

    # Files are written atomically: nothing temporary is left behind.
    leftovers = [p.name for p in r.run_dir.iterdir() if p.name.endswith(".tmp")
                 or p.name.startswith(".write-test")]
    assert leftovers == []

    # Checkpoints: each loads strictly into a fresh model, carries the resolved config, and
    # gives back exactly the test metrics that were reported for it.
    resolved = OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
    data = build_data(c.data, c.seed, CPU)
    pre = Preprocess(c.data.normalize, c.data.mean, c.data.std, CPU)

    def check_checkpoint(name: str, values: dict[str, Any]) -> dict[str, Any]:
        ckpt = r.checkpoint(name)
        assert ckpt["config"] == resolved
        assert to_config(ckpt["config"]) == c
        model = r.model_from(name)
        result = evaluate(model, data.test, pre, c.trainer.eval_batch_size)
        assert result["acc"] == values["test_acc"]
        assert result["loss"] == pytest.approx(values["test_loss"], rel=1e-5)
        return ckpt

    ckpt = check_checkpoint("sgd_final.pt", m["sgd"])
    assert ckpt["iteration"] == m["train"]["iterations"]
    if has_val:
        ckpt = check_checkpoint("sgd_best_val.pt", m["sgd_best_val"])
        assert ckpt["epoch"] == m["sgd_best_val"]["epoch"]
    else:
        assert not (r.run_dir / "sgd_best_val.pt").exists()
    if averaging:
        ckpt = check_checkpoint("swa.pt", m["swa"])
        assert ckpt["n_averaged"] == m["swa"]["n_averaged"]
        assert ckpt["method"] == c.swa.method
    else:
        assert not (r.run_dir / "swa.pt").exists()


# ---------------------------------------------------------------------------------------------
# Every experiment preset


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_preset_runs(experiment: str, tmp_path: Path) -> None:
    r = run([f"experiment={experiment}", *TINY], tmp_path)
    assert r.config.data.name == "synthetic"
    check_run(r)
    if r.config.data.val_fraction == 0:
        # The paper's presets train on the whole training set: no validation numbers at all.
        assert r.metrics["sgd"]["val_acc"] is None
        assert r.metrics["swa"]["val_loss"] is None
        assert all(row["sgd_val_loss"] == "" for row in r.history)


# ---------------------------------------------------------------------------------------------
# Averaging methods, schedules, batch norm


def test_no_averaging(tmp_path: Path) -> None:
    r = run([*TINY, "swa=none"], tmp_path)
    check_run(r)
    assert all(r.metrics["swa"][k] is None for k in EVAL_KEYS)
    assert not (tmp_path / "swa.pt").exists()
    assert all(row["swa_test_acc"] == "" and row["swa_n_averaged"] == "0" for row in r.history)


def test_an_evaluation_before_training(tmp_path: Path) -> None:
    """trainer.eval_at_start: history row 0 is the starting model (no training loss, no
    average yet), equal to evaluating a freshly built trainer; the run goes on as before."""
    from swa_research.training.build import build_trainer, config_dict_of

    overrides = [*TINY, "trainer.eval_at_start=true"]
    r = run(overrides, tmp_path / "run")
    check_run(r)
    first = r.history[0]
    assert (first["epoch"], first["iteration"]) == ("0", "0")
    assert first["train_loss"] == "" and first["swa_test_acc"] == ""
    assert [row["epoch"] for row in r.history] == ["0", "1", "2"]
    config = load_config(compose_config(overrides))
    fresh = build_trainer(config, config_dict_of(config), tmp_path / "fresh",
                          torch.device("cpu"))
    start = fresh.evaluate_all(0, None)
    assert float(first["sgd_test_acc"]) == start["sgd_test_acc"]
    assert float(first["sgd_test_loss"]) == pytest.approx(start["sgd_test_loss"], rel=1e-6)
    # Without it the same run has the same later rows.
    plain = run(TINY, tmp_path / "plain")
    assert plain.history[-1]["sgd_test_acc"] == r.history[-1]["sgd_test_acc"]


def test_ema(tmp_path: Path) -> None:
    r = run([*TINY, "swa=ema"], tmp_path)
    check_run(r)
    assert r.checkpoint("swa.pt")["method"] == "ema"
    # EMA keeps most of its initial copy, so it differs from the final SGD weights.
    assert r.metrics["swa"]["test_loss"] != r.metrics["sgd"]["test_loss"]


def test_cyclical_schedule(tmp_path: Path) -> None:
    r = run([*TINY, "optimizer=sgd", "optimizer.lr=0.01", "swa.lr=0.001", "swa.start=0.25",
             "schedule=cyclical", "schedule.cycle=2", "trainer.epochs=3"], tmp_path)
    check_run(r)
    # 9 iterations, start round(0.25 * 9) = 2: averaged at the end of each 2-iteration cycle
    # (iterations 4, 6, 8), whatever swa.freq says.
    assert r.ipe == 3
    assert r.metrics["swa"]["n_averaged"] == 3


def test_decay_then_constant_with_sgd(tmp_path: Path) -> None:
    r = run([*TINY, "optimizer=sgd", "optimizer.lr=0.01", "swa.lr=0.001",
             "schedule=decay_then_constant", "swa.unit=epoch", "trainer.epochs=4"], tmp_path)
    check_run(r)
    lrs = [float(row["lr"]) for row in r.history]
    assert lrs == sorted(lrs, reverse=True)  # never rises
    assert lrs[-1] == pytest.approx(0.001)  # swa.lr in the averaging phase
    assert r.metrics["swa"]["n_averaged"] == 3  # epochs 2, 3, 4


def test_batch_norm_average_gets_its_own_statistics(tmp_path: Path) -> None:
    r = run([*TINY, "model.batch_norm=true"], tmp_path)
    check_run(r)
    swa_model, sgd_model = r.model_from("swa.pt"), r.model_from("sgd_final.pt")
    assert has_batch_norm(swa_model)
    swa_bn = [m for m in swa_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    sgd_bn = [m for m in sgd_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # The average's running statistics were recomputed, not copied from the SGD model.
    for a, b in zip(swa_bn, sgd_bn, strict=True):
        assert a.running_mean is not None and b.running_mean is not None
        assert not torch.equal(a.running_mean, b.running_mean)
        assert a.momentum == b.momentum == 0.1  # update_bn restored the momentum


# ---------------------------------------------------------------------------------------------
# Reproducibility


def _comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(metrics))
    for key in ("wall_time_s", "images_per_s", "peak_rss_mb", "peak_gpu_mb"):
        del out["train"][key]
    return out


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    base = [*TINY, "model.batch_norm=true", "data.augment=crop_flip", "seed=3"]
    a = run(base, tmp_path / "a")
    b = run(base, tmp_path / "b")
    assert (tmp_path / "a" / "history.csv").read_bytes() == \
        (tmp_path / "b" / "history.csv").read_bytes()
    assert _comparable(a.metrics) == _comparable(b.metrics)
    for name in ("sgd_final.pt", "swa.pt"):
        sa, sb = a.checkpoint(name)["state_dict"], b.checkpoint(name)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    c = run([*base, "seed=4"], tmp_path / "c")
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]
    assert _comparable(c.metrics) != _comparable(a.metrics)


def test_evaluation_does_not_change_training(tmp_path: Path) -> None:
    """Evaluating after every epoch or only at the end gives the same final weights, with
    dropout on and the BN pass of the average running in between."""
    base = [*TINY, "model.batch_norm=true", "model.dropout=0.5", "optimizer.lr=0.01",
            "trainer.epochs=3", "swa.start=0.2"]
    every = run([*base, "trainer.eval_every=1"], tmp_path / "every")
    end = run([*base, "trainer.eval_every=3"], tmp_path / "end")
    assert len(every.history) == 3 and len(end.history) == 1
    assert every.history[-1] == end.history[-1]
    assert _comparable(every.metrics)["sgd"] == _comparable(end.metrics)["sgd"]
    assert _comparable(every.metrics)["swa"] == _comparable(end.metrics)["swa"]


# ---------------------------------------------------------------------------------------------
# Learning, and the model's mode


def test_smoke_preset_learns(tmp_path: Path) -> None:
    r = run(["experiment=smoke", "trainer.device=cpu", "trainer.progress=none",
             "trainer.num_workers=0"], tmp_path)
    check_run(r)
    m = r.metrics
    # 10 classes: chance is 0.1 (seed 0 reaches 0.78-0.83 depending on the data order).
    assert m["sgd"]["test_acc"] > 0.7
    assert m["swa"]["test_acc"] > 0.6
    assert m["sgd_best_val"]["test_acc"] > 0.7
    assert m["sgd"]["test_loss"] < 1.0
    losses = [float(row["train_loss"]) for row in r.history]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_the_mode(training: bool) -> None:
    model = build_model(dict(name="simplified", width=0.0625, dropout=0.5), num_classes=3)
    model.train(training)
    data = ImageSet(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8),
                    torch.tensor([0, 1, 2, 0, 1]))
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, CPU)
    result = evaluate(model, data, pre, batch_size=2)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert result["acc"] is not None and 0.0 <= result["acc"] <= 1.0
    assert result["loss"] is not None and result["loss"] > 0
    # Evaluation runs in eval mode: dropout off, so the result is repeatable.
    again = evaluate(model, data, pre, batch_size=5)
    assert again["acc"] == result["acc"]
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert evaluate(model, None, pre, batch_size=5)["acc"] is None


def test_train_leaves_no_temporary_files_with_a_preexisting_run_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    r = run([*TINY, "trainer.epochs=1", "swa.start=0"], tmp_path)
    check_run(r)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", "accuracy.png", "history.csv", "keep.txt", "loss_curves.png", "lr_schedule.png",
        "metrics.json", "reliability.png", "sgd_best_val.pt", "sgd_final.pt", "swa.pt"]


def test_history_logs_the_lr_each_epoch_trained_at(tmp_path: Path) -> None:
    """decay_then_constant per epoch with the average from epoch 2 (horizon 2 epochs): epochs
    1 and 2 train at 0.01 (t = 0, 0.5), epochs 3 and 4 at swa.lr; each row says so."""
    r = run(["experiment=smoke", *TINY, "schedule=decay_then_constant", "optimizer.lr=0.01",
             "swa.lr=0.001", "swa.unit=epoch", "swa.start=2", "swa.freq=1", "trainer.epochs=4"],
            tmp_path)
    assert [float(row["lr"]) for row in r.history] == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_evaluation_runs_in_eval_precision(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    import swa_research.training.trainer as trainer_module

    assert load_config(compose_config([])).trainer.eval_precision == "fp32"
    used: list[str] = []
    real = trainer_module.autocast

    def spy(precision: str, device: torch.device):  # noqa: ANN202
        used.append(precision)
        return real(precision, device)

    monkeypatch.setattr(trainer_module, "autocast", spy)
    caplog.set_level("INFO")
    r = run([*TINY, "trainer.epochs=1", "swa.start=0"], tmp_path)
    assert used and set(used) == {"fp32"}  # every evaluation and the calibration
    line = [m for m in caplog.messages if m.startswith("finished in")][-1]
    swa, sgd = r.metrics["swa"]["test_acc"], r.metrics["sgd"]["test_acc"]
    assert f"SWA {100 * swa:.2f}%" in line and f"gain {100 * (swa - sgd):+.2f} pp" in line
    assert line.endswith(f"results in {tmp_path}")
