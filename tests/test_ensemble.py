"""python -m swa_research.ensemble: deep ensembles, uniform and greedy soups of a sweep's runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import TINY, compose_config
from omegaconf import OmegaConf

from swa_research.analysis.ensemble import main
from swa_research.training.build import train

BASE = [*TINY, "trainer.epochs=3", "data.val_fraction=0.25", "swa.start=0.3",
        "data.train_size=192"]


def sweep(root: Path, jobs: list[list[str]]) -> list[dict]:
    out = []
    for i, extra in enumerate(jobs):
        cfg = compose_config([*BASE, *extra])
        run_dir = root / str(i)
        out.append(train(cfg, run_dir))
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return out


def rows(root: Path) -> list[dict[str, str]]:
    with open(root / "ensemble.csv", newline="") as f:
        return list(csv.DictReader(f))


def pick(table: list[dict[str, str]], combination: str, kind: str) -> list[dict[str, str]]:
    return [r for r in table if r["combination"] == combination and r["kind"] == kind]


def test_ensembles_and_soups_of_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = sweep(tmp_path, [["optimizer.lr=1e-3"], ["optimizer.lr=3e-3"], ["optimizer.lr=2e-3"],
                            ["optimizer.lr=5e-4"]])
    assert main([str(tmp_path), "--device", "cpu"]) == 0
    table = rows(tmp_path)
    assert (tmp_path / "ensemble.png").read_bytes()[:4] == b"\x89PNG"
    for kind in ("sgd", "swa"):
        singles = pick(table, "single", kind)
        ens = pick(table, "ensemble", kind)
        assert [int(r["members"]) for r in ens] == [1, 2, 3, 4]
        # Ordered by validation accuracy, best first; an ensemble of one run is that run.
        vals = [float(r["val_acc"]) for r in singles]
        assert vals == sorted(vals, reverse=True)
        best = runs[int(singles[0]["runs"])][kind]
        assert float(ens[0]["test_acc"]) == pytest.approx(best["test_acc"], abs=1e-9)
        assert float(ens[0]["test_loss"]) == pytest.approx(best["test_loss"], rel=1e-4)
        # The greedy soup's validation accuracy never falls along its path.
        greedy = pick(table, "greedy_soup", kind)
        kept = [float(r["val_acc"]) for r in greedy if r["accepted"] == "1"]
        assert kept == sorted(kept) and greedy[0]["runs"] == singles[0]["runs"]
        for r in greedy:
            if r["accepted"] == "0":
                assert float(r["val_acc"]) < max(kept)
        (uniform,) = pick(table, "uniform_soup", kind)
        assert int(uniform["members"]) == 4 and float(uniform["test_nll"]) > 0
    assert "sgd: 4 runs | ensemble of 4 test acc" in capsys.readouterr().out


def test_the_uniform_soup_of_identical_runs_is_the_run(tmp_path: Path) -> None:
    runs = sweep(tmp_path, [[], []])  # the same config and seed: the same weights
    assert main([str(tmp_path), "--device", "cpu", "--kinds", "swa"]) == 0
    (uniform,) = pick(rows(tmp_path), "uniform_soup", "swa")
    assert float(uniform["test_acc"]) == pytest.approx(runs[0]["swa"]["test_acc"], abs=1e-9)
    assert float(uniform["test_loss"]) == pytest.approx(runs[0]["swa"]["test_loss"], rel=1e-4)


def test_runs_of_different_models_are_refused_and_seeds_refuse_soups(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep(tmp_path / "models", [[], ["model.width=0.125"]])
    assert main([str(tmp_path / "models"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs of different models cannot be combined: "
                          "model.width=0.0625 in 0, 0.125 in 1")
    assert not (tmp_path / "models" / "ensemble.csv").exists()
    sweep(tmp_path / "seeds", [["seed=0"], ["seed=1"]])
    assert main([str(tmp_path / "seeds"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: soups need runs from one initialization: these have seeds [0, 1]" in out
    combos = {r["combination"] for r in rows(tmp_path / "seeds")}
    assert combos == {"single", "ensemble"}
    assert main([str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_sweep_report_shows_fge_with_its_paired_gain_and_the_ensembles(
        tmp_path: Path) -> None:
    from swa_research.analysis.report import write_report

    runs = sweep(tmp_path, [["swa=fge", f"seed={s}", "trainer.epochs=4", "swa.start=1",
                             "schedule.fge_cycle=2", "optimizer=sgd", "optimizer.lr=0.05",
                             "swa.lr=0.005"] for s in (0, 1, 2)])
    assert main([str(tmp_path), "--device", "cpu", "--kinds", "sgd,swa,fge"]) == 0
    report = write_report(tmp_path, use_wandb=False)
    assert "FGE acc %" in report.table and "FGE gain pp [95% CI]" in report.table
    header, data = report.csv_rows()
    row = dict(zip(header, data[0], strict=True))
    gains = [r["fge"]["test_acc"] - r["sgd"]["test_acc"] for r in runs]
    assert row["fge_gain_n"] == 3
    assert row["fge_gain_mean"] == pytest.approx(sum(gains) / 3, abs=1e-12)
    assert row["fge_gain_ci95_low"] <= row["fge_gain_mean"] <= row["fge_gain_ci95_high"]
    # The ensembles and soups of ensemble.csv (seeds differ: the deep ensembles alone).
    assert [(r["kind"], r["combination"]) for r in report.combined] == [
        ("sgd", "ensemble"), ("swa", "ensemble"), ("fge", "ensemble")]
    # A run's FGE member is its own FGE prediction: the single row is the run's fge result.
    single = {r["runs"]: r for r in rows(tmp_path)
              if r["combination"] == "single" and r["kind"] == "fge"}
    for i, r in enumerate(runs):
        assert float(single[str(i)]["test_acc"]) == pytest.approx(r["fge"]["test_acc"],
                                                                  abs=1e-9)
    assert "## Ensembles and soups" in report.markdown
    assert "ensembles and soups of the runs (ensemble.csv):" in report.text()


def test_the_ensembles_go_to_a_w_and_b_run_beside_the_sweeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in wandb module records what is logged (W&B itself is read back offline in
    test_wandb.py): a run of job_type "ensemble" in the runs' project and group, with
    ensemble.csv as a table and ensemble.png."""
    import sys
    import types

    import swa_research.analysis.ensemble as ensemble
    from swa_research.analysis.runset import WandbTarget

    calls: list[dict] = []

    class FakeRun:
        path, dir = "entity/project/abc", str(tmp_path / "wandb" / "run")

        def __enter__(self) -> FakeRun:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def log(self, data: dict) -> None:
            calls.append({"logged": data})

    def init(**kwargs: object) -> FakeRun:
        calls.append({"init": kwargs})
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw,
                                 Table=lambda columns, data: ("table", columns, len(data)),
                                 Image=lambda path: ("image", Path(path).name))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sweep(tmp_path, [["optimizer.lr=1e-3"], ["optimizer.lr=2e-3"]])
    target = WandbTarget(project="swa", entity=None, group="g1", mode="online")
    real = ensemble.load_run
    monkeypatch.setattr(ensemble, "load_run",
                        lambda d, root: types.SimpleNamespace(**{**vars(real(d, root)),
                                                                 "wandb": target}))
    assert main([str(tmp_path), "--device", "cpu"]) == 0
    init_kw = calls[0]["init"]
    assert (init_kw["job_type"], init_kw["project"], init_kw["group"]) == ("ensemble", "swa",
                                                                           "g1")
    logged = calls[1]["logged"]
    assert logged["report/ensemble"] == ("image", "ensemble.png")
    kind, columns, n = logged["report/ensemble_table"]
    assert columns[:3] == ["combination", "kind", "members"] and n == len(rows(tmp_path))
    calls.clear()
    assert main([str(tmp_path), "--device", "cpu", "--no-wandb"]) == 0 and calls == []
