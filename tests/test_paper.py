"""The SWA paper's Table 1: the presets experiment=paper/* against timgaripov/swa's recipes,
the published table as data, which cells a run measures, the sweep report's "paper vs
measured" table on hand-made run dirs, scripts/reproduce.sh's paper mode, and docs/paper.md."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONF_DIR, compose_config
from test_schedules import paper_schedule

from swa_research.analysis import paper
from swa_research.analysis.report import build_report, write_report
from swa_research.config import flatten_dict, iterations_per_epoch, to_config
from swa_research.training.averages import check_budget, plan_from_config
from swa_research.training.build import config_dict_of, load_config
from swa_research.training.optim import build_schedule

ROOT = Path(__file__).resolve().parent.parent
PRESETS = paper.presets()
ITERS = iterations_per_epoch(50_000, 128, False)  # 391: the last partial batch kept


def config_of(preset: str, *overrides: str) -> dict[str, Any]:
    """The plain nested config of a preset, as a run's .hydra/config.yaml holds it."""
    return config_dict_of(load_config(compose_config([f"experiment={preset}", *overrides])))


# -- the presets ---------------------------------------------------------------------------------


def test_the_presets_are_the_whole_table() -> None:
    assert len(PRESETS) == 12
    files = sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                   for p in (CONF_DIR / "experiment" / "paper").glob("*.yaml"))
    assert files == sorted(PRESETS)
    assert paper.presets("preresnet164", "cifar100") == [
        "paper/preresnet164_cifar100_sgd", "paper/preresnet164_cifar100_swa1.5"]
    assert len(paper.presets(dataset="cifar10")) == 6 and len(paper.presets("wrn28x10")) == 4
    with pytest.raises(ValueError):
        paper.presets("resnet50")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_validates_and_fits_its_budget(preset: str) -> None:
    config = load_config(compose_config([f"experiment={preset}"]))
    check_budget(config, ITERS)
    model, dataset, run = re.fullmatch(r"paper/(\w+?)_(cifar100|cifar10)_(sgd|swa1\.5)",
                                       preset).groups()
    assert (config.model["name"], config.data.name) == (model, dataset)
    # Its comment names the source.
    text = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert "timgaripov/swa README.md" in text and "train.py" in text


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_its_recipe(preset: str) -> None:
    """The preset's values are paper.RECIPES' (what the report matches runs against), and a
    run of it measures the cells of its kind at epochs it evaluates."""
    flat = flatten_dict(config_of(preset))
    found = paper.classify(flat)
    assert found is not None
    recipe, run = found
    assert paper.preset(recipe.model, recipe.dataset, run) == preset
    assert paper.recipe_differences(flat) == []
    assert flat["trainer.epochs"] == recipe.epochs(run)
    every = flat["trainer.eval_every"]
    if run == "swa1.5":
        for column in ("swa1", "swa1.25", "swa1.5"):
            epoch = recipe.column_epochs[column]
            assert epoch % every == 0 or epoch == flat["trainer.epochs"], column


# (preset, lr, weight decay, swa lr or None, swa start or None, epochs, normalisation mean[0])
# as read from timgaripov/swa README.md's commands and models/*.py.
KEY_VALUES = [
    ("paper/vgg16_cifar10_swa1.5", 0.05, 5e-4, 0.01, 161, 300, 0.485),
    ("paper/vgg16_cifar10_sgd", 0.05, 5e-4, None, None, 200, 0.485),
    ("paper/vgg16_cifar100_swa1.5", 0.05, 5e-4, 0.01, 161, 300, 0.485),
    ("paper/vgg16_cifar100_sgd", 0.05, 5e-4, None, None, 200, 0.485),
    ("paper/preresnet164_cifar10_swa1.5", 0.1, 3e-4, 0.01, 126, 225, 0.4914),
    ("paper/preresnet164_cifar100_swa1.5", 0.1, 3e-4, 0.05, 126, 225, 0.4914),
    ("paper/preresnet164_cifar10_sgd", 0.1, 3e-4, None, None, 150, 0.4914),
    ("paper/preresnet164_cifar100_sgd", 0.1, 3e-4, None, None, 150, 0.4914),
    ("paper/wrn28x10_cifar10_swa1.5", 0.1, 5e-4, 0.05, 161, 300, 0.4914),
    ("paper/wrn28x10_cifar100_swa1.5", 0.1, 5e-4, 0.05, 161, 300, 0.4914),
    ("paper/wrn28x10_cifar10_sgd", 0.1, 5e-4, None, None, 200, 0.4914),
    ("paper/wrn28x10_cifar100_sgd", 0.1, 5e-4, None, None, 200, 0.4914),
]


@pytest.mark.parametrize(("preset", "lr", "wd", "swa_lr", "start", "epochs", "mean0"), KEY_VALUES,
                         ids=[k[0] for k in KEY_VALUES])
def test_key_values(preset: str, lr: float, wd: float, swa_lr: float | None,
                    start: int | None, epochs: int, mean0: float) -> None:
    c = to_config(compose_config([f"experiment={preset}"]))
    assert c.optimizer.name == "sgd" and c.optimizer.momentum == 0.9
    assert c.optimizer.nesterov is False
    assert c.optimizer.lr == pytest.approx(lr)
    assert c.optimizer.weight_decay == pytest.approx(wd)
    assert c.trainer.epochs == epochs
    assert (c.trainer.batch_size, c.trainer.drop_last) == (128, False)
    assert c.data.val_fraction == 0.0 and c.data.augment == "crop_flip" and c.data.normalize
    assert c.data.mean[0] == pytest.approx(mean0)
    assert c.schedule.name == "decay_then_constant" and c.schedule.step_unit == "epoch"
    if swa_lr is None:
        assert c.swa.method == "none" and c.schedule.final_ratio == 0.01
    else:
        assert c.swa.method == "swa"
        assert c.swa.lr == pytest.approx(swa_lr)
        assert (c.swa.start, c.swa.freq, c.swa.unit) == (start, 1, "epoch")
    name = c.model["name"]
    if name == "vgg16":  # the paper's VGG16: no BN, dropout 0.5, full width
        assert (c.model["batch_norm"], c.model["dropout"], c.model["width"]) == (False, 0.5, 1.0)
    elif name == "wrn28x10":
        assert c.model["dropout"] == 0.0


@pytest.mark.parametrize("preset", PRESETS)
def test_schedule_and_averaging_are_the_sources(preset: str) -> None:
    """Every epoch's lr is train.py's schedule(), and the average takes the epochs from
    swa_start on (train.py: after epoch index e when e + 1 >= swa_start)."""
    c = to_config(compose_config([f"experiment={preset}"]))
    epochs = c.trainer.epochs
    plan = plan_from_config(c.swa, c.schedule, epochs, ITERS)
    sched = build_schedule(c.schedule, c.optimizer.lr, c.swa.lr, ITERS, plan.total_iters,
                           plan.start_iter, plan.lr_switch_iter)
    swa = c.swa.method == "swa"
    for e in range(epochs):
        want = paper_schedule(e, c.optimizer.lr, c.swa.lr, c.swa.start, epochs, swa)
        assert sched(e * ITERS) == pytest.approx(want, rel=1e-9), e
        assert sched(e * ITERS + ITERS - 1) == pytest.approx(want, rel=1e-9), e
    if swa:
        assert plan.update_points() == list(range(int(c.swa.start), epochs + 1))
    else:
        assert plan.update_points() == []


@pytest.mark.parametrize(("old", "new"), [
    ("paper_vgg16", "paper/vgg16_cifar10_swa1.5"),
    ("paper_vgg16_sgd", "paper/vgg16_cifar10_sgd"),
    ("paper_vgg16_cifar100", "paper/vgg16_cifar100_swa1.5"),
    ("paper_vgg16_sgd_cifar100", "paper/vgg16_cifar100_sgd"),
])
def test_the_older_vgg16_presets_are_the_same_recipes(old: str, new: str) -> None:
    assert config_of(old) == config_of(new)


def test_command_line_groups_beat_the_presets() -> None:
    c = to_config(compose_config(["experiment=paper/wrn28x10_cifar100_swa1.5", "data=synthetic",
                                  "data.train_size=64"]))
    assert c.data.name == "synthetic" and c.model["name"] == "wrn28x10"


# -- the table and the cells a run measures ----------------------------------------------------


def test_the_published_table() -> None:
    assert set(paper.PUBLISHED) == set(paper.RECIPES) == {
        (m, d) for m in paper.MODELS for d in paper.DATASETS}
    assert paper.PUBLISHED[("vgg16", "cifar10")]["sgd"] == (93.25, 0.16)
    assert paper.PUBLISHED[("preresnet164", "cifar100")]["swa1.25"] == (80.18, 0.23)
    assert paper.PUBLISHED[("wrn28x10", "cifar10")]["swa1.5"] == (96.79, 0.05)
    assert paper.PUBLISHED[("wrn28x10", "cifar100")]["swa1"] == (81.46, 0.23)
    for cells in paper.PUBLISHED.values():
        assert list(cells) == list(paper.COLUMNS)
    assert paper.RECIPES[("preresnet164", "cifar10")].column_epochs == {
        "sgd": 150, "swa1": 150, "swa1.25": 188, "swa1.5": 225}
    assert paper.RECIPES[("vgg16", "cifar100")].column_epochs == {
        "sgd": 200, "swa1": 200, "swa1.25": 250, "swa1.5": 300}


def history(rows: dict[int, float | None]) -> list[dict[str, Any]]:
    """history.csv rows as plots.read_history gives them (floats, None for empty)."""
    return [{"epoch": float(e), "sgd_test_acc": 0.7, "swa_test_acc": acc} for e, acc in
            rows.items()]


def metrics(sgd: float = 0.7, swa: float | None = None, status: str = "finished"
            ) -> dict[str, Any]:
    return {"status": status, "sgd": {"test_acc": sgd}, "swa": {"test_acc": swa}}


def test_a_swa_run_measures_three_cells() -> None:
    flat = flatten_dict(config_of("paper/preresnet164_cifar100_swa1.5"))
    rows = history({124: None, 150: 0.795, 186: 0.80, 188: 0.802, 224: 0.80, 225: 0.804})
    cells = paper.measured_cells(flat, metrics(swa=0.804), rows)
    assert [(c.column, c.epoch) for c in cells] == [("swa1", 150), ("swa1.25", 188),
                                                    ("swa1.5", 225)]
    assert [c.acc for c in cells] == pytest.approx([79.5, 80.2, 80.4])
    assert {(c.model, c.dataset) for c in cells} == {("preresnet164", "cifar100")}
    # Nested and flat configs alike.
    assert paper.measured_cells(config_of("paper/preresnet164_cifar100_swa1.5"),
                                metrics(swa=0.804), rows) == cells
    # The last epoch falls back to metrics.json; an epoch not evaluated gives no cell.
    cells = paper.measured_cells(flat, metrics(swa=0.81), history({150: 0.79}))
    assert [(c.column, c.acc) for c in cells] == [("swa1", pytest.approx(79.0)),
                                                  ("swa1.5", pytest.approx(81.0))]


def test_a_shorter_swa_run_measures_the_cells_it_reaches() -> None:
    flat = flatten_dict(config_of("paper/vgg16_cifar10_swa1.5", "trainer.epochs=200"))
    assert paper.recipe_differences(flat) == []
    cells = paper.measured_cells(flat, metrics(swa=0.935), history({200: 0.935}))
    assert [(c.column, c.epoch, c.acc) for c in cells] == [("swa1", 200, pytest.approx(93.5))]


def test_an_sgd_run_measures_the_sgd_cell() -> None:
    flat = flatten_dict(config_of("paper/wrn28x10_cifar10_sgd"))
    cells = paper.measured_cells(flat, metrics(sgd=0.9612), history({200: None}))
    assert cells == [paper.Measurement("wrn28x10", "cifar10", "sgd", 200, pytest.approx(96.12))]


@pytest.mark.parametrize("override", ["swa.lr=0.02", "optimizer.lr=0.05", "trainer.epochs=150",
                                      "data.val_fraction=0.1", "model.dropout=0.3",
                                      "swa.method=ema", "trainer.batch_size=256"])
def test_another_recipe_measures_no_cell(override: str) -> None:
    base = "paper/wrn28x10_cifar100_sgd" if override == "trainer.epochs=150" else \
        "paper/wrn28x10_cifar100_swa1.5"
    flat = flatten_dict(config_of(base, override))
    key = override.split("=")[0]
    assert [d[0] for d in paper.recipe_differences(flat)] == [key]
    rows = history({200: 0.81, 250: 0.82, 300: 0.83})
    assert paper.measured_cells(flat, metrics(swa=0.83), rows) == []


def test_other_runs_measure_no_cell() -> None:
    rows = history({200: 0.9, 250: 0.9, 300: 0.9})
    flat = flatten_dict(config_of("paper/vgg16_cifar10_swa1.5"))
    for status in ("diverged", "failed"):
        assert paper.measured_cells(flat, metrics(swa=0.9, status=status), rows) == []
    assert paper.measured_cells(flat, None, rows) == []
    for override in ("model=vgg19", "data=synthetic"):
        other = flatten_dict(config_of("paper/vgg16_cifar10_swa1.5", override))
        assert paper.classify(other) is None and paper.recipe_differences(other) == []
        assert paper.measured_cells(other, metrics(swa=0.9), rows) == []
    seed = flatten_dict(config_of("seed_notebook"))  # CIFAR-10, but VGG "simplified"
    assert paper.measured_cells(seed, metrics(swa=0.8), rows) == []


def test_within_one_or_two_published_stds() -> None:
    assert paper.within(93.25, 93.25, 0.16) == "1 std"
    assert paper.within(93.09, 93.25, 0.16) == "1 std"  # on the edge
    assert paper.within(93.41, 93.25, 0.16) == "1 std"
    assert paper.within(93.50, 93.25, 0.16) == "2 std"
    assert paper.within(92.93, 93.25, 0.16) == "2 std"
    assert paper.within(93.60, 93.25, 0.16) == "no"


def test_compare_summarises_cells_in_table_order() -> None:
    ms = [paper.Measurement("wrn28x10", "cifar10", "sgd", 200, v) for v in (96.0, 96.2, 96.4)]
    ms += [paper.Measurement("vgg16", "cifar100", "swa1", 200, 74.1)]
    ms += [paper.Measurement("vgg16", "cifar10", "swa1.5", 300, v) for v in (93.5, 93.7)]
    rows = paper.compare(ms)
    assert [(c.model, c.dataset, c.column) for c in rows] == [
        ("vgg16", "cifar10", "swa1.5"), ("wrn28x10", "cifar10", "sgd"),
        ("vgg16", "cifar100", "swa1")]
    wrn = rows[1]
    assert (wrn.n, wrn.mean, wrn.std) == (3, pytest.approx(96.2), pytest.approx(0.2))
    assert wrn.difference == pytest.approx(0.02) and wrn.within == "1 std"
    assert rows[2].std is None and rows[2].within == "2 std"  # 74.10 vs 73.91 ± 0.12: +0.19
    assert paper.comparison_cells(rows[2])[5] == "74.10"


def test_estimates_add_up() -> None:
    recipe = paper.RECIPES[("preresnet164", "cifar100")]
    assert paper.evaluations(recipe, "sgd") == list(range(5, 151, 5))
    evals = paper.evaluations(recipe, "swa1.5")
    assert evals[:2] == [2, 4] and evals[-2:] == [224, 225] and len(evals) == 113
    train, forward = paper.images_processed(recipe, "swa1.5")
    averaged = len([e for e in evals if e >= 126])  # 126..224 even, and 225: 51
    assert averaged == 51
    assert train == 225 * 50_000
    assert forward == 113 * 10_000 + 10_000 + 51 * (10_000 + 50_000) + 10_000
    vgg = paper.RECIPES[("vgg16", "cifar10")]  # no BN: no BN pass
    assert paper.images_processed(vgg, "swa1.5")[1] == 60 * 10_000 + 10_000 + 28 * 10_000 \
        + 10_000
    e = paper.estimate("preresnet164", "cifar100", "sgd", forward=1e9, sustained_tflops=100)
    assert e.flops == 3e9 * 7_500_000 + 1e9 * 310_000
    assert e.hours == pytest.approx(e.flops / 1e14 / 3600)
    assert e.hours_3_seeds == pytest.approx(3 * e.hours)
    measured = paper.estimate("wrn28x10", "cifar10", "sgd", forward=1e9, images_per_s=1000)
    assert measured.hours == pytest.approx((10_000_000 + 410_000 / 3) / 1000 / 3600)


# -- the sweep report ------------------------------------------------------------------------------


def fake_run(path: Path, preset: str, seed: int, acc: dict[int, float | None] | None = None,
             sgd: float = 0.7, status: str = "finished", extra: tuple[str, ...] = ()) -> None:
    """A run dir as the entry point writes it: the preset's composed config, its overrides,
    metrics.json and history.csv with chosen accuracies (``acc``: epoch -> swa_test_acc)."""
    overrides = [f"experiment={preset}", *extra, f"seed={seed}"]
    config = config_of(preset, *extra, f"seed={seed}")
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    acc = acc or {}
    last = max(acc) if acc else None
    swa = acc.get(last) if last is not None else None
    (path / "metrics.json").write_text(json.dumps({
        "status": status, "sgd": {"test_acc": sgd, "test_loss": 1.0 - sgd},
        "sgd_best_val": {"test_acc": None, "test_loss": None},
        "swa": {"test_acc": swa, "test_loss": None if swa is None else 1.0 - swa}}))
    lines = ["epoch,sgd_test_acc,swa_test_acc"]
    lines += [f"{e},{sgd},{'' if a is None else a}" for e, a in sorted(acc.items())]
    if not acc:
        lines.append(f"{config['trainer']['epochs']},{sgd},")
    (path / "history.csv").write_text("\n".join(lines) + "\n")


SGD_ACC = (0.785, 0.787, 0.780)  # 78.40 ± 0.36 against 78.49 ± 0.36: within 1 std
SWA1 = (0.794, 0.795, 0.796)  # 79.50 ± 0.10 against 79.77 ± 0.17: -0.27, within 2 std
SWA125 = (0.810, 0.811, 0.812)  # 81.10 ± 0.10 against 80.18 ± 0.23: +0.92, no
SWA15 = (0.8035, 0.8030, 0.8040)  # 80.35 ± 0.05 against 80.35 ± 0.16: within 1 std


@pytest.fixture
def paper_sweep(tmp_path: Path) -> Path:
    """A sweep of the PreResNet164 CIFAR-100 row over 3 seeds, a SWA run of another swa.lr,
    and a run that failed."""
    sweep = tmp_path / "sweep"
    job = 0
    for seed in range(3):
        fake_run(sweep / str(job), "paper/preresnet164_cifar100_sgd", seed, sgd=SGD_ACC[seed])
        job += 1
        fake_run(sweep / str(job), "paper/preresnet164_cifar100_swa1.5", seed, sgd=0.77,
                 acc={124: None, 150: SWA1[seed], 188: SWA125[seed], 225: SWA15[seed]})
        job += 1
    fake_run(sweep / str(job), "paper/preresnet164_cifar100_swa1.5", 0, extra=("swa.lr=0.01",),
             acc={150: 0.5, 188: 0.5, 225: 0.5})
    fake_run(sweep / str(job + 1), "paper/preresnet164_cifar100_swa1.5", 1, status="diverged",
             acc={150: 0.01, 188: 0.01, 225: 0.01})
    return sweep


OTHER = "differs: swa.lr=0.01 (paper: 0.05)"


def test_report_compares_the_paper_cells(paper_sweep: Path) -> None:
    report = write_report(paper_sweep, use_wandb=False)
    got = [(c.column, c.epoch, c.n, round(c.mean, 4), c.within, c.recipe) for c in report.paper]
    # The run of another swa.lr: rows of its own after the paper's, no verdict.
    assert got == [("sgd", 150, 3, 78.4, "1 std", "paper"),
                   ("swa1", 150, 3, 79.5, "2 std", "paper"),
                   ("swa1", 150, 1, 50.0, "n/a (other recipe)", OTHER),
                   ("swa1.25", 188, 3, 81.1, "no", "paper"),
                   ("swa1.25", 188, 1, 50.0, "n/a (other recipe)", OTHER),
                   ("swa1.5", 225, 3, 80.35, "1 std", "paper"),
                   ("swa1.5", 225, 1, 50.0, "n/a (other recipe)", OTHER)]
    assert report.paper_skipped == []
    md = (paper_sweep / "report.md").read_text()
    assert "## Paper vs measured" in md
    assert ("| PreResNet164 | CIFAR-100 | SGD | 150 | 78.49 ± 0.36 | 78.40 ± 0.36 | 3 | -0.09 | "
            "1 std | paper |") in md
    assert ("| PreResNet164 | CIFAR-100 | SWA 1.25 budgets | 188 | 80.18 ± 0.23 | 81.10 ± 0.10 "
            "| 3 | +0.92 | no | paper |") in md
    assert ("| PreResNet164 | CIFAR-100 | SWA 1.25 budgets | 188 | 80.18 ± 0.23 | 50.00 | 1 | "
            "-30.18 | n/a (other recipe) | differs: swa.lr=0.01 (paper: 0.05) |") in md
    assert "within the published mean ± 1 std" in md
    assert "Other recipe: a run of a paper preset with settings changed" in md
    # The main table is still there, one configuration per preset and swa.lr.
    # The SGD baseline averages nothing: no swa.* in its label.
    assert any(line.startswith("| experiment=paper/preresnet164_cifar100_sgd |")
               and "| 3 |" in line for line in md.splitlines())
    assert not any(line.startswith("| experiment=paper/preresnet164_cifar100_sgd, swa.")
                   for line in md.splitlines())
    text = report.text()
    assert "paper vs measured" in text and paper.OTHER_RECIPE_NOTE in text.splitlines()
    with open(paper_sweep / "report_paper.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == paper.CSV_HEADER and paper.CSV_HEADER[-1] == "recipe"
    assert [(r["column"], r["recipe"]) for r in rows] == [
        ("sgd", "paper"), ("swa1", "paper"), ("swa1", OTHER), ("swa1.25", "paper"),
        ("swa1.25", OTHER), ("swa1.5", "paper"), ("swa1.5", OTHER)]
    assert float(rows[3]["measured_mean"]) == pytest.approx(81.1)
    assert float(rows[3]["difference"]) == pytest.approx(0.92)
    assert float(rows[0]["published_std"]) == 0.36 and rows[0]["n"] == "3"
    assert rows[4]["within"] == "n/a (other recipe)" and rows[4]["measured_std"] == ""
    assert float(rows[4]["difference"]) == pytest.approx(-30.18)
    assert paper_sweep / "report_paper.csv" in report.files


def test_a_report_without_paper_runs_is_unchanged(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed in range(2):  # no paper preset, model or data set: no paper cell
        fake_run(sweep / str(seed), "cpu_quick", seed, extra=("data=synthetic",),
                 acc={2: 0.5, 3: 0.5})
    report = write_report(sweep, use_wandb=False)
    assert report.paper == [] and report.paper_skipped == []
    assert "Paper vs measured" not in report.markdown
    assert "paper vs measured" not in report.text()
    assert not (sweep / "report_paper.csv").exists()
    assert build_report([sweep]).paper_skipped == []


# -- runs of another recipe (a toy-size row) ------------------------------------------------------

TOY = ("data=synthetic", "trainer.epochs=6", "swa.start=3")
TOY_LABEL = ("differs: data.name=synthetic (paper: cifar100), trainer.epochs=6 (paper: 225), "
             "swa.start=3 (paper: 126)")


def test_scaled_overrides() -> None:
    assert paper.scaled_overrides("paper/preresnet164_cifar10_sgd", 8) == ["trainer.epochs=8"]
    # 1.5 x 8 = 12 epochs; 126 / 150 x 8 = 6.72: the average from epoch 7.
    assert paper.scaled_overrides("paper/preresnet164_cifar10_swa1.5", 8) == [
        "trainer.epochs=12", "swa.start=7"]
    assert paper.scaled_overrides("paper/vgg16_cifar100_swa1.5", 4) == [
        "trainer.epochs=6", "swa.start=3"]  # 161 / 200 x 4 = 3.22
    assert paper.scaled_overrides("paper_vgg16", 5) == ["trainer.epochs=8", "swa.start=4"]
    assert paper.scaled_overrides("paper/wrn28x10_cifar10_swa1.5", 200) == [
        "trainer.epochs=300", "swa.start=161"]  # the paper's own budget: its recipe
    with pytest.raises(ValueError):
        paper.scaled_overrides("cpu_quick", 8)
    with pytest.raises(ValueError):
        paper.scaled_overrides("paper/vgg16_cifar10_sgd", 0)
    assert paper.parse_preset("paper/wrn28x10_cifar100_swa1.5") == ("wrn28x10", "cifar100",
                                                                     "swa1.5")
    assert paper.parse_preset("paper/resnet50_cifar10_sgd") is None


def test_scaled_column_epochs() -> None:
    pre = paper.RECIPES[("preresnet164", "cifar10")]
    assert paper.scaled_column_epochs(pre, 225) == {"swa1": 150, "swa1.25": 188, "swa1.5": 225}
    assert paper.scaled_column_epochs(pre, 12) == {"swa1": 8, "swa1.25": 10, "swa1.5": 12}
    assert paper.scaled_column_epochs(pre, 6) == {"swa1": 4, "swa1.25": 5, "swa1.5": 6}
    assert paper.scaled_column_epochs(pre, 9) == {"swa1": 6, "swa1.25": 8, "swa1.5": 9}
    assert paper.scaled_column_epochs(pre, 4) == {"swa1": 3, "swa1.5": 4}  # 3.33 -> 4: one cell
    assert paper.scaled_column_epochs(pre, 1) == {"swa1.5": 1}
    vgg = paper.RECIPES[("vgg16", "cifar100")]
    assert paper.scaled_column_epochs(vgg, 300) == {"swa1": 200, "swa1.25": 250, "swa1.5": 300}
    assert paper.scaled_column_epochs(vgg, 30) == {"swa1": 20, "swa1.25": 25, "swa1.5": 30}


def test_recipe_labels() -> None:
    preset = "paper/preresnet164_cifar100_swa1.5"
    exact = flatten_dict(config_of(preset))
    assert paper.recipe_label(exact, preset) == "paper"
    # Stopped early, the paper's recipe still: its cells are read at the paper's epochs.
    assert paper.recipe_label(flatten_dict(config_of(preset, "trainer.epochs=160")),
                              preset) == "paper"
    toy = flatten_dict(config_of(preset, *TOY))
    assert paper.classify(toy) is None  # without the preset's name: no recipe's run
    assert paper.classify(toy, preset) == (paper.RECIPES[("preresnet164", "cifar100")],
                                           "swa1.5")
    assert paper.recipe_label(toy, preset) == TOY_LABEL
    more = flatten_dict(config_of(preset, *TOY, "swa.lr=0.02", "optimizer.lr=0.05"))
    label = paper.recipe_label(more, preset)
    assert label == TOY_LABEL + (", optimizer.lr=0.05 (paper: 0.1), swa.lr=0.02 "
                                 "(paper: 0.05)")
    assert paper.short_recipe(label) == TOY_LABEL + ", +2 more"
    assert paper.short_recipe("paper") == "paper"
    sgd = flatten_dict(config_of("paper/vgg16_cifar10_sgd", "trainer.epochs=4"))
    assert paper.recipe_label(sgd) == "differs: trainer.epochs=4 (paper: 200)"
    vgg19 = flatten_dict(config_of("paper/vgg16_cifar10_sgd", "model=vgg19"))
    assert paper.recipe_label(vgg19, "paper_vgg16_sgd").startswith(
        "differs: model.name=vgg19 (paper: vgg16)")


def test_a_run_of_another_recipe_measures_its_scaled_cells() -> None:
    preset = "paper/preresnet164_cifar100_swa1.5"
    toy = flatten_dict(config_of(preset, *TOY))
    rows = history({2: None, 3: 0.4, 4: 0.5, 5: 0.6, 6: 0.7})
    # Only when asked, and only with the preset's name (the config alone is no recipe's).
    assert paper.measured_cells(toy, metrics(swa=0.7), rows, experiment=preset) == []
    assert paper.measured_cells(toy, metrics(swa=0.7), rows, other_recipes=True) == []
    cells = paper.measured_cells(toy, metrics(swa=0.7), rows, experiment=preset,
                                 other_recipes=True)
    # 6 epochs: a budget of 4, read at 4, 5 and 6.
    assert [(c.column, c.epoch, c.recipe) for c in cells] == [
        ("swa1", 4, TOY_LABEL), ("swa1.25", 5, TOY_LABEL), ("swa1.5", 6, TOY_LABEL)]
    assert [c.acc for c in cells] == pytest.approx([50.0, 60.0, 70.0])
    # No evaluation at epoch 5: no SWA 1.25 cell (the last epoch falls back to metrics.json).
    cells = paper.measured_cells(toy, metrics(swa=0.71), history({4: 0.5, 6: None}),
                                 experiment=preset, other_recipes=True)
    assert [(c.column, c.epoch, c.acc) for c in cells] == [
        ("swa1", 4, pytest.approx(50.0)), ("swa1.5", 6, pytest.approx(71.0))]
    # An SGD run of another recipe: its final model, at its own last epoch.
    sgd = flatten_dict(config_of("paper/preresnet164_cifar100_sgd", "data=synthetic",
                                 "trainer.epochs=4"))
    cells = paper.measured_cells(sgd, metrics(sgd=0.42), history({4: None}),
                                 experiment="paper/preresnet164_cifar100_sgd",
                                 other_recipes=True)
    assert cells == [paper.Measurement(
        "preresnet164", "cifar100", "sgd", 4, pytest.approx(42.0),
        "differs: data.name=synthetic (paper: cifar100), trainer.epochs=4 (paper: 150)")]
    # The paper's recipe is read at the paper's epochs whatever other_recipes says.
    exact = flatten_dict(config_of(preset))
    full = history({150: 0.795, 188: 0.80, 225: 0.81})
    assert paper.measured_cells(exact, metrics(swa=0.81), full, preset, True) == \
        paper.measured_cells(exact, metrics(swa=0.81), full)
    assert [c.recipe for c in paper.measured_cells(exact, metrics(swa=0.81), full)] == \
        ["paper"] * 3


def test_compare_never_pools_recipes() -> None:
    ms = [paper.Measurement("vgg16", "cifar10", "swa1", 200, 93.5),
          paper.Measurement("vgg16", "cifar10", "swa1", 4, 40.0, "differs: x=1 (paper: 2)"),
          paper.Measurement("vgg16", "cifar10", "swa1", 200, 93.7),
          paper.Measurement("vgg16", "cifar10", "swa1", 4, 44.0, "differs: x=1 (paper: 2)"),
          paper.Measurement("vgg16", "cifar10", "swa1", 8, 60.0, "differs: x=3 (paper: 2)")]
    rows = paper.compare(ms)
    assert [(c.recipe, c.epoch, c.n, round(c.mean, 4)) for c in rows] == [
        ("paper", 200, 2, 93.6), ("differs: x=1 (paper: 2)", 4, 2, 42.0),
        ("differs: x=3 (paper: 2)", 8, 1, 60.0)]
    assert [c.within for c in rows] == ["1 std", "n/a (other recipe)", "n/a (other recipe)"]
    assert rows[1].difference == pytest.approx(42.0 - 93.59)
    assert paper.comparison_cells(rows[1])[-2:] == ["n/a (other recipe)",
                                                    "differs: x=1 (paper: 2)"]


@pytest.fixture
def toy_sweep(tmp_path: Path) -> Path:
    """The PreResNet164 CIFAR-100 SWA preset: two exact runs (seeds 0, 1), three toy runs of
    6 epochs on synthetic data (one without an evaluation at epoch 5), and a toy run without
    an evaluation of the average."""
    sweep = tmp_path / "sweep"
    preset = "paper/preresnet164_cifar100_swa1.5"
    for seed, a in enumerate((0.80, 0.81)):
        fake_run(sweep / f"exact{seed}", preset, seed, acc={150: a, 188: a, 225: a})
    for seed, a in enumerate((0.40, 0.42)):
        fake_run(sweep / f"toy{seed}", preset, seed, extra=TOY,
                 acc={2: None, 4: a, 5: a + 0.1, 6: a + 0.2})
    fake_run(sweep / "toy2", preset, 2, extra=TOY, acc={2: None, 4: 0.44, 6: 0.64})
    fake_run(sweep / "noeval", preset, 3, extra=TOY, acc={2: None, 4: None, 6: None})
    return sweep


def test_report_shows_other_recipes_beside_the_paper(toy_sweep: Path) -> None:
    report = write_report(toy_sweep, use_wandb=False)
    got = [(c.column, c.epoch, c.n, round(c.mean, 4), c.within, c.recipe) for c in report.paper]
    na = "n/a (other recipe)"
    assert got == [("swa1", 150, 2, 80.5, "no", "paper"),
                   ("swa1", 4, 3, 42.0, na, TOY_LABEL),
                   ("swa1.25", 188, 2, 80.5, "2 std", "paper"),
                   ("swa1.25", 5, 2, 51.0, na, TOY_LABEL),
                   ("swa1.5", 225, 2, 80.5, "1 std", "paper"),
                   ("swa1.5", 6, 3, 62.0, na, TOY_LABEL)]
    assert [r.name for r, _ in report.paper_skipped] == ["noeval"]
    md = report.markdown
    assert ("| PreResNet164 | CIFAR-100 | SWA 1 budget | 4 | 79.77 ± 0.17 | 42.00 ± 2.00 | 3 | "
            f"-37.77 | n/a (other recipe) | {TOY_LABEL} |") in md
    assert ("| PreResNet164 | CIFAR-100 | SWA 1.5 budgets | 225 | 80.35 ± 0.16 | 80.50 ± 0.71 "
            "| 2 | +0.15 | 1 std | paper |") in md
    assert ("- noeval: data.name=synthetic (paper: cifar100), swa.start=3 (paper: 126)"
            in md)
    with open(toy_sweep / "report_paper.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["n"], r["within"], r["recipe"]) for r in rows][:2] == [
        ("150", "2", "no", "paper"), ("4", "3", na, TOY_LABEL)]
    # report.csv: one row per configuration, its columns unchanged by the paper table.
    with open(toy_sweep / "report.csv", newline="") as f:
        main = list(csv.DictReader(f))
    assert "recipe" not in main[0] and len(main) == 2


# -- scripts/reproduce.sh and the docs -------------------------------------------------------------


def reproduce(*args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "SWEEP_DIR": "out/sweep",
           **env_vars}
    return subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_reproduce_paper_builds_one_multirun() -> None:
    proc = reproduce("paper", "preresnet164", "cifar100", "hydra/launcher=slurm_gpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.replace("\\", "").split() == [
        sys.executable, "-m", "swa_research.train", "-m",
        "experiment=paper/preresnet164_cifar100_sgd,paper/preresnet164_cifar100_swa1.5",
        "seed=0,1,2", "hydra.sweep.dir=out/sweep", "hydra/launcher=slurm_gpu"]
    whole = reproduce("paper").stdout.replace("\\", "")
    assert f"experiment={','.join(PRESETS)} " in whole
    row = reproduce("paper", "all", "cifar10", "trainer.device=cuda").stdout.replace("\\", "")
    assert f"experiment={','.join(paper.presets(dataset='cifar10'))} " in row
    assert reproduce("paper_vgg16").stdout.replace("\\", "").split()[4] == \
        "experiment=paper_vgg16"
    bad = reproduce("paper", "resnet")
    assert bad.returncode == 2 and "expected a model" in bad.stderr


def test_reproduce_paper_at_a_scaled_budget() -> None:
    """BUDGET=N: one multirun per preset, in folders of the sweep, at the scaled epochs."""
    proc = reproduce("paper", "preresnet164", "cifar10", "data=synthetic", BUDGET="8")
    assert proc.returncode == 0, proc.stderr
    lines = [line.replace("\\", "").split() for line in proc.stdout.splitlines()]
    assert lines == [
        [sys.executable, "-m", "swa_research.train", "-m",
         "experiment=paper/preresnet164_cifar10_sgd", "seed=0,1,2",
         "hydra.sweep.dir=out/sweep/paper_preresnet164_cifar10_sgd", "trainer.epochs=8",
         "data=synthetic"],
        [sys.executable, "-m", "swa_research.train", "-m",
         "experiment=paper/preresnet164_cifar10_swa1.5", "seed=0,1,2",
         "hydra.sweep.dir=out/sweep/paper_preresnet164_cifar10_swa1.5", "trainer.epochs=12",
         "swa.start=7", "data=synthetic"]]
    assert len(reproduce("paper", "all", "cifar100", BUDGET="2").stdout.splitlines()) == 6
    for bad in (reproduce("cpu_quick", BUDGET="8"), reproduce("paper", BUDGET="0"),
                reproduce("paper", BUDGET="x")):
        assert bad.returncode == 2 and "BUDGET" in bad.stderr


def test_docs_paper_lists_every_cell_and_preset() -> None:
    text = (ROOT / "docs" / "paper.md").read_text()
    for cells in paper.PUBLISHED.values():
        for mean, std in cells.values():
            assert f"{mean:.2f} ± {std:.2f}" in text
    for preset in PRESETS:
        assert f"`{preset}`" in text
    assert "not run" in text
    assert "docs/paper.md" in (ROOT / "README.md").read_text()
    toy = text[text.index("## Toy row on a CPU"):text.index("## The table")]
    assert "Not the paper's recipe" in toy and "2-core x86_64 CPU, no GPU" in toy
    assert toy.count("| n/a (other recipe) | differs: data.name=synthetic") == 4
    assert paper.OTHER_RECIPE_NOTE in toy


@pytest.mark.slow
def test_docs_paper_holds_the_computed_estimates() -> None:
    """docs/paper.md's GPU-hour table is what ``python -m swa_research.paper`` prints (FLOPs
    measured with FlopCounterMode: several seconds on a CPU)."""
    assert paper.estimate_table() in (ROOT / "docs" / "paper.md").read_text()


@pytest.mark.slow
def test_a_tiny_multirun_of_paper_presets(tmp_path: Path) -> None:
    """The nested preset names run as one multirun on a CPU (synthetic data, two epochs of a
    few images) and the sweep report names them."""
    sweep = tmp_path / "sweep"
    args = ["experiment=paper/preresnet164_cifar10_sgd,paper/preresnet164_cifar10_swa1.5",
            "data=synthetic", "data.train_size=64", "data.test_size=32", "trainer.epochs=2",
            "trainer.batch_size=32", "trainer.eval_batch_size=32", "trainer.num_workers=0",
            "trainer.progress=none", "trainer.device=cpu", "swa.start=1",
            "trainer.eval_every=1", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "swa_research.train", "-m", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "report.csv", newline="") as f:
        labels = [r["configuration"] for r in csv.DictReader(f)]
    assert any("paper/preresnet164_cifar10_sgd" in x for x in labels)
    assert any("paper/preresnet164_cifar10_swa1.5" in x for x in labels)
    # Synthetic data: another recipe, in the table with no verdict. 2 epochs of the SWA
    # preset: a budget of 4/3, one SWA cell (1.5 budgets, epoch 2).
    with open(sweep / "report_paper.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["column"], r["epoch"], r["n"]) for r in rows] == [("sgd", "2", "1"),
                                                                 ("swa1.5", "2", "1")]
    assert all(r["within"] == "n/a (other recipe)" and r["recipe"].startswith(
        "differs: data.name=synthetic (paper: cifar10), trainer.epochs=2") for r in rows)
