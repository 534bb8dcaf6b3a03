"""The SWA paper's Table 1 (Izmailov et al., 2018; published in timgaripov/swa README.md) as data,
its recipes, which cells of it a finished run measures, and what reproducing it costs.

Test accuracy (%), mean ± std over 3 runs, for VGG16, PreResNet164 and WideResNet28x10 on
CIFAR-10 and CIFAR-100. A model's *budget* is the epochs its conventional SGD training takes
(200, 150, 200). Columns: ``sgd`` (a run without averaging over the budget), ``swa1``,
``swa1.25``, ``swa1.5`` (the average after 1, 1.25 and 1.5 budgets). The SWA schedule depends
only on the averaging start, so one run of 1.5 budgets gives all three SWA cells: its average's
test accuracy at the epochs :meth:`Recipe.column_epochs` names (history.csv's ``swa_test_acc``).

A run of a preset with changed settings (fewer epochs, generated data, ...) is *another
recipe*: :func:`measured_cells` measures its cells only when asked (``other_recipes=True``),
labelled with what differs (:func:`recipe_label`), its SWA columns read at the same fractions
of its own epochs (:func:`scaled_column_epochs`); such figures are never pooled with the
paper's recipe's, and are not comparable with the published ones.

The presets are ``experiment=paper/<model>_<dataset>_<run>`` with run ``sgd`` or ``swa1.5``
(conf/experiment/paper/). Everything here is a pure function of plain data (a run's config,
its metrics.json and its history rows) except :func:`forward_flops`, which builds a model.

    python -m swa_research.paper                      # the GPU-hour estimate of every preset
    python -m swa_research.paper --images-per-s preresnet164=9000,wrn28x10=2500
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from swa_research.analysis.paper_fge import (
    FGE_EPOCHS,
    FGE_PUBLISHED,
    fge_expected,
    fge_preset,
)

MODELS = ("vgg16", "preresnet164", "wrn28x10")
DATASETS = ("cifar10", "cifar100")
RUNS = ("sgd", "swa1.5")
COLUMNS = ("sgd", "swa1", "swa1.25", "swa1.5")
COLUMN_LABELS = {"sgd": "SGD", "swa1": "SWA 1 budget", "swa1.25": "SWA 1.25 budgets",
                 "swa1.5": "SWA 1.5 budgets", "fge": "FGE 1 budget"}
TABLE_ORDER = ("sgd", "fge", "swa1", "swa1.25", "swa1.5")  # the paper's column order
MODEL_LABELS = {"vgg16": "VGG16", "preresnet164": "PreResNet164", "wrn28x10": "WideResNet28x10"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
SOURCE = "timgaripov/swa README.md (Results), the SWA paper's Table 1"

# (model, dataset) -> column -> (mean, std), test accuracy in %, 3 runs each.
PUBLISHED: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("vgg16", "cifar10"): {"sgd": (93.25, 0.16), "swa1": (93.59, 0.16),
                           "swa1.25": (93.70, 0.22), "swa1.5": (93.64, 0.18)},
    ("preresnet164", "cifar10"): {"sgd": (95.28, 0.10), "swa1": (95.56, 0.11),
                                  "swa1.25": (95.77, 0.04), "swa1.5": (95.83, 0.03)},
    ("wrn28x10", "cifar10"): {"sgd": (96.18, 0.11), "swa1": (96.45, 0.11),
                              "swa1.25": (96.64, 0.08), "swa1.5": (96.79, 0.05)},
    ("vgg16", "cifar100"): {"sgd": (72.55, 0.10), "swa1": (73.91, 0.12),
                            "swa1.25": (74.17, 0.15), "swa1.5": (74.27, 0.25)},
    ("preresnet164", "cifar100"): {"sgd": (78.49, 0.36), "swa1": (79.77, 0.17),
                                   "swa1.25": (80.18, 0.23), "swa1.5": (80.35, 0.16)},
    ("wrn28x10", "cifar100"): {"sgd": (80.82, 0.23), "swa1": (81.46, 0.23),
                               "swa1.25": (81.91, 0.27), "swa1.5": (82.15, 0.27)},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timgaripov/swa models/vgg.py
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # models/preresnet.py, models/wide_resnet.py
CIFAR_STD = (0.2023, 0.1994, 0.2010)
TRAIN_IMAGES = 50_000  # the whole CIFAR training set (the paper keeps no validation split)
TEST_IMAGES = 10_000
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class Recipe:
    """One row of the table: timgaripov/swa README.md's command line for it, train.py's
    defaults for the rest (momentum 0.9, batch 128, an average once per epoch)."""

    model: str
    dataset: str
    budget: int  # epochs of the SGD column
    lr: float  # --lr_init
    weight_decay: float  # --wd
    swa_lr: float  # --swa_lr
    swa_start: int  # --swa_start: averages after the epochs E >= swa_start
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_options: Mapping[str, Any] = field(default_factory=dict)
    batch_norm: bool = True  # whether the average's BN statistics are recomputed (a BN pass)
    swa_eval_every: int = 5  # divides the SWA 1 and 1.25 epochs
    sgd_eval_every: int = 5

    @property
    def swa_epochs(self) -> int:
        return self.column_epochs["swa1.5"]

    @property
    def column_epochs(self) -> dict[str, int]:
        """The epoch at which each column is read. 1.25 budgets of 150 epochs is 187.5: read
        at 188 (rounded up; the source does not say which whole epoch)."""
        return {"sgd": self.budget, "swa1": self.budget,
                "swa1.25": math.ceil(1.25 * self.budget), "swa1.5": math.ceil(1.5 * self.budget)}

    def epochs(self, run: str) -> int:
        if run == "fge":
            return FGE_EPOCHS
        return self.budget if run == "sgd" else self.swa_epochs

    def eval_every(self, run: str) -> int:
        return self.sgd_eval_every if run == "sgd" else self.swa_eval_every

    def expected(self, run: str) -> dict[str, Any]:
        """The config values (command-line names) a run of this recipe has; what
        :func:`recipe_differences` compares. ``swa`` runs may train longer or shorter than
        1.5 budgets (the cells read are those the run reaches), so their epochs are not here."""
        out: dict[str, Any] = {
            "optimizer.name": "sgd", "optimizer.lr": self.lr, "optimizer.momentum": 0.9,
            "optimizer.weight_decay": self.weight_decay, "optimizer.nesterov": False,
            "schedule.name": "decay_then_constant", "schedule.step_unit": "epoch",
            "schedule.decay_start": 0.5, "schedule.decay_end": 0.9,
            "data.augment": "crop_flip", "data.val_fraction": 0.0, "data.normalize": True,
            "data.mean": list(self.mean), "data.std": list(self.std),
            "trainer.batch_size": 128, "trainer.drop_last": False,
            **{f"model.{k}": v for k, v in self.model_options.items()},
        }
        if run == "sgd":
            out.update({"swa.method": "none", "schedule.final_ratio": 0.01,
                        "trainer.epochs": self.budget})
        elif run == "fge":
            out.update(fge_expected(self.model))
        else:
            out.update({"swa.method": "swa", "swa.lr": self.swa_lr,
                        "swa.start": self.swa_start, "swa.freq": 1, "swa.unit": "epoch",
                        "swa.bn_update": True})
        return out


def _recipes() -> dict[tuple[str, str], Recipe]:
    vgg = {"batch_norm": False, "dropout": 0.5, "width": 1.0}
    out = {}
    for ds in DATASETS:
        # README: "we use same parameters for both CIFAR-10 and CIFAR-100 except for PreResNet".
        out[("vgg16", ds)] = Recipe("vgg16", ds, 200, 0.05, 5e-4, 0.01, 161, IMAGENET_MEAN,
                                    IMAGENET_STD, vgg, batch_norm=False)
        out[("preresnet164", ds)] = Recipe(
            "preresnet164", ds, 150, 0.1, 3e-4, 0.05 if ds == "cifar100" else 0.01, 126,
            CIFAR_MEAN, CIFAR_STD, swa_eval_every=2)  # 2 divides 150 and 188
        out[("wrn28x10", ds)] = Recipe("wrn28x10", ds, 200, 0.1, 5e-4, 0.05, 161, CIFAR_MEAN,
                                       CIFAR_STD, {"dropout": 0.0})
    return out


RECIPES: dict[tuple[str, str], Recipe] = _recipes()


def preset(model: str, dataset: str, run: str) -> str:
    """The experiment option of a recipe's run: ``paper/<model>_<dataset>_<run>``."""
    if (model, dataset) not in RECIPES or run not in RUNS:
        raise ValueError(f"no paper preset for {model}, {dataset}, {run}")
    return f"paper/{model}_{dataset}_{run}"


def presets(model: str | None = None, dataset: str | None = None) -> list[str]:
    """The presets of the whole table, of one model's or one data set's rows, or of one row."""
    for value, allowed in ((model, MODELS), (dataset, DATASETS)):
        if value is not None and value not in allowed:
            raise ValueError(f"{value}: expected one of {', '.join(allowed)}")
    return [preset(m, d, r) for m in MODELS if model in (None, m)
            for d in DATASETS if dataset in (None, d) for r in RUNS]


# The older names of four presets (conf/experiment/paper_vgg16*.yaml): the same recipes.
LEGACY_PRESETS = {"paper_vgg16": ("vgg16", "cifar10", "swa1.5"),
                  "paper_vgg16_sgd": ("vgg16", "cifar10", "sgd"),
                  "paper_vgg16_cifar100": ("vgg16", "cifar100", "swa1.5"),
                  "paper_vgg16_sgd_cifar100": ("vgg16", "cifar100", "sgd")}


def parse_preset(experiment: Any) -> tuple[str, str, str] | None:
    """(model, dataset, run) of a paper preset's name (``paper/<model>_<dataset>_<run>`` or
    an older name), else None."""
    if not isinstance(experiment, str):
        return None
    if experiment in LEGACY_PRESETS:
        return LEGACY_PRESETS[experiment]
    for m in MODELS:
        for d in DATASETS:
            if experiment == fge_preset(m, d):
                return m, d, "fge"
            for r in RUNS:
                if experiment == f"paper/{m}_{d}_{r}":
                    return m, d, r
    return None


def scaled_overrides(name: str, budget: int) -> list[str]:
    """The overrides that scale a paper preset down (or up) to a budget of ``budget`` epochs:
    an ``sgd`` preset trains ``budget`` epochs; a ``swa1.5`` preset 1.5 budgets (rounded up)
    with the averaging start scaled by the same factor (rounded to the nearest epoch, at
    least 1), so that its lr schedule keeps the paper's shape. Runs with these overrides are
    another recipe than the paper's (their cells are labelled so, never pooled with it)."""
    found = parse_preset(name)
    if found is None:
        raise ValueError(f"{name}: not a paper preset")
    if budget < 1:
        raise ValueError(f"budget {budget}: expected at least 1 epoch")
    recipe, run = RECIPES[found[:2]], found[2]
    if run == "sgd":
        return [f"trainer.epochs={budget}"]
    epochs = math.ceil(Fraction(recipe.swa_epochs * budget, recipe.budget))
    start = max(1, math.floor(Fraction(recipe.swa_start * budget, recipe.budget) + Fraction(1, 2)))
    return [f"trainer.epochs={epochs}", f"swa.start={start}"]


# ---------------------------------------------------------------------------------------------
# Which cells a run measures


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """``key`` (a dotted command-line name) in a flat ({"swa.lr": ...}) or nested config;
    None when absent."""
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(b, (int, float)) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def classify(config: Mapping[str, Any], experiment: Any = None) -> tuple[Recipe, str] | None:
    """(recipe, run kind) for a run of one of the table's models on one of its data sets: run
    kind ``sgd`` when it does not average, else ``swa1.5``. Otherwise, when ``experiment`` (the
    run's ``experiment`` option) names a paper preset, that preset's recipe (a run of it with
    another model or data set: another recipe, see :func:`recipe_differences`); else None (an
    image-folder copy of CIFAR-10 is not the paper's data set)."""
    recipe = RECIPES.get((config_value(config, "model.name"), config_value(config, "data.name")))
    if recipe is None:
        found = parse_preset(experiment)
        if found is None:
            return None
        recipe = RECIPES[found[:2]]
    if config_value(config, "schedule.name") == "fge":
        return recipe, "fge"
    return recipe, "sgd" if config_value(config, "swa.method") == "none" else "swa1.5"


def recipe_differences(config: Mapping[str, Any], experiment: Any = None
                       ) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, the paper's) for each recipe value the run does not share; a key
    the run's config lacks is not held against it. Empty for a run of the paper's recipe (and
    for a run that is no recipe's: see :func:`classify`, which ``experiment`` is passed to)."""
    found = classify(config, experiment)
    if found is None:
        return []
    recipe, run = found
    out = []
    expected = {"model.name": recipe.model, "data.name": recipe.dataset,
                **recipe.expected(run)}
    for key, want in expected.items():
        have = config_value(config, key)
        if have is not None and not _same(have, want):
            out.append((key, have, want))
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


PAPER_RECIPE = "paper"
OTHER_RECIPE = "n/a (other recipe)"  # the verdict of a cell of another recipe
OTHER_RECIPE_NOTE = ("other recipe: a run of a paper preset with settings changed (recipe "
                     "column: what differs), its SWA columns read at 1, 1.25 and 1.5 times its "
                     "own budget (2/3 of its epochs); not comparable with the published "
                     "figures, never pooled with the paper's recipe, no verdict.")


def recipe_label(config: Mapping[str, Any], experiment: Any = None) -> str:
    """``paper`` for a run of the paper's recipe, else ``differs: key=value (paper: value),
    ...``: every recipe value the run does not share, and for a SWA run of other epochs
    than 1.5 budgets its epochs (its cells are read at fractions of them)."""
    found = classify(config, experiment)
    diffs = recipe_differences(config, experiment)
    if found is None or not diffs:
        return PAPER_RECIPE
    recipe, run = found
    epochs = config_value(config, "trainer.epochs")
    if run == "swa1.5" and epochs is not None and not _same(epochs, recipe.swa_epochs):
        diffs.append(("trainer.epochs", epochs, recipe.swa_epochs))
    first = ("model.name", "data.name", "trainer.epochs", "swa.start")
    diffs.sort(key=lambda d: first.index(d[0]) if d[0] in first else len(first))
    return "differs: " + ", ".join(f"{k}={_show(have)} (paper: {_show(want)})"
                                   for k, have, want in diffs)


def short_recipe(label: str, keep: int = 3) -> str:
    """A recipe label of at most ``keep`` differences, then ``+N more``."""
    if not label.startswith("differs: "):
        return label
    parts = re.split(r"(?<=\)), ", label[len("differs: "):])
    more = f", +{len(parts) - keep} more" if len(parts) > keep else ""
    return "differs: " + ", ".join(parts[:keep]) + more


def scaled_column_epochs(recipe: Recipe, epochs: int) -> dict[str, int]:
    """The epochs at which a SWA run of another recipe of ``epochs`` epochs is read: the same
    fractions of its own budget (``epochs`` / 1.5 for the paper's 1.5-budget runs) as the
    paper's run, rounded up as :attr:`Recipe.column_epochs`: a 1.5-budget PreResNet164 run of
    12 epochs is read at 8, 10 and 12. A column whose epoch is the next column's is left
    out (e.g. 4 epochs: SWA 1 at 3, SWA 1.5 at 4, no SWA 1.25)."""
    budget = Fraction(int(epochs) * recipe.budget, recipe.swa_epochs)
    out = {"swa1": math.ceil(budget), "swa1.25": math.ceil(Fraction(5, 4) * budget),
           "swa1.5": math.ceil(Fraction(3, 2) * budget)}
    if out["swa1.25"] == out["swa1.5"]:
        del out["swa1.25"]
    if out["swa1"] == out.get("swa1.25", out["swa1.5"]):
        del out["swa1"]
    return out


@dataclass(frozen=True)
class Measurement:
    """One run's figure for one cell: test accuracy in %."""

    model: str
    dataset: str
    column: str
    epoch: int
    acc: float
    recipe: str = PAPER_RECIPE  # "paper", or what differs (:func:`recipe_label`)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) \
        and math.isfinite(x) else None


def _history_acc(history: Sequence[Mapping[str, Any]], epoch: int, key: str) -> float | None:
    for row in history:
        e = _finite(row.get("epoch"))
        if e is not None and int(round(e)) == epoch:
            value = row.get(key)
            if isinstance(value, str):
                value = float(value) if value.strip() else None
            if (v := _finite(value)) is not None:
                return v
    return None


def measured_cells(config: Mapping[str, Any], metrics: Mapping[str, Any] | None,
                   history: Sequence[Mapping[str, Any]] = (), experiment: Any = None,
                   other_recipes: bool = False) -> list[Measurement]:
    """The cells of the table a finished run measures, with its figure for each.

    * ``sgd``: a run of the recipe without averaging (``swa=none``, the budget's epochs): its
      final SGD model's test accuracy (metrics.json ``sgd.test_acc``).
    * ``swa1``, ``swa1.25``, ``swa1.5``: a run of the recipe with SWA: its average's test
      accuracy at the cell's epoch (history.csv ``swa_test_acc``; at the run's last epoch also
      metrics.json ``swa.test_acc``), for each cell epoch the run reached and evaluated.

    None of them for a run of another recipe (:func:`recipe_differences`; ``experiment``, the
    run's ``experiment`` option, lets a paper preset's run on other data count as one) unless
    ``other_recipes``: then its cells too, labelled with what differs (``recipe``): ``sgd``
    its final SGD model, read at its last epoch; the SWA columns at the same fractions of its
    own epochs (:func:`scaled_column_epochs`), where its history has an evaluation. None for
    a run that did not finish, or one of another model or data set. Accuracies are fractions
    in the run's files, percentages here.
    """
    found = classify(config, experiment)
    if found is None or not metrics or metrics.get("status", "finished") != "finished":
        return []
    label = recipe_label(config, experiment)
    if label != PAPER_RECIPE and not other_recipes:
        return []
    recipe, run = found
    epochs = config_value(config, "trainer.epochs")
    out: list[Measurement] = []

    def add(column: str, epoch: int, acc: float | None) -> None:
        if acc is not None:
            out.append(Measurement(recipe.model, recipe.dataset, column, epoch, 100.0 * acc,
                                   label))

    if run == "fge":  # the ensemble's test accuracy at the end of the run
        add("fge", int(epochs) if epochs is not None else FGE_EPOCHS,
            _finite((metrics.get("fge") or {}).get("test_acc")))
        return out
    if run == "sgd":
        sgd = metrics.get("sgd") or {}
        acc = _finite(sgd.get("test_acc"))
        epoch = recipe.budget if label == PAPER_RECIPE or epochs is None else int(epochs)
        add("sgd", epoch,
            acc if acc is not None else _history_acc(history, epoch, "sgd_test_acc"))
        return out
    swa = metrics.get("swa") or {}
    if label == PAPER_RECIPE or epochs is None:
        columns = {c: recipe.column_epochs[c] for c in ("swa1", "swa1.25", "swa1.5")}
    else:
        columns = scaled_column_epochs(recipe, int(epochs))
    for column, epoch in columns.items():
        if epochs is not None and epoch > int(epochs):
            continue
        acc = _history_acc(history, epoch, "swa_test_acc")
        if acc is None and epochs is not None and epoch == int(epochs):
            acc = _finite(swa.get("test_acc"))
        add(column, epoch, acc)
    return out


# ---------------------------------------------------------------------------------------------
# Published against measured


@dataclass
class Comparison:
    """One cell: the published mean ± std against the mean ± sample std over the runs."""

    model: str
    dataset: str
    column: str
    epoch: int
    published_mean: float
    published_std: float | None  # None: the paper gives no std (its FGE column)
    values: list[float]
    recipe: str = PAPER_RECIPE  # "paper", or what the runs' recipe changes (never pooled)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def difference(self) -> float:
        """Measured mean minus published mean, in percentage points."""
        return self.mean - self.published_mean

    @property
    def within(self) -> str:
        """``1 std`` when the measured mean lies within the published mean ± its std, else
        ``2 std`` within ± 2 std, else ``no`` (the published std, over the paper's 3 runs);
        ``n/a (other recipe)`` for runs of another recipe, whose figures are not comparable."""
        if self.recipe != PAPER_RECIPE:
            return OTHER_RECIPE
        if self.published_std is None:
            return NO_STD
        return within(self.mean, self.published_mean, self.published_std)


NO_STD = "n/a (no std published)"


def published(model: str, dataset: str, column: str) -> tuple[float, float | None]:
    """The published mean and std of a cell (the FGE column has no std)."""
    if column == "fge":
        return FGE_PUBLISHED[(model, dataset)], None
    return PUBLISHED[(model, dataset)][column]


def within(mean: float, published_mean: float, published_std: float) -> str:
    gap = abs(mean - published_mean)
    tol = 1e-9  # the published figures have two decimals: a mean on the edge is within
    if gap <= published_std + tol:
        return "1 std"
    if gap <= 2 * published_std + tol:
        return "2 std"
    return "no"


def compare(measurements: Sequence[Measurement]) -> list[Comparison]:
    """Per cell and recipe measured at least once, in the table's order (data set, model,
    column; the paper's recipe first, then the other recipes by label and epoch). Runs of
    different recipes (or read at different epochs) are never pooled."""
    cells: dict[tuple[str, str, str, str, int], Comparison] = {}
    for m in measurements:
        key = (m.model, m.dataset, m.column, m.recipe, m.epoch)
        if key not in cells:
            pub_mean, pub_std = published(m.model, m.dataset, m.column)
            cells[key] = Comparison(m.model, m.dataset, m.column, m.epoch, pub_mean, pub_std, [],
                                    m.recipe)
        cells[key].values.append(m.acc)
    order = {(mo, d, c): i for i, (d, mo, c) in enumerate(
        (d, mo, c) for d in DATASETS for mo in MODELS for c in TABLE_ORDER)}
    return sorted(cells.values(), key=lambda c: (order[(c.model, c.dataset, c.column)],
                                                 c.recipe != PAPER_RECIPE, c.recipe, c.epoch))


COMPARISON_HEADER = ["model", "data set", "column", "epoch", "published %", "measured %", "n",
                     "difference pp", "within published", "recipe"]


def comparison_cells(c: Comparison) -> list[str]:
    """A row of the table; the recipe shortened to its first three differences."""
    measured = f"{c.mean:.2f}" if c.std is None else f"{c.mean:.2f} ± {c.std:.2f}"
    return [MODEL_LABELS[c.model], DATASET_LABELS[c.dataset], COLUMN_LABELS[c.column],
            str(c.epoch), f"{c.published_mean:.2f}" + ("" if c.published_std is None else
                                                       f" ± {c.published_std:.2f}"), measured,
            str(c.n), f"{c.difference:+.2f}", c.within, short_recipe(c.recipe)]


CSV_HEADER = ["model", "dataset", "column", "epoch", "published_mean", "published_std",
              "measured_mean", "measured_std", "n", "difference", "within", "recipe"]


def comparison_csv_row(c: Comparison) -> list[Any]:
    """A row of report_paper.csv; the recipe in full."""
    return [c.model, c.dataset, c.column, c.epoch, c.published_mean, c.published_std, c.mean,
            c.std, c.n, c.difference, c.within, c.recipe]


# ---------------------------------------------------------------------------------------------
# What reproducing the table costs

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (the datasheet's figure)
SUSTAINED_FRACTION = 0.40


def evaluations(recipe: Recipe, run: str) -> list[int]:
    """The epochs at which the trainer evaluates: every ``eval_every`` and the last."""
    n, every = recipe.epochs(run), recipe.eval_every(run)
    return [e for e in range(1, n + 1) if e % every == 0 or e == n]


def images_processed(recipe: Recipe, run: str) -> tuple[int, int]:
    """(training images: forward and backward, evaluation images: forward only) of one run.
    Evaluation: the SGD model on the test set at each evaluation; from the averaging start on
    the average too, after a BN pass over the training set for the BN models; then the
    calibration pass of each model over the test set at the end."""
    train = recipe.epochs(run) * TRAIN_IMAGES
    evals = evaluations(recipe, run)
    forward = len(evals) * TEST_IMAGES + TEST_IMAGES  # SGD model; calibration at the end
    if run != "sgd":
        averaged = [e for e in evals if e >= recipe.swa_start]
        per_eval = TEST_IMAGES + (TRAIN_IMAGES if recipe.batch_norm else 0)
        forward += len(averaged) * per_eval + TEST_IMAGES
    return train, forward


def forward_flops(model: str, num_classes: int = 10) -> int:
    """FLOPs of one forward pass of one 32x32 image (torch's FlopCounterMode: a multiply-add
    counts 2), the model in eval mode with its registered default options."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from swa_research.models import build_model, resolve_model_config

    net = build_model(resolve_model_config({"name": model}), num_classes, 32).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 32, 32))
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Estimate:
    preset: str
    epochs: int
    train_images: int
    eval_images: int
    flops: float  # one run: 3 x forward per training image, 1 x per evaluation image
    hours: float  # one run, at the assumed sustained throughput (or measured images/s)

    @property
    def hours_3_seeds(self) -> float:
        return 3 * self.hours


def estimate(model: str, dataset: str, run: str, forward: float,
             sustained_tflops: float | None = None,
             images_per_s: float | None = None) -> Estimate:
    """GPU hours of one run: its FLOPs (``forward`` per image and pass, x3 for a training
    image) at ``sustained_tflops``; or, given the measured training ``images_per_s``, its
    images at that speed (an evaluation image counted as a third of a training image)."""
    recipe = RECIPES[(model, dataset)]
    train, evaluation = images_processed(recipe, run)
    flops = 3.0 * forward * train + forward * evaluation
    if images_per_s is not None:
        hours = (train + evaluation / 3.0) / images_per_s / 3600.0
    else:
        tflops = sustained_tflops or SUSTAINED_FRACTION * H100_BF16_DENSE_TFLOPS
        hours = flops / (tflops * 1e12) / 3600.0
    return Estimate(preset(model, dataset, run), recipe.epochs(run), train, evaluation, flops,
                    hours)


def estimate_table(sustained_tflops: float | None = None,
                   images_per_s: Mapping[str, float] | None = None,
                   flops: Mapping[tuple[str, str], float] | None = None) -> str:
    """A Markdown table of every preset's cost, FLOPs measured unless ``flops`` gives them per
    (model, dataset)."""
    rows = ["| preset | epochs | forward GFLOP / image | training images | evaluation images "
            "| PFLOP / run | GPU h / run | GPU h, 3 seeds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    total = 0.0
    for model in MODELS:
        for dataset in DATASETS:
            speed = (images_per_s or {}).get(model)
            if images_per_s is not None and speed is None:
                continue
            f = (flops or {}).get((model, dataset)) or forward_flops(model, NUM_CLASSES[dataset])
            for run in RUNS:
                e = estimate(model, dataset, run, f, sustained_tflops, speed)
                total += e.hours_3_seeds
                rows.append(f"| `{e.preset}` | {e.epochs} | {f / 1e9:.3f} | "
                            f"{e.train_images:,} | {e.eval_images:,} | {e.flops / 1e15:.1f} | "
                            f"{e.hours:.3f} | {e.hours_3_seeds:.2f} |")
    rows.append(f"| all | | | | | | | {total:.2f} |")
    return "\n".join(rows)


def published_table() -> str:
    """The published table in Markdown, one row per (data set, model)."""
    rows = ["| data set | model (budget) | " + " | ".join(COLUMN_LABELS[c] for c in TABLE_ORDER)
            + " |", "| --- | --- | " + " | ".join("---" for _ in TABLE_ORDER) + " |"]
    for dataset in DATASETS:
        for model in MODELS:
            cells = [published(model, dataset, c) for c in TABLE_ORDER]
            budget = RECIPES[(model, dataset)].budget
            rows.append(f"| {DATASET_LABELS[dataset]} | {MODEL_LABELS[model]} ({budget}) | "
                        + " | ".join(f"{m:.2f}" + ("" if sd is None else f" ± {sd:.2f}")
                                     for m, sd in cells) + " |")
    return "\n".join(rows)


def _speeds(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in MODELS:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected MODEL=IMAGES_PER_S with MODEL one of {', '.join(MODELS)}")
        out[name.strip()] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.paper",
        description="GPU hours of every preset of the SWA paper's Table 1 (experiment=paper/*).")
    parser.add_argument("--sustained-tflops", type=float, default=None,
                        help="assumed sustained training throughput in TFLOP/s (default: 40%% "
                             f"of an H100's {H100_BF16_DENSE_TFLOPS:g} dense bf16 TFLOP/s)")
    parser.add_argument("--images-per-s", type=_speeds, default=None, metavar="MODEL=N,...",
                        help="measured training images/s per model: hours at that speed instead")
    parser.add_argument("--published", action="store_true", help="print the published table")
    args = parser.parse_args(argv)
    if args.published:
        print(published_table())
        return 0
    print(estimate_table(args.sustained_tflops, args.images_per_s))
    return 0

