"""The task seam: what the training loop learns, told to it by a :class:`Task`.

The loop knows nothing of images or classes. A task supplies the run's data and its batches
(training, evaluation, the averages' BN pass), the loss, the metrics an evaluation reports and
their names (:class:`TaskMetrics`: which are better higher, which are shown in percent, which
one the sweep report leads with), and whether it predicts class distributions (SWAG's Bayesian
model averaging and calibration need them). The evaluation, the history, metrics.json, the
trackers, the report and the plots take the metric names from it.

A task is one file and one registry line: a subclass decorated with ``@register_task("name")``,
imported where the registry is filled (:mod:`swa_research.tasks`), chosen with ``task=name``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from swa_research.data import (
    DataSplits,
    Limits,
    Preprocess,
    Shard,
    bn_pass_batches,
    build_data,
    eval_batches,
    train_batches,
)
from swa_research.errors import UserError

METRIC_TITLES = {"acc": "accuracy", "mae": "mean absolute error", "ppl": "perplexity"}


@dataclass(frozen=True)
class TaskMetrics:
    """The names of a task's metrics and how to read them: what metrics.json records under
    ``task``, and all a reader of a run (report, plots, trackers) needs to know of the task.

    ``metrics``: what an evaluation reports, ``loss`` first (the training objective's mean);
    the history's columns are ``train_<m>`` and ``<model>_<split>_<m>``, metrics.json's entries
    ``<split>_<m>``. ``maximize``: the metrics where higher is better. ``percent``: shown
    times 100 with a % sign. ``headline``: the metric the sweep report leads with (its gain
    column, its curves)."""

    name: str
    metrics: tuple[str, ...] = ("loss",)
    maximize: frozenset[str] = field(default_factory=frozenset)
    percent: frozenset[str] = field(default_factory=frozenset)
    headline: str = "loss"
    unit: str = "samples"  # what the training throughput counts (images, tokens)

    def __post_init__(self) -> None:
        if not self.metrics or self.metrics[0] != "loss":
            raise ValueError(f"task {self.name}: its metrics must start with 'loss'")
        unknown = ({self.headline} | self.maximize | self.percent) - set(self.metrics)
        if unknown:
            raise ValueError(f"task {self.name}: {sorted(unknown)} are not among its metrics")

    def keys(self, splits: tuple[str, ...] = ("val", "test")) -> list[str]:
        """``<split>_<metric>`` for each split and metric: an evaluation's entries."""
        return [f"{split}_{m}" for split in splits for m in self.metrics]

    def empty(self, splits: tuple[str, ...] = ("val", "test")) -> dict[str, None]:
        return dict.fromkeys(self.keys(splits))

    def better(self, metric: str, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b`` on ``metric`` (``val_acc`` or ``acc``)."""
        metric = metric.split("_", 1)[1] if metric.startswith(("val_", "test_")) else metric
        return a > b if metric in self.maximize else a < b

    def show(self, metric: str, value: float | None) -> str:
        """A value for a log line: percent metrics as ``12.34%``, others to 4 decimals."""
        if value is None:
            return "-"
        return f"{100 * value:.2f}%" if metric in self.percent else f"{value:.4f}"

    def title(self, metric: str) -> str:
        """A metric's name in prose (``acc``: accuracy)."""
        return METRIC_TITLES.get(metric, metric)

    def gain(self, sgd: float, swa: float, metric: str | None = None) -> float:
        """SWA's improvement over the final SGD model on ``metric`` (default the headline):
        SWA minus SGD where higher is better (accuracy), SGD minus SWA where lower is."""
        return swa - sgd if (metric or self.headline) in self.maximize else sgd - swa

    def gain_scale(self) -> tuple[float, str]:
        """The headline gain's display factor and unit (percentage points for a percent
        metric)."""
        return (100.0, " pp") if self.headline in self.percent else (1.0, "")

    def gain_text(self) -> str:
        """What the headline gain is, in words (the report's and the dashboard's captions)."""
        h = self.title(self.headline)
        diff = (f"SWA minus final SGD test {h}" if self.headline in self.maximize
                else f"final SGD minus SWA test {h} (positive: SWA lower)")
        return diff + (" in percentage points" if self.headline in self.percent else "")

    def show_gain(self, metric: str, diff: float) -> str:
        """A difference of two values: percentage points for percent metrics."""
        return f"{100 * diff:+.2f} pp" if metric in self.percent else f"{diff:+.4f}"

    def record(self) -> dict[str, Any]:
        """metrics.json's ``task``."""
        return {"name": self.name, "metrics": list(self.metrics),
                "maximize": sorted(self.maximize), "percent": sorted(self.percent),
                "headline": self.headline, "unit": self.unit}

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> TaskMetrics:
        """From metrics.json's ``task``; a run written before tasks were recorded is a
        classification run."""
        if not record:
            return CLASSIFICATION
        return cls(str(record["name"]), tuple(record["metrics"]),
                   frozenset(record.get("maximize", ())), frozenset(record.get("percent", ())),
                   str(record.get("headline", "loss")), str(record.get("unit", "samples")))

    @classmethod
    def of_run(cls, metrics: Mapping[str, Any] | None) -> TaskMetrics:
        """The task of a run from its metrics.json contents."""
        return cls.from_record((metrics or {}).get("task"))


def row_metrics(row: Mapping[str, Any]) -> list[str]:
    """The task's metric names in an evaluation row (from its ``sgd_test_<m>`` columns)."""
    return [k[len("sgd_test_"):] for k in row if k.startswith("sgd_test_")]


CLASSIFICATION = TaskMetrics("classification", ("loss", "acc"), frozenset({"acc"}),
                             frozenset({"acc"}), headline="acc", unit="images")


class Task:
    """What the training loop needs of a problem. Subclasses set :attr:`spec` and implement
    :meth:`loss`; the data and batch methods default to the project's image sets
    (:mod:`swa_research.data`), so a task on images overrides only what differs.

    Sums, not means: :meth:`eval_sums` and :meth:`train_sums` return one float64 sum per metric
    over a batch, kept on the device (no host read inside a loop), and :meth:`count` the number
    of targets the sums are over; :meth:`summarize` turns the sums of a whole set into values.
    Under DDP the sums are added over the ranks before that."""

    spec: ClassVar[TaskMetrics]
    # Predicts class distributions: SWAG's Bayesian model average (averaged probabilities) and
    # the calibration of the final models (NLL, ECE, reliability diagram) apply.
    probabilistic: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.spec.name

    def check(self, config: Any) -> None:
        """Refuse a config this task cannot run (UserError naming the key), before any data
        is read. Default: nothing to check."""

    # -- the model's output -----------------------------------------------------------------
    def output_size(self, data: DataSplits) -> int:
        """The width of the model's output layer (its ``num_classes`` argument)."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The training loss of a batch: a scalar mean, float32."""
        raise NotImplementedError

    def metric_sums(self, output: Tensor, target: Tensor) -> list[Tensor]:
        """The sums over a batch of the metrics after ``loss`` (``spec.metrics[1:]``)."""
        return []

    def count(self, target: Tensor) -> int:
        """How many targets a batch's sums are over (samples; tokens for a language model)."""
        return int(target.shape[0])

    def eval_sums(self, output: Tensor, target: Tensor) -> Tensor:
        """[len(spec.metrics)] float64: the batch's loss summed over its targets, then
        :meth:`metric_sums`."""
        loss_sum = self.loss(output, target).double() * self.count(target)
        return torch.stack([loss_sum, *(s.double() for s in self.metric_sums(output, target))])

    def train_sums(self, loss: Tensor, output: Tensor, target: Tensor) -> Tensor:
        """:meth:`eval_sums` of a training batch, from the loss the step computed."""
        n = self.count(target)
        return torch.stack([loss.detach().double() * n,
                            *(s.double() for s in self.metric_sums(output.detach(), target))])

    def summarize(self, sums: list[float], n: float) -> dict[str, float | None]:
        """The values of a set from its sums over ``n`` targets."""
        if n <= 0:
            return dict.fromkeys(self.spec.metrics)
        return {m: s / n for m, s in zip(self.spec.metrics, sums, strict=True)}

    def probs_sums(self, probs: Tensor, target: Tensor) -> Tensor:
        """:meth:`eval_sums` of predicted class probabilities (probabilistic tasks)."""
        raise NotImplementedError(f"task {self.name} does not predict class probabilities")

    # -- data and batches ---------------------------------------------------------------------
    def build_data(self, config: Any, device: torch.device, num_workers: int = 0,
                   memory_format: torch.memory_format = torch.contiguous_format) -> DataSplits:
        """The run's sets from the composed config (``config.data``, ``config.seed``)."""
        return build_data(config.data, config.seed, device, num_workers, memory_format,
                          Limits.of(config))

    def train_batches(self, data: Any, batch_size: int, generator: torch.Generator,
                      preprocess: Preprocess, drop_last: bool, order: Tensor, start: int,
                      shard: Shard | None, aug_seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of training batches in ``order`` from batch ``start``."""
        return train_batches(data, batch_size, generator, preprocess, drop_last, order=order,
                             start=start, shard=shard, aug_seed=aug_seed)

    def eval_batches(self, data: Any, batch_size: int, preprocess: Preprocess,
                     shard: Shard | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """A set in its order, without augmentation (under DDP this rank's slice)."""
        return eval_batches(data, batch_size, preprocess, shard=shard)

    def bn_batches(self, data: Any, batch_size: int, seed: int, iteration: int,
                   preprocess: Preprocess, shard: Shard | None = None) -> Iterator[Any]:
        """The batches of an average's BN pass after ``iteration`` (seeded by the run's seed
        and the iteration, so that the training order is not disturbed)."""
        return bn_pass_batches(data, batch_size, seed, iteration, preprocess, shard=shard)


TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: ``task=name`` builds this task."""
    def add(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered already")
        if cls.spec.name != name:
            raise ValueError(f"task {name!r}: its spec is named {cls.spec.name!r}")
        TASKS[name] = cls
        return cls
    return add


def build_task(name: str) -> Task:
    """The registered task ``name``; a one-line error naming the choices otherwise."""
    if name not in TASKS:
        raise UserError(f"task={name}: unknown task; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]()
