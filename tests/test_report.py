"""The sweep report: what a multirun writes at its end (also when a job failed), its numbers
recomputed here from the runs' own files, its W&B run, and the command on hand-made run dirs
with known values."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY
from test_wandb import clean_env, read_offline

from swa_research.analysis.report import build_report, main
from swa_research.analysis.stats import PairedCI, Stat, t_quantile

# Small enough to be quick, large enough that seeds differ and SWA and SGD disagree.
LEARNS = [*TINY, "model.width=0.125", "data.train_size=256", "trainer.epochs=3"]
SWA_LRS = ("0.003", "0.0015")
# t_{0.975, df} from a printed table.
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 9: 2.2621572,
        29: 2.0452296}

Proc = subprocess.CompletedProcess[str]


def multirun(args: list[str], cwd: Path) -> Proc:
    return subprocess.run([sys.executable, "-m", "swa_research.train", "-m", *args], cwd=cwd,
                          env=clean_env(cwd), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str,
                                                                                  Future[Proc]]]]:
    """Two multiruns, started together: a 2x2 grid (two swa.lr, two seeds) with offline W&B,
    and a sweep whose second job diverges."""
    tmp = tmp_path_factory.mktemp("report")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            "grid": pool.submit(multirun, [
                "experiment=smoke", *LEARNS, "logger=wandb", "logger.mode=offline",
                f"swa.lr={','.join(SWA_LRS)}", "seed=0,1", f"hydra.sweep.dir={tmp}/grid"], tmp),
            "failing": pool.submit(multirun, [
                "experiment=smoke", *TINY, "optimizer=sgd", "optimizer.lr=0.003,1e12",
                "swa.lr=0.003", f"hydra.sweep.dir={tmp}/failing"], tmp),
        }
        yield tmp, futures


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def num(text: str) -> float | None:
    return float(text) if text else None


def job_records(sweep: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(overrides as a dict, metrics.json) of every job of a sweep, read directly."""
    out = []
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        overrides = dict(line.split("=", 1) for line in lines)
        out.append((overrides, json.loads((job / "metrics.json").read_text())))
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# The three tests on real multiruns are slow; the default run has the report of a multirun
# (tests/test_cli.py) and its numbers on hand-made run dirs below.
@pytest.mark.slow
def test_multirun_writes_its_report_with_seed_statistics(sweeps) -> None:
    tmp, futures = sweeps
    proc = futures["grid"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp / "grid"
    for name in ("report.md", "report.csv", "report_swa_gain.png", "report_accuracy.png"):
        assert (sweep / name).stat().st_size > 200, name
    assert not list(sweep.glob(".*.tmp*"))
    rows = read_csv(sweep / "report.csv")
    assert [r["configuration"] for r in rows] == [f"swa.lr={lr}" for lr in SWA_LRS]
    jobs = job_records(sweep)
    assert len(jobs) == 4
    for row, lr in zip(rows, SWA_LRS, strict=True):
        mine = [m for o, m in jobs if float(o["swa.lr"]) == float(lr)]
        assert row["n_runs"] == "2" and row["n_failed"] == "0"
        assert sorted(row["seeds"].split()) == ["0", "1"]
        for column, model, key in (("sgd_test_acc", "sgd", "test_acc"),
                                   ("sgd_best_val_test_acc", "sgd_best_val", "test_acc"),
                                   ("swa_test_acc", "swa", "test_acc"),
                                   ("sgd_test_loss", "sgd", "test_loss"),
                                   ("sgd_best_val_test_loss", "sgd_best_val", "test_loss"),
                                   ("swa_test_loss", "swa", "test_loss")):
            m, sd = mean_sd([x[model][key] for x in mine])
            assert num(row[f"{column}_mean"]) == pytest.approx(m, abs=1e-12), column
            assert num(row[f"{column}_std"]) == pytest.approx(sd, abs=1e-12), column
        ece_mean, _ = mean_sd([x["calibration"]["swa"]["ece"] for x in mine])
        assert num(row["swa_ece_mean"]) == pytest.approx(ece_mean, abs=1e-12)
        # The SWA gain, paired by run, with a t interval over the two seeds.
        gains = [x["swa"]["test_acc"] - x["sgd"]["test_acc"] for x in mine]
        g, gsd = mean_sd(gains)
        half = T975[1] * gsd / math.sqrt(2)
        assert num(row["swa_gain_mean"]) == pytest.approx(g, abs=1e-12)
        assert num(row["swa_gain_ci95_low"]) == pytest.approx(g - half, abs=1e-6)
        assert num(row["swa_gain_ci95_high"]) == pytest.approx(g + half, abs=1e-6)
    # The seeds really differ, so the spreads and the interval above are not trivially zero.
    assert any(float(r["sgd_test_acc_std"]) > 0 for r in rows)
    assert any(float(r["swa_gain_std"]) > 0 for r in rows)
    # The table is printed at the end of the multirun and is in report.md.
    md = (sweep / "report.md").read_text()
    for lr in SWA_LRS:
        assert f"| swa.lr={lr} | 2 |" in md and f"| swa.lr={lr} | 2 |" in proc.stdout
    assert "## Failed runs" not in md


@pytest.mark.slow
def test_report_is_logged_to_wandb_with_the_runs(sweeps) -> None:
    tmp, futures = sweeps
    assert futures["grid"].result().returncode == 0
    sweep = tmp / "grid"
    rec = read_offline(sweep)  # the report's own run, in the sweep dir
    assert rec["exit_code"] == 0
    assert rec["run"]["job_type"] == "report"
    assert rec["run"]["run_group"] == sweep.name == read_offline(sweep / "0")["run"]["run_group"]
    assert rec["run"]["project"] == "swa_research"
    tables = list((sweep / "wandb").glob("offline-run-*/files/media/table/**/*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[0] for row in table["data"]] == [f"swa.lr={lr}" for lr in SWA_LRS]
    csv_rows = read_csv(sweep / "report.csv")
    gain_col = table["columns"].index("swa_gain_mean")
    for row, csv_row in zip(table["data"], csv_rows, strict=True):
        assert row[gain_col] == pytest.approx(float(csv_row["swa_gain_mean"]))
    assert {"report/report_swa_gain", "report/report_accuracy"} <= \
        {k.split(".")[0] for k in rec["summary"]}
    # Every job's summary carries its calibration.
    job = read_offline(sweep / "1")["summary"]
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert job["calibration/sgd_ece"] == pytest.approx(metrics["calibration"]["sgd"]["ece"])
    assert job["calibration/swa_nll"] == pytest.approx(metrics["calibration"]["swa"]["nll"])


@pytest.mark.slow
def test_failed_job_is_listed_not_averaged(sweeps) -> None:
    tmp, futures = sweeps
    proc = futures["failing"].result()
    # The launcher re-raises the diverged job's error after all jobs ran; the report is
    # written all the same.
    assert proc.returncode == 1
    assert "error: training loss became nan" in proc.stderr
    assert "Traceback" not in proc.stderr
    sweep = tmp / "failing"
    rows = {r["configuration"]: r for r in read_csv(sweep / "report.csv")}
    assert set(rows) == {"optimizer.lr=0.003", "optimizer.lr=1e+12"}
    bad = rows["optimizer.lr=1e+12"]
    assert (bad["n_runs"], bad["n_failed"]) == ("0", "1")
    assert bad["sgd_test_acc_mean"] == "" and bad["swa_gain_mean"] == ""
    good = rows["optimizer.lr=0.003"]
    assert (good["n_runs"], good["n_failed"]) == ("1", "0")
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert float(good["sgd_test_acc_mean"]) == metrics["sgd"]["test_acc"]
    assert good["sgd_test_acc_std"] == ""  # one seed: no spread
    md = (sweep / "report.md").read_text()
    failed = md.split("## Failed runs", 1)[1].split("##", 1)[0]
    assert "| 1 | optimizer.lr=1e+12 | 0 | diverged | training loss became" in failed
    assert "failed runs (1, not averaged):" in proc.stdout
    assert "1: diverged" in proc.stdout


# -- hand-made run dirs -------------------------------------------------------------------------


def fake_run(path: Path, seed: int, swa_lr: float, status: str | None = "finished",
             sgd: float = 0.5, swa: float | None = 0.5, best: float = 0.5) -> None:
    """A run dir as the entry point writes it, with chosen numbers (status None: the job
    died before metrics.json)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["experiment=smoke", f"swa.lr={swa_lr}", f"seed={seed}"]))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "swa": {"lr": swa_lr}, "logger": {"backend": "none"}}))
    if status is None:
        return
    metrics = {"status": status,
               "sgd": {"test_acc": sgd, "test_loss": 1.0 - sgd},
               "sgd_best_val": {"test_acc": best, "test_loss": 1.0 - best},
               "swa": {"test_acc": swa, "test_loss": None if swa is None else 1.0 - swa}}
    if status != "finished":
        metrics["error"] = "training loss became nan in epoch 1"
    (path / "metrics.json").write_text(json.dumps(metrics))
    last_swa = "" if swa is None else repr(swa)
    (path / "history.csv").write_text(
        f"epoch,sgd_test_acc,swa_test_acc\n1,0.3,\n2,{sgd!r},{last_swa}\n")


@pytest.fixture
def made_runs(tmp_path: Path) -> Path:
    """Two sweeps below one folder: swa.lr 0.1 with three seeds, a diverged job and a job
    without metrics.json; swa.lr 0.2 with one seed."""
    top = tmp_path / "top"
    for seed, sgd, swa in ((0, 0.50, 0.53), (1, 0.60, 0.61), (2, 0.55, 0.60)):
        fake_run(top / "a" / str(seed), seed, 0.1, sgd=sgd, swa=swa, best=sgd - 0.01)
    fake_run(top / "a" / "3", 3, 0.1, status="diverged", sgd=0.1, swa=0.1)
    fake_run(top / "a" / "4", 4, 0.1, status=None)
    fake_run(top / "b" / "0", 0, 0.2, sgd=0.7, swa=0.75)
    return top


def test_report_command_on_a_parent_of_sweeps(made_runs: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "swa_research.report", str(made_runs),
                           "--no-wandb"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = {r["configuration"]: r for r in read_csv(made_runs / "report.csv")}
    assert list(rows) == ["swa.lr=0.1", "swa.lr=0.2"]
    a = rows["swa.lr=0.1"]
    assert (a["n_runs"], a["n_failed"], a["seeds"]) == ("3", "2", "0 1 2")
    assert float(a["sgd_test_acc_mean"]) == pytest.approx(0.55)
    assert float(a["sgd_test_acc_std"]) == pytest.approx(0.05)
    assert float(a["swa_test_acc_mean"]) == pytest.approx(0.58)
    assert float(a["sgd_best_val_test_acc_mean"]) == pytest.approx(0.54)
    # Gains 0.03, 0.01, 0.05: mean 0.03, sd 0.02, half width t_{0.975,2} * 0.02 / sqrt(3).
    half = T975[2] * 0.02 / math.sqrt(3)
    assert float(a["swa_gain_mean"]) == pytest.approx(0.03)
    assert float(a["swa_gain_std"]) == pytest.approx(0.02)
    assert float(a["swa_gain_ci95_low"]) == pytest.approx(0.03 - half, abs=1e-6)
    assert float(a["swa_gain_ci95_high"]) == pytest.approx(0.03 + half, abs=1e-6)
    b = rows["swa.lr=0.2"]
    assert (b["n_runs"], b["n_failed"], b["sgd_test_acc_std"]) == ("1", "0", "")
    assert b["swa_gain_ci95_low"] == "" and float(b["swa_gain_mean"]) == pytest.approx(0.05)
    # The printed table and the failed runs.
    assert "| swa.lr=0.1 | 3 | 55.00 ± 5.00 |" in proc.stdout
    assert "+3.00 [" in proc.stdout
    assert "a/3: diverged (training loss became nan in epoch 1)" in proc.stdout
    assert "a/4: no metrics.json" in proc.stdout
    md = (made_runs / "report.md").read_text()
    assert "| a/3 | swa.lr=0.1 | 3 | diverged |" in md and "| a/4 | swa.lr=0.1 | 4 |" in md
    assert not (made_runs / "wandb").exists()


def test_report_of_several_run_dirs(made_runs: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    runs = [made_runs / "a" / "0", made_runs / "a" / "1", made_runs / "b" / "0"]
    assert main([*map(str, runs), "--out", str(out), "--no-wandb"]) == 0
    rows = read_csv(out / "report.csv")
    assert [(r["configuration"], r["n_runs"]) for r in rows] == [("swa.lr=0.1", "2"),
                                                                 ("swa.lr=0.2", "1")]
    assert "swa.lr=0.1 | 2 | 55.00 ± 7.07" in capsys.readouterr().out
    # All runs of one configuration: a single row named for that.
    one = build_report([made_runs / "a" / "0", made_runs / "a" / "1"], root=out)
    assert [r.label for r in one.rows] == ["all runs"] and one.keys == []
    assert main([str(tmp_path / "nowhere")]) == 2
    # One run's dir alone: refused, nothing written into it.
    before = sorted(p.name for p in runs[0].iterdir())
    assert main([str(runs[0]), "--no-wandb"]) == 2
    assert "is one run's dir: a report is written beside runs" in capsys.readouterr().err
    assert sorted(p.name for p in runs[0].iterdir()) == before


def test_t_quantile_and_paired_interval() -> None:
    for df, value in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-6)
        assert t_quantile(0.025, df) == pytest.approx(-value, abs=1e-6)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.995, 5) == pytest.approx(4.0321430, abs=1e-6)
    for p, df in ((0.0, 4), (1.0, 4), (0.975, 0)):
        with pytest.raises(ValueError, match="need 0 < p < 1 and df > 0"):
            t_quantile(p, df)
    ci = PairedCI.of([0.01, 0.03, 0.02, 0.06])
    m, sd = mean_sd([0.01, 0.03, 0.02, 0.06])
    assert (ci.mean, ci.std) == (pytest.approx(m), pytest.approx(sd))
    assert ci.low == pytest.approx(m - T975[3] * sd / 2, abs=1e-9)
    assert ci.high == pytest.approx(m + T975[3] * sd / 2, abs=1e-9)
    assert PairedCI.of([0.02]).low is None and PairedCI.of([]).mean is None
    assert Stat.of([1.0]).std is None and Stat.of([1.0, 3.0]).std == pytest.approx(math.sqrt(2))


def test_configurations_compare_resolved_values(tmp_path: Path) -> None:
    """1e-3 and 0.001 are one configuration; a config group chosen on the command line in one
    run and left at its default in another is told apart by the option Hydra chose."""
    for job, (lr_text, model) in enumerate((("1e-3", None), ("0.001", None),
                                            ("0.001", "vgg11"))):
        run = tmp_path / str(job)
        fake_run(run, job, 0.001)
        overrides = [f"swa.lr={lr_text}", f"seed={job}"] + ([f"model={model}"] if model else [])
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"model": model or "simplified",
                                               "hydra/launcher": "basic"}}}}))
    report = build_report([tmp_path])
    assert report.keys == ["model"]
    assert [(r.label, len(r.runs)) for r in report.rows] == [("model=simplified", 2),
                                                             ("model=vgg11", 1)]


def test_the_accuracy_band_stays_within_0_and_100_percent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three seeds at 99.8, 90 and 99.9% have a mean of 96.6% and an sd of 5.6 points: the
    band's top is 100%, not 102%; at low accuracy its bottom is 0%, not below."""
    from matplotlib.axes import Axes

    import swa_research.analysis.report_plots as report_module

    assert report_module.accuracy_band([96.0, 3.0], [5.0, 4.5]) == ([91.0, 0.0], [100.0, 7.5])
    for seed, sgd in ((0, 0.998), (1, 0.90), (2, 0.999)):
        fake_run(tmp_path / "runs" / str(seed), seed, 0.1, sgd=sgd, swa=sgd)
    bands: list[tuple[list[float], list[float]]] = []
    fill = Axes.fill_between

    def record(self: Axes, x: Any, lo: Any, hi: Any, **kwargs: Any) -> Any:
        bands.append((list(lo), list(hi)))
        return fill(self, x, lo, hi, **kwargs)

    monkeypatch.setattr(Axes, "fill_between", record)
    report = build_report([tmp_path / "runs"])
    report_module.plot_accuracy(report, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 0
    # SGD: epoch 1 at 30% in every run (sd 0), epoch 2 the three accuracies above; SWA (the
    # same numbers) has no value at epoch 1.
    low = 100 * (statistics.fmean([0.998, 0.90, 0.999]) - statistics.stdev([0.998, 0.90, 0.999]))
    assert bands == [([pytest.approx(30.0), pytest.approx(low)], [pytest.approx(30.0), 100.0]),
                     ([pytest.approx(low)], [100.0])]


def test_labels_show_set_values_not_rounding_noise(tmp_path: Path) -> None:
    """3 * 1e-4 reads 0.0003 (it printed 0.00030000000000000003), and a run that averages
    nothing is not labelled with averaging settings."""
    from swa_research.analysis.runset import show

    assert show(3 * 1e-4) == "0.0003" and show(0.1 + 0.2) == "0.3" and show(5e-4) == "0.0005"
    assert show(1 / 3) == "0.333333333333" and show(True) == "true"
    for job, (method, start, lr) in enumerate((("none", 161, 0.05), ("swa", 161, 0.05),
                                               ("swa", 126, 3 * 1e-4))):
        run = tmp_path / str(job)
        fake_run(run, 0, lr)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"seed": 0, "swa": {"lr": lr, "method": method, "start": start},
             "logger": {"backend": "none"}}))
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"swa.method={method}", f"swa.start={start}", f"swa.lr={lr}"]))
    labels = [r.label for r in build_report([tmp_path]).rows]
    assert labels == ["swa.method=none", "swa.method=swa, swa.start=161, swa.lr=0.05",
                      "swa.method=swa, swa.start=126, swa.lr=0.0003"], labels
