"""TensorBoard, CSV and MLflow behind the trainer's logger interface: each read back from
what it wrote after a run, alone and several at once (logger=[tensorboard,csv])."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY, compose_config

from swa_research.config import UserError
from swa_research.training.build import load_config, train

RUN = [*TINY, "logger.log_every=2", "trainer.epochs=2"]


def test_several_trackers_compose_from_the_group() -> None:
    c = load_config(compose_config(["logger=[wandb,tensorboard,csv]"]))
    assert (c.logger.backend, c.logger.tensorboard, c.logger.csv, c.logger.mlflow) == \
        ("wandb", True, True, False)
    c = load_config(compose_config(["logger=tensorboard"]))
    assert (c.logger.backend, c.logger.tensorboard) == ("none", True)


def test_tensorboard_and_csv_hold_what_the_run_logged(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = train(compose_config([*RUN, "logger=[tensorboard,csv]"]), tmp_path)
    history = list(csv.DictReader((tmp_path / "history.csv").open()))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr", "sgd/val_loss", "sgd/test_acc", "swa/test_acc",
            "epoch/train_loss", "summary/swa/test_acc"} <= tags
    test_acc = events.Scalars("sgd/test_acc")
    assert [e.step for e in test_acc] == [int(r["iteration"]) for r in history]
    assert test_acc[-1].value == pytest.approx(float(history[-1]["sgd_test_acc"]), rel=1e-6)
    assert events.Scalars("summary/swa/test_acc")[0].value == pytest.approx(
        m["swa"]["test_acc"], rel=1e-6)
    assert len(events.Scalars("train/loss")) == m["train"]["iterations"] // 2
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("eval") == len(history) and kinds[-1] == "summary"
    assert kinds.count("step") == m["train"]["iterations"] // 2
    evals = [r for r in rows if r["kind"] == "eval"]
    assert float(evals[-1]["swa/test_acc"]) == float(history[-1]["swa_test_acc"])
    assert float(rows[-1]["swa/test_acc"]) == m["swa"]["test_acc"]


def test_mlflow_holds_the_params_metrics_and_status(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: a local file store
    uri = f"file:{tmp_path / 'mlruns'}"
    run_dir = tmp_path / "run"
    m = train(compose_config([*RUN, "logger=mlflow", f"logger.mlflow_uri={uri}",
                              "logger.project=swa-test"]), run_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run((run_dir / "mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "swa-test"
    assert run.data.params["swa.lr"] == str(load_config(compose_config(RUN)).swa.lr)
    history = client.get_metric_history(run.info.run_id, "swa.test_acc")
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [h.step for h in history] == [int(r["iteration"]) for r in rows if r["swa_test_acc"]]
    assert run.data.metrics["summary.swa.test_acc"] == pytest.approx(m["swa"]["test_acc"])
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


def test_an_unreachable_mlflow_server_costs_at_most_logger_init_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts the connection and never answers, and a closed port: each start
    waits at most logger.init_timeout (not MLflow's minutes of retries), warns, and the run
    finishes without MLflow."""
    import socket
    import time

    pytest.importorskip("mlflow")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        for i, port in enumerate((silent.getsockname()[1], closed_port)):
            t0 = time.perf_counter()
            m = train(compose_config([*RUN, "logger=mlflow", "logger.init_timeout=2",
                                      f"logger.mlflow_uri=http://127.0.0.1:{port}"]),
                      tmp_path / str(i))
            assert m["status"] == "finished"
            assert time.perf_counter() - t0 < 30
            assert "MLflow: could not start" in caplog.text
    finally:
        silent.close()


def test_a_tracker_without_its_package_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r'^logger=mlflow needs the mlflow package: pip install '
                                        r'"swa_research\[mlflow\]"'):
        train(compose_config([*RUN, "logger=mlflow"]), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_a_tracker_that_cannot_start_warns_and_the_run_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mlflow")
    m = train(compose_config([*RUN, "logger=[mlflow,csv]",
                              "logger.mlflow_uri=nosuchscheme://nowhere"]), tmp_path / "r")
    assert m["status"] == "finished"
    assert "MLflow: could not start" in caplog.text
    assert (tmp_path / "r" / "csv" / "metrics.csv").is_file()
