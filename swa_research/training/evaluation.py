"""Evaluation of a model or an average on a data set: mean loss and accuracy
(:func:`evaluate`), and calibration: negative log-likelihood, expected calibration error (ECE)
and the reliability diagram, for the SGD model and each average at the end of a run.

ECE (Guo et al., 2017): the top-class confidences are put into equal-width bins over [0, 1]
(bin i holds (i/B, (i+1)/B]); ECE = sum over bins of |accuracy - mean confidence| weighted by
the fraction of samples in the bin. The functions on tensors are pure; :func:`collect_logits`
and :func:`calibrate_run` run models over an :class:`~swa_research.data.ImageSet`.

What is evaluated is a network (``nn.Module``) or an average
(:class:`~swa_research.averaging.Average`: its ``predict``, in its module's eval mode). An
average that predicts whole sets itself (``Average.collect_probs``, e.g. SWAG's Bayesian model
average) gives class probabilities: they are scored with log(probabilities) as the logits
(:func:`logits_from_probs`, :func:`evaluate_probs`), so that the cross-entropy is the NLL of the
averaged prediction and softmax gives the probabilities back for accuracy and ECE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swa_research.averaging import Average, predict
from swa_research.averaging.library import network_of
from swa_research.averaging.metrics import (  # noqa: F401 - the pure functions, re-exported
    N_BINS,
    ReliabilityBins,
    calibration_summary,
    confidence_and_correct,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from swa_research.data import ImageSet, Preprocess, eval_batches
from swa_research.distributed import all_reduce_sum_, world

log = logging.getLogger(__name__)

RELIABILITY_FILE = "reliability.png"

Evaluated = nn.Module | Average


@dataclass
class EvalResult:
    loss: float | None = None
    acc: float | None = None


@torch.inference_mode()
def evaluate(model: Evaluated, data: ImageSet | None, preprocess: Preprocess,
             batch_size: int) -> EvalResult:
    """Mean cross-entropy and accuracy over the whole set, in eval mode (restored after).
    Sums stay on the device: one host read at the end. Under DDP each rank evaluates its slice
    of the set and the sums are added over the ranks: every rank gets the whole set's result."""
    if data is None or len(data) == 0:
        return EvalResult()
    module, forward = network_of(model)
    was_training = module.training
    module.eval()
    n = len(data)
    w = world()
    sums = torch.zeros(2, device=preprocess.device, dtype=torch.float64)  # loss, correct
    try:
        for x, y in eval_batches(data, batch_size, preprocess,
                                 shard=(w.rank, w.size) if w.distributed else None):
            logits = forward(x).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
    finally:
        module.train(was_training)
    all_reduce_sum_([sums])
    loss_sum, correct = sums.tolist()
    return EvalResult(loss=loss_sum / n, acc=round(correct) / n)


def logits_from_probs(probs: Tensor) -> Tensor:
    """log(probabilities) in float64 (a probability of 0 becomes the smallest positive
    double's log rather than -inf): softmax of it gives the probabilities back."""
    return probs.double().clamp_min(torch.finfo(torch.float64).tiny).log()


def evaluate_probs(probs: Tensor | None, data: ImageSet | None) -> EvalResult:
    """Mean negative log-likelihood and accuracy of predicted class probabilities [N, C] of
    ``data`` (in its order): :func:`evaluate` for an average that predicts whole sets."""
    if probs is None or data is None or len(data) == 0:
        return EvalResult()
    logits = logits_from_probs(probs)
    labels = data.labels.to(logits.device)
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(data)
    acc = (logits.argmax(1) == labels).sum().item() / len(data)
    return EvalResult(loss=loss, acc=acc)


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
    that predicts whole sets: :func:`logits_from_probs` of its probabilities). ``plot``: write
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
