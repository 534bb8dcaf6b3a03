"""The W&B logger, checked on what real offline runs wrote (no mocking of wandb), and the W&B
sweep specs in sweeps/."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY, compose_config

from swa_research.config import LoggerConfig
from swa_research.tracking import loggers
from swa_research.tracking.loggers import WandbLogger, resolve_mode, summary_values
from swa_research.training.build import load_config, train
from swa_research.training.trainer import TrainingDiverged

WANDB_TINY = [*TINY, "logger=wandb", "logger.mode=offline"]


def clean_env(home: Path) -> dict[str, str]:
    """No API key, no mode, no netrc: what a fresh machine has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), OMP_NUM_THREADS="1",
               WANDB_CONFIG_DIR=str(home / ".config" / "wandb"))
    return env


def read_offline(run_dir: Path) -> dict[str, Any]:
    """Config, summary, history rows, run record and exit code of the offline run(s) in a run
    dir, read back from the .wandb file with `wandb leet inspect --json`."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {run_dir}, found {runs}"
    return read_offline_folder(runs[0])


def read_offline_folder(folder: Path) -> dict[str, Any]:
    """What read_offline reads, of one offline run's folder."""
    # Through the running interpreter: a virtualenv that is not activated has no `wandb` on
    # PATH.
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(folder)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    result: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "exit_code": None}
    for line in out.splitlines():
        rec = json.loads(line)
        kind = rec["type"]
        if kind == "run":
            result["run"] = rec["run"]
            result["config"].update(rec["run"].get("config", {}).get("update", {}))
        elif kind == "config":
            result["config"].update(rec["config"].get("update", {}))
        elif kind == "summary":
            result["summary"].update(rec["summary"].get("update", {}))
        elif kind == "history":
            result["history"].append(rec["history"]["item"])
        elif kind == "exit":
            result["exit_code"] = rec["exit"]["exit_code"]
    return result


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("wandb_run")
    metrics = train(compose_config(["experiment=smoke", *WANDB_TINY, "logger.log_every=2",
                                    "logger.tags=[a,b]", "swa.lr=0.0007"]),
                    run_dir, run_name="swa.lr=0.0007")
    return run_dir, metrics


def test_offline_run_holds_config_summary_history(offline_run) -> None:
    run_dir, metrics = offline_run
    rec = read_offline(run_dir)
    assert rec["exit_code"] == 0
    assert rec["run"]["display_name"] == "swa.lr=0.0007"
    assert rec["run"]["tags"] == ["a", "b"]
    # The config is flat, with the command-line names as keys.
    cfg = rec["config"]
    assert cfg["swa.lr"] == 0.0007 and cfg["model.name"] == "simplified"
    assert cfg["data.name"] == "synthetic" and cfg["logger.backend"] == "wandb"
    # Summary: the dashboard's table columns, equal to metrics.json.
    s = rec["summary"]
    assert s["status"] == "finished"
    for model in ("sgd", "sgd_best_val", "swa"):
        for key in ("test_acc", "test_loss", "val_acc", "val_loss"):
            assert s[f"{model}/{key}"] == pytest.approx(metrics[model][key])
    assert s["swa/n_averaged"] == metrics["swa"]["n_averaged"] > 0
    gain = metrics["swa"]["test_acc"] - metrics["sgd"]["test_acc"]
    assert s["swa_gain"] == pytest.approx(gain)
    assert s["swa_gain/test_loss"] == pytest.approx(
        metrics["swa"]["test_loss"] - metrics["sgd"]["test_loss"])
    # History: per-step rows (train loss, lr) and one row per evaluation matching history.csv.
    steps = [h for h in rec["history"] if "train/loss" in h]
    assert [h["iteration"] for h in steps] == list(range(2, metrics["train"]["iterations"] + 1, 2))
    evals = [h for h in rec["history"] if "sgd/test_acc" in h]
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [h["epoch"] for h in evals] == [int(r["epoch"]) for r in rows]
    for h, r in zip(evals, rows, strict=True):
        assert h["sgd/test_acc"] == pytest.approx(float(r["sgd_test_acc"]))
        assert h["epoch/images_per_s"] > 0
        if r["swa_test_acc"]:
            assert h["swa/test_acc"] == pytest.approx(float(r["swa_test_acc"]))
    # Plots logged as images; metrics.json, history.csv and the PNGs saved with the run.
    assert {"plots/accuracy", "plots/loss_curves"} <= {k.split(".")[0] for k in s}
    files = {p.name for p in (run_dir / "wandb").glob("offline-run-*/files/*")}
    assert {"metrics.json", "history.csv", "accuracy.png", "loss_curves.png"} <= files


def test_failed_job_is_a_failed_run_and_the_next_is_separate(tmp_path: Path) -> None:
    bad = compose_config(["experiment=smoke", *WANDB_TINY, "optimizer=sgd",
                          "optimizer.lr=1e12", "swa.lr=1e12"])
    with pytest.raises(TrainingDiverged):
        train(bad, tmp_path / "bad")
    good_metrics = train(compose_config(["experiment=smoke", *WANDB_TINY]), tmp_path / "good")
    bad_rec, good_rec = read_offline(tmp_path / "bad"), read_offline(tmp_path / "good")
    assert bad_rec["exit_code"] == 1 and bad_rec["summary"]["status"] == "diverged"
    assert good_rec["exit_code"] == 0 and good_rec["summary"]["status"] == "finished"
    assert bad_rec["run"]["run_id"] != good_rec["run"]["run_id"]
    good_epochs = [h["epoch"] for h in good_rec["history"] if "sgd/test_acc" in h]
    assert good_epochs == list(range(1, good_metrics["train"]["epochs"] + 1))
    assert json.loads((tmp_path / "bad" / "metrics.json").read_text())["status"] == "diverged"


@pytest.mark.slow  # a run's name and W&B record: the offline run above, in the default run
def test_multirun_gives_one_group_and_named_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "swa_research.train", "-m", "experiment=smoke", *TINY,
         "logger=wandb", "swa.lr=0.001,0.002", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [read_offline(sweep / str(i)) for i in (0, 1)]
    groups = {rec["run"].get("run_group") for rec in recs}
    assert groups == {sweep.name}
    names = [rec["run"]["display_name"] for rec in recs]
    assert names[0] != names[1] and "swa.lr=0.001" in names[0] and "swa.lr=0.002" in names[1]
    assert all(rec["exit_code"] == 0 for rec in recs)


@pytest.mark.slow  # in this process: test_resolve_mode_asks_wandb_for_its_key, ..._how_to_sync
def test_auto_mode_without_a_key_runs_offline_and_never_prompts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "swa_research.train", "experiment=smoke", *TINY, "logger=wandb",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_offline(run_dir)["exit_code"] == 0
    assert "W&B logging is off" not in r.stderr
    # The terminal says where the run went and how to upload it.
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    assert f"wandb sync {folder}" in r.stdout


def test_online_without_a_key_logs_offline_with_the_sync_hint(tmp_path: Path) -> None:
    # Online without an API key: an offline run (the record kept), one warning that says so
    # and how to upload it; W&B is not turned off.
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "swa_research.train", "experiment=smoke", *TINY, "logger=wandb",
         "logger.mode=online", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert "W&B logging is off" not in log
    assert log.count("logger.mode=online, but no W&B API key is configured") == 1
    assert "Upload it after a login with: wandb sync " in log
    assert read_offline(run_dir)["summary"]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


KEY = "k" * 40  # the shape of a W&B API key


@pytest.fixture
def fresh_wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine where nobody ran `wandb login`, and a wandb that (re)reads its settings."""
    from wandb.sdk import wandb_setup

    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".config" / "wandb"))
    # wandb loads its settings (WANDB_BASE_URL, ...) once per process: start from none.
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    return tmp_path


def write_netrc(path: Path, base_url: str) -> None:
    from urllib.parse import urlsplit

    path.write_text(f"machine {urlsplit(base_url).netloc}\n  login user\n  password {KEY}\n")


def test_resolve_mode_asks_wandb_for_its_key(fresh_wandb_env: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from wandb.sdk import wandb_setup

    netrc = fresh_wandb_env / ".netrc"
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online" and resolve_mode("disabled") == "disabled"
    # What `wandb login` writes: a netrc entry for the host wandb itself uses by default
    # (not api.wandb.ai since wandb 0.31).
    default_url = wandb_setup.singleton().settings.base_url
    write_netrc(netrc, default_url)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert resolve_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    # Another server: only a key for that host counts.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    write_netrc(netrc, default_url)
    assert resolve_mode("auto") == "offline"
    write_netrc(netrc, "https://wandb.example.com")
    assert resolve_mode("auto") == "online"


def test_offline_run_says_how_to_sync(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="swa_research.tracking.loggers")
    lg = WandbLogger(LoggerConfig(backend="wandb", mode="offline"), tmp_path, {"a": 1})
    try:
        folder = Path(lg.run.dir).parent
        assert folder.parent == tmp_path / "wandb" and folder.name.startswith("offline-run-")
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "swa_research.tracking.loggers"]
        assert any(f"wandb sync {folder}" in line for line in lines), lines
    finally:
        lg.finish({"status": "finished"})


def unreachable_wandb(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """wandb.init fails online as wandb-core does when nothing answers, and works offline;
    the (mode, init_timeout) of every call, in order."""
    import wandb

    real_init, modes = wandb.init, []

    def init(*args: Any, **kwargs: Any) -> Any:
        modes.append((kwargs["mode"], kwargs["settings"].init_timeout))
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Run initialization has timed out.")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return modes


def test_online_init_timeout_falls_back_to_an_offline_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    modes = unreachable_wandb(monkeypatch)
    monkeypatch.setattr(loggers, "api_key_configured", lambda: True)  # online is tried
    caplog.set_level(logging.INFO, logger="swa_research.tracking.loggers")
    lg = WandbLogger(LoggerConfig(backend="wandb", mode="online", init_timeout=5.0), tmp_path,
                     {"a": 1})
    assert lg.run is not None and lg.run.offline
    assert modes[0] == ("online", 5.0)
    # The offline fallback waits for wandb's local service as long as a busy machine needs.
    assert modes[1] == ("offline", 300.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    folder = Path(lg.run.dir).parent
    assert "offline run" in warnings[0] and f"wandb sync {folder}" in warnings[0]
    assert "W&B logging is off" not in caplog.text
    lg.log_eval({"epoch": 1, "iteration": 2, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5})
    lg.finish({"status": "finished"})
    assert lg.run is None and not lg._warned
    rec = read_offline(tmp_path)
    assert rec["exit_code"] == 0 and rec["summary"]["status"] == "finished"


def test_disabled_mode_and_summary_without_average(tmp_path: Path) -> None:
    lg = WandbLogger(LoggerConfig(backend="wandb", mode="disabled"), tmp_path, {"a": {"b": 1}})
    lg.log_eval({"epoch": 1, "iteration": 2, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5})
    lg.finish({"status": "finished"})
    s = summary_values({"status": "finished", "sgd": {"test_acc": 0.5, "test_loss": 1.0},
                        "swa": {"test_acc": None, "test_loss": None}})
    assert s["swa_gain"] is None and s["sgd/test_acc"] == 0.5


# -- W&B sweep specs ---------------------------------------------------------------------------

SPECS = sorted((Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))


def test_there_are_sweep_specs() -> None:
    assert {"seed_swa_lr", "paper_vgg16_bayes"} <= {p.stem for p in SPECS}


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_sweep_spec_is_valid(spec_path: Path) -> None:
    spec = yaml.safe_load(spec_path.read_text())  # PyYAML, as the wandb CLI reads it
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["metric"]["goal"] in ("maximize", "minimize")
    assert "/" in spec["metric"]["name"]  # a key this project logs to the summary
    cmd = spec["command"]
    assert cmd[:4] == ["${env}", "${interpreter}", "-m", "${program}"]
    assert cmd[-1] == "${args_no_hyphens}" and "-m" not in cmd[4:]
    assert spec["program"] == "swa_research.train"
    fixed = [c for c in cmd[4:-1]]
    for key, param in spec["parameters"].items():
        values = param.get("values", [param.get("value", param.get("min"))])
        for bound in ("min", "max"):
            if bound in param:
                values.append(param[bound])
        for v in values:
            assert isinstance(v, (int, float)) and not isinstance(v, bool), (key, v)
        # Every parameter is a real config key: compose it as the agent would pass it.
        overrides = [*fixed, *(f"{key}={v}" for v in values[:1])]
        config = load_config(compose_config(overrides))
        node: Any = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == pytest.approx(values[0])


def test_an_agents_run_id_is_kept_in_the_run_dir(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a W&B agent (WANDB_SWEEP_ID set) the agent's run id is the run's, and it is kept in
    wandb_run_id.txt, where the post-hoc tool and the dashboard find the run's W&B record."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # (the id: wandb's own choice here)
    lg = WandbLogger(LoggerConfig(backend="wandb", mode="offline"), tmp_path, {"a": 1})
    try:
        assert lg.run is not None and lg.run.id
        assert (tmp_path / loggers.WANDB_ID_FILE).read_text().strip() == lg.run.id
    finally:
        lg.finish({"status": "finished"})
