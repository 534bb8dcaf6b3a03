"""The task seam: a second task is one file and one registry line (tests/regression_task.py,
registered by importing it here), and trains, evaluates, logs, reports and averages post hoc
through the whole framework with its own metric names."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import regression_task  # noqa: F401 - the registry line: registers task "regression"
import torch
from conftest import TINY, compose_config
from omegaconf import OmegaConf
from regression_task import Regression

from swa_research.analysis.posthoc import main as posthoc_main
from swa_research.analysis.report import write_report
from swa_research.config import UserError
from swa_research.tasks import TASKS, TaskMetrics, build_task
from swa_research.tracking.loggers import history_columns
from swa_research.tracking.plots import plot_files
from swa_research.training.build import load_config, train

# A configuration that learns at this size (a BN VGG11 with SGD; the smoke VGG "simplified"
# starts on a plateau): test MAE about half of predicting the mean within 6 epochs.
REGRESSION = [*TINY, "task=regression", "trainer.best_by=val_mae", "data.val_fraction=0.25",
              "model=vgg11", "model.width=0.125", "model.dropout=0", "model.batch_norm=true",
              "data.normalize=true", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
              "optimizer=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.05", "swa.lr=0.05",
              "trainer.epochs=6", "swa.start=3", "swa.unit=epoch", "swa.also=[ema]",
              "swa.decay=0.9", "logger=csv", "trainer.snapshot_every=1",
              "trainer.snapshot_unit=epoch"]


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, Any]]]:
    """Two seeds of the regression task in one sweep folder."""
    sweep = tmp_path_factory.mktemp("regression")
    out = []
    for seed in (0, 1):
        run_dir = sweep / str(seed)
        cfg = compose_config([*REGRESSION, f"seed={seed}"])
        train(cfg, run_dir)
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as the entry point does
        out.append((run_dir, json.loads((run_dir / "metrics.json").read_text())))
    return out


def test_the_registry_holds_both_tasks_and_refuses_an_unknown_one() -> None:
    assert {"classification", "regression"} <= set(TASKS)
    assert isinstance(build_task("regression"), Regression)
    with pytest.raises(UserError, match=r"task=nope: unknown task; choose one of "
                                        r"classification, lm, regression"):
        build_task("nope")


def test_a_second_task_learns_with_its_own_metric_names(runs) -> None:
    run_dir, m = runs[0]
    assert m["status"] == "finished"
    assert m["task"] == Regression.spec.record()
    assert TaskMetrics.of_run(m) == Regression.spec
    for model in ("sgd", "sgd_best_val", "swa", "ema"):
        assert {"test_loss", "test_mae", "val_loss", "val_mae"} <= set(m[model])
        assert not any(k.endswith("_acc") for k in m[model])
    assert m["calibration"] is None  # no class probabilities, no calibration
    columns, rows = read_rows(run_dir / "history.csv")
    assert columns == history_columns(["swa", "ema"], ("loss", "mae"))
    # It learns: every model's test MAE is well below predicting the training mean (0.25).
    config = load_config(compose_config(REGRESSION))
    data = build_task("regression").build_data(config, torch.device("cpu"))
    baseline = (data.test.labels - data.train.labels.mean()).abs().mean().item()
    for model in ("sgd", "swa", "ema"):
        assert m[model]["test_mae"] < 0.7 * baseline, (model, m[model], baseline)
    # The targets are the task file's: the class index scaled to [0, 1].
    assert data.test.labels.dtype == torch.float32
    assert {round(9 * v, 4) for v in data.test.labels.tolist()} <= set(range(10))
    # The best SGD model is chosen by val_mae, lower being better.
    vals = [float(r["sgd_val_mae"]) for r in rows if r["sgd_val_mae"]]
    assert m["sgd_best_val"]["val_mae"] == pytest.approx(min(vals), rel=1e-12)
    # The MSE loss and the MAE of one row agree with each other's meaning: MAE^2 <= MSE.
    last = rows[-1]
    assert float(last["swa_test_mae"]) ** 2 <= float(last["swa_test_loss"]) + 1e-12


def test_trackers_and_plots_take_the_task_names(runs) -> None:
    run_dir, _ = runs[0]
    text = (run_dir / "csv" / "metrics.csv").read_text()
    assert "sgd/test_mae" in text and "swa/val_mae" in text and "epoch/train_mae" in text
    header = text.splitlines()[0].split(",")
    assert {"swa_gain/test_mae", "swa_gain", "sgd_best_val/val_mae"} <= set(header)
    assert "test_acc" not in text
    for name in plot_files(("loss", "mae")):
        assert (run_dir / name).is_file(), name
    assert plot_files(("loss", "mae")) == ["loss_curves.png", "mae.png"]


def test_the_sweep_report_leads_with_the_task_headline(runs) -> None:
    sweep = runs[0][0].parent
    report = write_report(sweep, use_wandb=False)
    assert report.spec == Regression.spec
    header, rows = read_rows(sweep / "report.csv")
    assert {"sgd_test_mae_mean", "swa_test_mae_mean", "ema_test_mae_mean",
            "swa_test_loss_mean", "swa_gain_mean"} <= set(header)
    assert not any(h.endswith("_acc") for h in header)
    row = report.rows[0]
    assert row.gain.n == 2
    # The gain is SGD minus SWA for an error (positive: SWA lower), paired by run.
    diffs = [m["sgd"]["test_mae"] - m["swa"]["test_mae"] for _, m in runs]
    assert row.gain.mean == pytest.approx(sum(diffs) / 2, rel=1e-12)
    assert "final SGD minus SWA test mean absolute error" in report.markdown
    assert float(rows[0]["swa_gain_mean"]) == pytest.approx(row.gain.mean, rel=1e-9)
    assert (sweep / "report_mae.png").is_file()  # the headline metric's curves
    assert not (sweep / "report_accuracy.png").exists()


def test_posthoc_averages_over_the_task_metrics(runs, capsys: pytest.CaptureFixture) -> None:
    run_dir, m = runs[0]
    assert posthoc_main([str(run_dir), "--device", "cpu"]) == 0
    header, rows = read_rows(run_dir / "posthoc.csv")
    assert {"val_mae", "test_mae", "val_loss", "test_loss"} <= set(header)
    assert "nll" not in header and "test_acc" not in header
    out = capsys.readouterr().out
    assert "best by validation mean absolute error" in out
    # The best is the setting of the lowest validation MAE (lower is better for an error).
    best = min(rows, key=lambda r: float(r["val_mae"]))
    assert f"val {float(best['val_loss']):.4f} {float(best['val_mae']):.4f}" in out


@pytest.mark.parametrize(("extra", "error"), [
    (["swa.also=[swag]"], r"averaging method swag \(swa.method or swa.also\): its model "
                          r"average averages class probabilities, which task regression does "
                          r"not predict"),
    (["trainer.best_by=val_acc"], r"trainer.best_by=val_acc: task regression reports "
                                  r"val_loss, val_mae"),
])
def test_what_a_task_cannot_do_is_one_line(extra: list[str], error: str, tmp_path: Path
                                           ) -> None:
    with pytest.raises(UserError, match=error):
        train(compose_config([*REGRESSION, "logger=none", "trainer.snapshot_every=0", *extra]),
              tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed"


def test_the_wandb_dashboard_plots_the_task_headline(runs) -> None:
    from swa_research.analysis.dashboard import build_dashboard
    from swa_research.analysis.report import build_report

    sweep = runs[0][0].parent
    spec = build_dashboard(build_report([sweep], root=sweep))  # checks every panel is logged
    scatter = next(p for p in spec["panels"] if p["id"] == "scatter")
    assert (scatter["x"], scatter["y"]) == ("sgd/test_mae", "swa/test_mae")
    assert "below the diagonal" in scatter["title"]
    curves = next(p for p in spec["panels"] if p["id"] == "accuracy_curves")
    assert curves["y"] == ["sgd/test_mae", "swa/test_mae", "ema/test_mae"]
