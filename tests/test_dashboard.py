"""The W&B dashboard of a sweep (swa_research.analysis.dashboard): its specification built from fake
sweep dirs and from a real offline multirun, the command's errors, offline mode with the network
blocked, and the conversion to wandb-workspaces' report objects (built, never saved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY
from test_report import fake_run
from test_wandb import clean_env, read_offline

from swa_research.analysis import dashboard
from swa_research.analysis.dashboard import (
    build_dashboard,
    dashboard_spec,
    end_of_sweep,
    logged_keys,
    panel_metrics,
    to_report,
)
from swa_research.analysis.report import build_report

PANELS = {"scatter", "swa_gain", "swa_gain_ci", "accuracy_curves", "parallel",
          "calibration_ece", "calibration_nll", "report_table"}


def wandb_run(path: Path, seed: int, swa_lr: float, dashboard_on: bool = True,
              **kw: Any) -> None:
    """fake_run's run dir as a job of a multirun with logger=wandb (offline) left it."""
    fake_run(path, seed, swa_lr, **kw)
    sweep = path.parent
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "swa": {"lr": swa_lr},
         "logger": {"backend": "wandb", "mode": "offline", "project": "swa-test",
                    "entity": None, "group": None, "dashboard": dashboard_on}}))
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(sweep)}}}))
    (path / "wandb_run_id.txt").write_text(f"id{seed}{swa_lr}\n")
    metrics_path = path / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics["calibration"] = {"sgd": {"nll": 1.2, "ece": 0.06},
                                  "swa": {"nll": 1.1, "ece": 0.03}}
        metrics_path.write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """swa.lr 0.1 over three seeds and a diverged job, swa.lr 0.2 over one seed."""
    top = tmp_path / "2026-01-01_00-00-00_abc"
    for i, (seed, sgd, swa) in enumerate(((0, 0.50, 0.53), (1, 0.60, 0.61), (2, 0.55, 0.60))):
        wandb_run(top / str(i), seed, 0.1, sgd=sgd, swa=swa, best=sgd - 0.01)
    wandb_run(top / "3", 3, 0.1, status="diverged", sgd=0.1, swa=0.1)
    wandb_run(top / "4", 0, 0.2, sgd=0.7, swa=0.75)
    return top


def panels(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in spec["panels"]}


def test_spec_holds_every_panel_grouped_by_the_swept_keys(sweep: Path) -> None:
    before = sorted(sweep.rglob("*"))
    spec = dashboard_spec(sweep)
    report = build_report([sweep], root=sweep)
    assert build_dashboard(report) == spec  # a pure function of the sweep
    assert sorted(sweep.rglob("*")) == before  # nothing written
    p = panels(spec)
    assert set(p) == PANELS
    # The runs: the multirun's W&B group (the sweep folder's name), in the runs' project and
    # mode, grouped by the swept keys as the sweep report groups them.
    assert (spec["group"], spec["project"], spec["mode"]) == (sweep.name, "swa-test", "offline")
    assert spec["runset"]["filters"] == f"Group = '{sweep.name}'"
    assert spec["keys"] == ["swa.lr"]
    assert spec["runset"]["groupby"] == ["config.swa.lr.value"]
    for pid in ("swa_gain", "accuracy_curves", "calibration_ece", "calibration_nll"):
        assert p[pid]["groupby"] == ["config.swa.lr.value"], pid
    confs = spec["configurations"]
    assert [c["label"] for c in confs] == [r.label for r in report.rows] \
        == ["swa.lr=0.1", "swa.lr=0.2"]
    assert confs[0]["runs"] == ["0", "1", "2"] and confs[0]["failed"] == ["3"]
    assert confs[0]["wandb_run_ids"] == ["id00.1", "id10.1", "id20.1", "id30.1"]
    assert len({c["color"] for c in confs}) == 2
    # The scatter: one point per run, both axes on one range: the diagonal is SWA = SGD.
    s = p["scatter"]
    assert (s["x"], s["y"], s["points"], s["color_by"]) == ("sgd/test_acc", "swa/test_acc",
                                                            "run", "configuration")
    lo, hi = s["range_x"]
    assert s["range_y"] == [lo, hi] and s["diagonal"] == [[lo, lo], [hi, hi]]
    assert lo < 0.5 and hi > 0.75  # every run's point lies inside
    # The gain with the report's 95% interval (the same numbers), and no interval for n = 1.
    for conf, row in zip(confs, report.rows, strict=True):
        g = conf["swa_gain"]
        assert (g["mean"], g["low"], g["high"], g["n"]) == (row.gain.mean, row.gain.low,
                                                            row.gain.high, row.gain.n)
    assert confs[0]["swa_gain"]["mean"] == pytest.approx(0.03)
    assert confs[0]["swa_gain"]["low"] < 0.03 < confs[0]["swa_gain"]["high"]
    assert confs[1]["swa_gain"]["low"] is None
    text = p["swa_gain_ci"]["text"]
    assert f"[{100 * report.rows[0].gain.low:+.2f}, {100 * report.rows[0].gain.high:+.2f}]" \
        in text
    # Curves of SGD and the average, mean with a band; parallel coordinates to swa/test_acc.
    curves = p["accuracy_curves"]
    assert (curves["x"], curves["y"]) == ("epoch", ["sgd/test_acc", "swa/test_acc"])
    assert (curves["aggregate"], curves["range"]) == ("mean", "stddev")
    assert p["parallel"]["columns"] == ["config.swa.lr.value", "summary:swa/test_acc"]
    # The report's table as the report writes report.csv, calibration included.
    columns, data = report.csv_rows()
    assert p["report_table"]["columns"] == columns and len(p["report_table"]["rows"]) == 2
    assert p["report_table"]["table"] == "report/table"
    assert {"sgd_ece_mean", "swa_ece_mean", "swa_gain_ci95_low"} <= set(columns)
    assert p["calibration_ece"]["metrics"] == ["calibration/sgd_ece", "calibration/swa_ece"]
    assert "summary:calibration/swa_ece" in spec["runset"]["columns"]
    assert "config:swa.lr.value" in spec["runset"]["columns"]
    json.dumps(spec, allow_nan=False)  # valid JSON as written


def test_every_panel_metric_is_a_logged_key(sweep: Path) -> None:
    spec = dashboard_spec(sweep)
    named = panel_metrics(spec)
    assert {"sgd/test_acc", "swa/test_acc", "swa_gain", "calibration/swa_nll"} <= set(named)
    assert set(named) <= logged_keys(spec["averages"])
    # A further average's curves and calibration come from what the logger logs for it.
    assert {"ema/test_acc", "calibration/ema_ece"} <= logged_keys(["swa", "ema"])
    assert "ema/test_acc" not in logged_keys(["swa"])


def test_a_renamed_metric_fails_instead_of_an_empty_panel(sweep: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "GAIN", "swa_gain/test_accuracy")
    with pytest.raises(ValueError, match="swa_gain/test_accuracy"):
        dashboard_spec(sweep)


def test_one_configuration_with_failed_runs(tmp_path: Path) -> None:
    top = tmp_path / "sweep"
    wandb_run(top / "0", 0, 0.1, sgd=0.5, swa=0.52)
    wandb_run(top / "1", 1, 0.1, sgd=0.6, swa=0.63)
    wandb_run(top / "2", 2, 0.1, status=None)  # died before metrics.json
    spec = dashboard_spec(top)
    assert set(panels(spec)) == PANELS
    assert spec["keys"] == [] and spec["runset"]["groupby"] == ["group"]
    (conf,) = spec["configurations"]
    assert conf["label"] == "all runs" and conf["runs"] == ["0", "1"]
    assert conf["failed"] == ["2"] and conf["swa_gain"]["n"] == 2
    assert conf["swa_gain"]["low"] is not None
    assert panels(spec)["parallel"]["columns"] == ["summary:swa/test_acc"]
    # Only failed runs: still a dashboard, without numbers.
    only_failed = tmp_path / "failed"
    wandb_run(only_failed / "0", 0, 0.1, status="diverged")
    spec = dashboard_spec(only_failed)
    assert spec["configurations"][0]["swa_gain"]["mean"] is None
    assert panels(spec)["scatter"]["range_x"] == [0.0, 1.0]


def test_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert dashboard.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: no such folder\n"
    (tmp_path / "empty").mkdir()
    assert dashboard.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run dirs") and err.count("\n") == 1
    assert not (tmp_path / "empty" / "dashboard.json").exists()
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.json").write_text('{"status": "finished"}')
    assert dashboard.main([str(run)]) == 2
    assert "is one run's dir, not a sweep dir" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "metrics.json"]


def test_offline_command_writes_the_spec_with_the_network_blocked(sweep: Path,
                                                                  tmp_path: Path) -> None:
    # No API key, no WANDB_MODE, logger.mode=auto: every socket other than a local one raises
    # and is recorded; the command must not try one.
    for d in sorted(sweep.iterdir()):
        cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        cfg["logger"]["mode"] = "auto"
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    site = tmp_path / "site"
    site.mkdir()
    attempts = tmp_path / "attempts.txt"
    (site / "sitecustomize.py").write_text(
        "import os, socket\n"
        "def _refuse(what):\n"
        "    with open(os.environ['NET_ATTEMPTS'], 'a') as f:\n"
        "        f.write(what + '\\n')\n"
        "    raise OSError('network blocked by the test: ' + what)\n"
        "_connect = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    if self.family != socket.AF_UNIX:\n"
        "        _refuse(f'connect {address}')\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = connect\n"
        "socket.getaddrinfo = lambda *a, **k: _refuse(f'getaddrinfo {a[:2]}')\n")
    env = {**clean_env(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "NET_ATTEMPTS": str(attempts)}
    r = subprocess.run([sys.executable, "-m", "swa_research.dashboard", str(sweep)],
                       env=env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not attempts.exists(), attempts.read_text()
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("W&B dashboard: the runs logged offline")
    assert lines[0].endswith(f"python -m swa_research.dashboard {sweep} --publish")
    spec = json.loads((sweep / "dashboard.json").read_text())
    assert spec["mode"] == "offline" and set(panels(spec)) == PANELS
    assert not list(sweep.glob(".dashboard.json.*"))  # written atomically, nothing left over
    # The blocker works: a connection from the same interpreter is refused and recorded.
    probe = subprocess.run([sys.executable, "-c", "import socket; "
                            "socket.create_connection(('192.0.2.1', 443), timeout=1)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and attempts.exists()


def test_group_option_and_end_of_sweep_hook(sweep: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    assert dashboard.main([str(sweep), "--group", "my-group"]) == 0
    spec = json.loads((sweep / "dashboard.json").read_text())
    assert spec["group"] == "my-group" and spec["runset"]["filters"] == "Group = 'my-group'"
    capsys.readouterr()
    # The multirun hook: only when the runs asked for it (logger.dashboard=true).
    off = tmp_path / "off"
    wandb_run(off / "0", 0, 0.1, dashboard_on=False, sgd=0.5, swa=0.5)
    end_of_sweep(off)
    assert not (off / "dashboard.json").exists() and capsys.readouterr().out == ""
    (sweep / "dashboard.json").unlink()
    end_of_sweep(sweep)
    assert (sweep / "dashboard.json").is_file()
    assert capsys.readouterr().out.startswith("W&B dashboard: the runs logged offline")
    # It never raises: an unreadable sweep is one warning.
    end_of_sweep(tmp_path / "nope")
    assert capsys.readouterr().err.startswith("warning: no W&B dashboard for")


def test_spec_converts_to_wandb_workspaces_objects(sweep: Path) -> None:
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    spec = dashboard_spec(sweep)
    report = to_report(spec, entity="an-entity")  # built only: saving needs the server
    assert isinstance(report, wr.Report)
    assert (report.entity, report.project, report.title) == ("an-entity", "swa-test",
                                                             f"SWA sweep {sweep.name}")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 2
    main, table = grids
    (runset,) = main.runsets
    assert runset.filters == f"Group = '{sweep.name}'"
    assert runset.groupby == ["config.swa.lr.value"]
    kinds = [type(p).__name__ for p in main.panels]
    assert kinds == ["ScatterPlot", "BarPlot", "MarkdownPanel", "LinePlot",
                     "ParallelCoordinatesPlot", "BarPlot", "BarPlot"]
    scatter = main.panels[0]
    assert (scatter.x.name, scatter.y.name) == ("sgd/test_acc", "swa/test_acc")
    assert tuple(scatter.range_x) == tuple(scatter.range_y)
    assert main.panels[3].y == ["sgd/test_acc", "swa/test_acc"]
    # One colour per configuration, keyed by its group in the run set.
    assert sorted(main.custom_run_colors.values()) == sorted(
        c["color"] for c in spec["configurations"])
    assert {k.keys[0].value for k in main.custom_run_colors} == {"0.1", "0.2"}
    assert type(table.panels[0]).__name__ == "WeavePanelSummaryTable"
    assert table.panels[0].table_name == "report/table"
    assert table.runsets[0].filters.endswith("JobType = 'report'")


@pytest.mark.slow  # a real multirun: two tiny jobs with offline W&B runs (about 10 s)
def test_multirun_with_dashboard_writes_it_and_its_metrics_are_logged(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "swa_research.train", "-m", "experiment=smoke", *TINY,
         "logger=wandb", "logger.mode=offline", "logger.dashboard=true", "swa.lr=0.001,0.002",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"python -m swa_research.dashboard {sweep} --publish" in r.stdout
    spec = json.loads((sweep / "dashboard.json").read_text())
    assert set(panels(spec)) == PANELS and spec["keys"] == ["swa.lr"]
    assert [c["label"] for c in spec["configurations"]] == ["swa.lr=0.001", "swa.lr=0.002"]
    recs = [read_offline(sweep / str(i)) for i in (0, 1)]
    # The runset's group is the runs' W&B group, and the grouping key is in their config.
    assert {rec["run"].get("run_group") for rec in recs} == {spec["group"]} == {sweep.name}
    assert all("swa.lr" in rec["config"] for rec in recs)
    # Every metric a panel names is in the runs' offline records (summary or history).
    for rec in recs:
        logged = set(rec["summary"]) | {k for row in rec["history"] for k in row}
        assert set(panel_metrics(spec)) <= logged, set(panel_metrics(spec)) - logged
    assert [c["wandb_run_ids"] for c in spec["configurations"]] == [
        [rec["run"]["run_id"]] for rec in recs]
