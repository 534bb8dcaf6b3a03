"""Flatness: the line from SGD to SWA reproduces the run's own test numbers at its ends, the
filter normalisation of Li et al., and the command end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, compose_config
from omegaconf import OmegaConf

from swa_research.analysis import flatness as fl
from swa_research.training.build import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


def trained_run(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """A run dir as the entry point leaves it: the run's files and .hydra/config.yaml."""
    cfg = compose_config(["experiment=smoke", *TINY, *overrides])
    metrics = train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return metrics


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("plain")
    return run_dir, trained_run(run_dir, [])


def test_line_ends_reproduce_the_run_without_bn(plain_run) -> None:
    run_dir, metrics = plain_run
    run = fl.load_run(run_dir, CPU)
    evaluator = fl.PointEvaluator(run)
    assert not evaluator.bn
    sgd, swa = fl.line_scan(run, [0.0, 1.0], evaluator)
    assert sgd["test_loss"] == pytest.approx(metrics["sgd"]["test_loss"], abs=1e-5)
    assert sgd["test_err"] == pytest.approx(1 - metrics["sgd"]["test_acc"], abs=1e-9)
    assert swa["test_loss"] == pytest.approx(metrics["swa"]["test_loss"], abs=1e-5)
    assert swa["test_err"] == pytest.approx(1 - metrics["swa"]["test_acc"], abs=1e-9)
    # The two solutions differ, so the ends are not the same point twice.
    assert sgd["test_loss"] != swa["test_loss"]


def test_line_end_reproduces_the_average_with_bn_and_augmentation(tmp_path: Path) -> None:
    metrics = trained_run(tmp_path, ["model.batch_norm=true", "data.augment=crop_flip",
                                     "model.width=0.125"])
    run = fl.load_run(tmp_path, CPU)
    evaluator = fl.PointEvaluator(run)
    assert evaluator.bn
    (swa,) = fl.line_scan(run, [1.0], evaluator)
    # The trainer recomputed the average's BN statistics with augmented training batches
    # drawn from a seeded generator; the same procedure gives the same numbers.
    assert swa["test_loss"] == pytest.approx(metrics["swa"]["test_loss"], abs=1e-5)
    assert swa["test_err"] == pytest.approx(1 - metrics["swa"]["test_acc"], abs=1e-9)
    # Other BN batches give other statistics: the check above can tell.
    run.iteration += 1
    (other,) = fl.line_scan(run, [1.0], evaluator)
    assert abs(other["test_loss"] - metrics["swa"]["test_loss"]) > 1e-4


def test_interpolation_is_exact_at_the_ends() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(5, 3, generator=g), "n": torch.tensor(7)}
    b = {"w": torch.randn(5, 3, generator=g), "n": torch.tensor(9)}
    assert torch.equal(fl.interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(fl.interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(fl.interpolate(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert torch.allclose(fl.interpolate(a, b, -0.5)["w"], 1.5 * a["w"] - 0.5 * b["w"])
    assert fl.interpolate(a, b, 0.5)["n"].item() == 7  # integer buffers are not mixed


def test_filter_normalisation() -> None:
    g = torch.Generator().manual_seed(1)
    weights = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g) * torch.arange(1.0, 5.0)
               .view(4, 1, 1, 1),
               "conv.bias": torch.randn(4, generator=g),
               "fc.weight": torch.randn(6, 8, generator=g),
               "bn.weight": torch.ones(4)}
    raw = fl.random_direction(weights, list(weights), torch.Generator().manual_seed(2))
    d = fl.filter_normalize(raw, weights)
    for name in ("conv.weight", "fc.weight"):
        assert torch.allclose(d[name].flatten(1).norm(dim=1),
                              weights[name].flatten(1).norm(dim=1), rtol=1e-5)
        # Only rescaled per filter: each filter keeps its direction.
        cos = torch.nn.functional.cosine_similarity(d[name].flatten(1), raw[name].flatten(1))
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert not d["conv.bias"].any() and not d["bn.weight"].any()
    again = fl.random_direction(weights, list(weights), torch.Generator().manual_seed(2))
    assert all(torch.equal(raw[k], again[k]) for k in raw)


def test_value_grid_holds_the_ends() -> None:
    grid = fl.value_grid(-0.5, 1.5, 4, always=(0.0, 1.0))
    assert grid == sorted(grid) and {0.0, 1.0, -0.5, 1.5} <= set(grid) and len(grid) == 6
    assert fl.value_grid(-0.5, 1.5, 21, always=(0.0, 1.0)) == [
        round(-0.5 + 0.1 * i, 12) for i in range(21)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_flatness_command_end_to_end(plain_run) -> None:
    run_dir, metrics = plain_run
    proc = subprocess.run(
        [sys.executable, "-m", "swa_research.analysis.flatness", str(run_dir), "--points", "3",
         "--directions", "1", "--dir-points", "3", "--radius", "0.5", "--train-subset", "40",
         "--device", "cpu"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    line = read_csv(run_dir / "flatness_line.csv")
    assert [float(r["alpha"]) for r in line] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    ends = {float(r["alpha"]): r for r in line}
    assert float(ends[0.0]["test_loss"]) == pytest.approx(metrics["sgd"]["test_loss"], abs=1e-5)
    assert float(ends[1.0]["test_loss"]) == pytest.approx(metrics["swa"]["test_loss"], abs=1e-5)
    dirs = read_csv(run_dir / "flatness_directions.csv")
    assert [(r["center"], r["direction"], float(r["t"])) for r in dirs] == [
        (c, "0", t) for c in ("sgd", "swa") for t in (-0.5, 0.0, 0.5)]
    # t = 0 is the solution itself.
    at_zero = {r["center"]: float(r["test_loss"]) for r in dirs if float(r["t"]) == 0.0}
    assert at_zero == {"sgd": pytest.approx(float(ends[0.0]["test_loss"])),
                       "swa": pytest.approx(float(ends[1.0]["test_loss"]))}
    for name in ("flatness_line.png", "flatness_directions.png"):
        assert (run_dir / name).read_bytes().startswith(PNG_MAGIC)
    assert "40 train / 64 test images" in proc.stdout
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics  # untouched


def test_flatness_command_without_an_average(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    trained_run(tmp_path, ["swa=none"])
    assert fl.main([str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "swa.pt" in err
    assert fl.main([str(tmp_path / "nope")]) == 2
