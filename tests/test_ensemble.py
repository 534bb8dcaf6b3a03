"""python -m swa_research.ensemble: deep ensembles, uniform and greedy soups of a sweep's runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
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
        # The greedy soup's validation accuracy rises strictly along its path; a candidate is
        # left out when the soup with it is not more accurate than the soup before it.
        greedy = pick(table, "greedy_soup", kind)
        kept = [float(r["val_acc"]) for r in greedy if r["accepted"] == "1"]
        assert all(a < b for a, b in zip(kept, kept[1:], strict=False))
        assert greedy[0]["runs"] == singles[0]["runs"]
        best = float(greedy[0]["val_acc"])
        for r in greedy[1:]:
            assert (r["accepted"] == "1") == (float(r["val_acc"]) > best)
            best = max(best, float(r["val_acc"]))
        (uniform,) = pick(table, "uniform_soup", kind)
        assert int(uniform["members"]) == 4 and float(uniform["test_nll"]) > 0
    assert "sgd: 4 runs | ensemble of 4 test acc" in capsys.readouterr().out


def test_the_uniform_soup_of_identical_runs_is_the_run(tmp_path: Path) -> None:
    runs = sweep(tmp_path, [[], []])  # the same config and seed: the same weights
    assert main([str(tmp_path), "--device", "cpu", "--kinds", "swa"]) == 0
    (uniform,) = pick(rows(tmp_path), "uniform_soup", "swa")
    assert float(uniform["test_acc"]) == pytest.approx(runs[0]["swa"]["test_acc"], abs=1e-9)
    assert float(uniform["test_loss"]) == pytest.approx(runs[0]["swa"]["test_loss"], rel=1e-4)
    # A candidate that ties on validation accuracy (here the same weights) is left out, as
    # model-soups' main.py (">", not ">=").
    greedy = pick(rows(tmp_path), "greedy_soup", "swa")
    assert [(r["accepted"], r["members"]) for r in greedy] == [("1", "1"), ("0", "1")]


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


def test_the_validation_split_is_the_same_for_every_training_seed(tmp_path: Path) -> None:
    """The held-out images do not depend on the training seed: no validation image of one
    seed's run is a training image of another's (checked by the images' bytes, not by the
    code's indices), and metrics.json records the split."""
    from swa_research.tasks import build_task

    def images(seed: int) -> tuple[set[bytes], set[bytes]]:
        cfg = compose_config([*BASE, f"seed={seed}"])
        from swa_research.training.build import load_config

        data = build_task("classification").build_data(load_config(cfg), torch.device("cpu"))
        return ({bytes(x.numpy().tobytes()) for x in data.train.images},
                {bytes(x.numpy().tobytes()) for x in data.val.images})

    train0, val0 = images(0)
    for seed in (1, 2):
        train, val = images(seed)
        assert val == val0 and not (val & train) and train == train0
    runs = sweep(tmp_path, [["seed=0"], ["seed=1", "data.split_seed=0"]])
    assert [r["split"] for r in runs] == [{"seed": 0, "val_fraction": 0.25, "val_size": 48}] * 2


def test_runs_of_different_validation_splits_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep(tmp_path / "a", [["data.split_seed=0"], ["data.split_seed=1"]])
    assert main([str(tmp_path / "a"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the runs hold out different validation images "
                          "(data.split_seed=0 in 0, data.split_seed=1 in 1)")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a" / "ensemble.csv").exists()
    # Runs written before data.split_seed drew their split with their training seed.
    sweep(tmp_path / "b", [["seed=0"], ["seed=1"]])
    for run in ("0", "1"):
        path = tmp_path / "b" / run / ".hydra" / "config.yaml"
        cfg = OmegaConf.load(path)
        del cfg.data["split_seed"]
        OmegaConf.save(cfg, path)
    assert main([str(tmp_path / "b"), "--device", "cpu"]) == 2
    assert "(seed=0 (written before data.split_seed) in 0, seed=1 (written before " \
        "data.split_seed) in 1)" in capsys.readouterr().err
    from swa_research.training.build import load_run_config

    assert load_run_config(tmp_path / "b" / "1").data.split_seed == 1


def test_runs_left_out_are_named_and_earlier_rows_are_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A failed job, an unfinished one and a finished run whose swa.pt was removed are each
    named with why, on the terminal and in ensemble.csv; an unknown kind is refused before
    anything is written; rows of kinds not asked for survive a later run of the tool."""
    import json

    sweep(tmp_path, [[], ["optimizer.lr=3e-3"], ["optimizer.lr=2e-3"]])
    (tmp_path / "2" / "swa.pt").unlink()
    failed = tmp_path / "3"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    unfinished = tmp_path / "4"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "overrides.yaml").write_text("[]\n")
    assert main([str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "left out 3: status failed: boom" in out
    assert "left out 4: unfinished: no metrics.json" in out
    assert "swa: left out 2: no swa.pt" in out
    table = rows(tmp_path)
    left = {(r["kind"], r["runs"]): r["note"] for r in table if r["combination"] == "left_out"}
    assert set(left) == {("all", "3"), ("all", "4"), ("swa", "2")}
    assert [int(r["members"]) for r in pick(table, "ensemble", "swa")] == [1, 2]
    assert [int(r["members"]) for r in pick(table, "ensemble", "sgd")] == [1, 2, 3]
    # An unknown kind: one line, nothing written, the earlier results intact.
    before = (tmp_path / "ensemble.csv").read_bytes()
    assert main([str(tmp_path), "--device", "cpu", "--kinds", "sgd,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --kinds sgd,nope: nope is not a kind of weights these runs "
                          "keep; expected some of sgd, swa") and len(err.splitlines()) == 1
    assert (tmp_path / "ensemble.csv").read_bytes() == before
    # A run for sgd alone keeps the swa rows.
    assert main([str(tmp_path), "--device", "cpu", "--kinds", "sgd"]) == 0
    again = rows(tmp_path)
    assert pick(again, "ensemble", "swa") == pick(table, "ensemble", "swa")
    assert [int(r["members"]) for r in pick(again, "ensemble", "sgd")] == [1, 2, 3]
    # Pointed at one run's dir: refused, nothing written into the run.
    assert main([str(tmp_path / "0"), "--device", "cpu"]) == 2
    assert "is one run's dir" in capsys.readouterr().err
    assert not (tmp_path / "0" / "ensemble.csv").exists()


def test_runs_of_two_models_are_refused_by_the_models_name(tmp_path: Path) -> None:
    import json

    from swa_research.analysis.ensemble import check_runs
    from swa_research.config import UserError

    for name, model in (("a", {"name": "simplified", "dropout": 0.5}),
                        ("b", {"name": "vgg11", "batch_norm": False})):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"seed": 0, "model": model, "data": {"split_seed": 0}}),
                       tmp_path / name / ".hydra" / "config.yaml")
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(UserError, match=r"^runs of different models cannot be combined: "
                                        r"model=simplified in a, model=vgg11 in b$"):
        check_runs([tmp_path / "a", tmp_path / "b"])
