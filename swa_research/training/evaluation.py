"""Evaluation of a model or an average on a data set: the task's metrics (:func:`evaluate`;
classification: mean loss and accuracy), and for tasks that predict class probabilities the
calibration: negative log-likelihood, expected calibration error (ECE) and the reliability
diagram, for the SGD model and each average at the end of a run.

ECE (Guo et al., 2017): the top-class confidences are put into equal-width bins over [0, 1]
(bin i holds (i/B, (i+1)/B]); ECE = sum over bins of |accuracy - mean confidence| weighted by
the fraction of samples in the bin. The functions on tensors are pure; :func:`collect_logits`
and :func:`calibrate_run` run models over an :class:`~swa_research.data.ImageSet`.

What is evaluated is a network (``nn.Module``) or an average
(:class:`~swa_research.averaging.Average`: its ``predict``, in its module's eval mode). An
average that predicts whole sets itself (``Average.collect_probs``, e.g. SWAG's Bayesian model
average) gives class probabilities: they are scored with log(probabilities) as the logits
(:func:`~swa_research.tasks.classification.log_probs`, :func:`evaluate_probs`), so that the
cross-entropy is the NLL of the averaged prediction and softmax gives the probabilities back
for accuracy and ECE.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging import Average, predict
from swa_research.averaging.library import as_network
from swa_research.averaging.metrics import (  # noqa: F401 - the pure functions, re-exported
    N_BINS,
    ReliabilityBins,
    calibration_summary,
    confidence_and_correct,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from swa_research.averaging.sharded import is_sharded
from swa_research.data import ImageSet, Preprocess, eval_batches
from swa_research.distributed import all_reduce_sum_, world
from swa_research.tasks import Task, build_task

log = logging.getLogger(__name__)

RELIABILITY_FILE = "reliability.png"

Evaluated = nn.Module | Average
Scores = dict[str, float | None]  # by the task's metric names; None: nothing to evaluate


def _task(task: Task | None) -> Task:
    return task if task is not None else build_task("classification")


@torch.inference_mode()
def evaluate(model: Evaluated, data: Any, preprocess: Preprocess, batch_size: int,
             task: Task | None = None) -> Scores:
    """The task's metrics (loss first; classification: loss and accuracy) over the whole set,
    in eval mode (restored after). Sums stay on the device: one host read at the end. Under DDP
    and FSDP each rank evaluates its slice of the set and the sums are added over the ranks:
    every rank gets the whole set's result."""
    task = _task(task)
    if data is None or len(data) == 0:
        return dict.fromkeys(task.spec.metrics)
    w = world()
    sums = torch.zeros(len(task.spec.metrics), device=preprocess.device, dtype=torch.float64)
    count = 0
    with as_network(model) as (module, forward):
        sharded = is_sharded(module)
        # Each rank evaluates its contiguous slice. Under FSDP each forward is a collective,
        # so every rank runs as many: the most any slice needs (slices differ by at most one
        # item), the short ones repeating a batch whose outputs are not counted; a set smaller
        # than the ranks is run whole on every rank instead.
        split = w.distributed and (not sharded or len(data) >= w.size)
        was_training = module.training
        module.eval()
        try:
            done, last = 0, None
            for x, y in task.eval_batches(data, batch_size, preprocess,
                                          shard=(w.rank, w.size) if split else None):
                sums += task.eval_sums(forward(x), y)
                count += task.count(y)
                done, last = done + 1, x
            if split and sharded:
                per = (len(data) + w.size - 1) // w.size  # the largest slice: ceil(n / N)
                most = (per + batch_size - 1) // batch_size
                for _ in range(most - done):
                    forward(last)
        finally:
            module.train(was_training)
    total = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64,
                                          device=sums.device)])
    if split:
        all_reduce_sum_([total])
    *values, n = total.tolist()
    return task.summarize(values, n)


def evaluate_probs(probs: Tensor | None, data: Any, task: Task | None = None) -> Scores:
    """The task's metrics of predicted class probabilities [N, C] of ``data`` (in its order;
    the loss is the negative log-likelihood): :func:`evaluate` for an average that predicts
    whole sets."""
    task = _task(task)
    if probs is None or data is None or len(data) == 0:
        return dict.fromkeys(task.spec.metrics)
    sums = task.probs_sums(probs, data.labels)
    return task.summarize(sums.tolist(), task.count(data.labels))


@torch.inference_mode()
def collect_logits(model: Evaluated, data: ImageSet, preprocess: Preprocess,
                   batch_size: int) -> tuple[Tensor, Tensor]:
    """Logits (float32, on the CPU) and labels of the whole set, in eval mode; the model's
    mode is restored afterwards (the library's :func:`~swa_research.averaging.predict`)."""
    logits, labels = predict(model, eval_batches(data, batch_size, preprocess))
    assert labels is not None
    return logits, labels


def calibrate_run(models: dict[str, Evaluated | tuple[Tensor, Tensor] | None], test: ImageSet,
                  preprocess: Preprocess, batch_size: int, run_dir: str | Path,
                  n_bins: int = N_BINS, plot: bool = True) -> dict[str, Any]:
    """NLL and ECE of each model by name (``sgd`` and the averages; None where there is nothing
    to evaluate) on the test set, and their reliability diagram in ``run_dir``: the value of
    metrics.json's "calibration" key. Averages must already be prepared for evaluation; an
    entry may instead be the (logits, labels) of the test set already collected (an average
    that predicts whole sets: ``log_probs`` of its probabilities). ``plot``: write
    the diagram (under DDP rank 0 alone does)."""
    from swa_research.tracking.plots import plot_reliability

    result: dict[str, Any] = dict.fromkeys(models)
    bins: dict[str, ReliabilityBins] = {}
    for name, model in models.items():
        if model is None:
            continue
        if isinstance(model, tuple):
            logits, labels = model
        else:
            logits, labels = collect_logits(model, test, preprocess, batch_size)
        result[name], bins[name] = calibration_summary(logits, labels, n_bins)
    if bins and plot:
        try:
            plot_reliability(bins, Path(run_dir) / RELIABILITY_FILE, title=Path(run_dir).name)
        except Exception as e:  # a plot is a convenience: never lose a run over it
            log.warning("could not write %s: %s", RELIABILITY_FILE, e)
    return result
