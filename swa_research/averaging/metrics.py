"""Classification metrics on tensors, with no data or training machinery: loss, accuracy,
negative log-likelihood and expected calibration error (ECE), and the reliability bins behind
ECE. Part of the public averaging API (docs/library.md).

ECE (Guo et al., 2017): the top-class confidences are put into equal-width bins over [0, 1]
(bin i holds (i/B, (i+1)/B]); ECE = sum over bins of |accuracy - mean confidence| weighted by
the fraction of samples in the bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["N_BINS", "ReliabilityBins", "calibration_summary", "classification_metrics",
           "confidence_and_correct", "expected_calibration_error", "language_model_metrics",
           "negative_log_likelihood", "reliability_bins", "task_metrics"]

N_BINS = 15


@dataclass
class ReliabilityBins:
    """Per-bin sample counts, mean confidence and accuracy (NaN in empty bins)."""

    edges: Tensor  # [B + 1]
    counts: Tensor  # [B], int64
    confidence: Tensor  # [B]
    accuracy: Tensor  # [B]

    @property
    def ece(self) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        used = self.counts > 0
        gap = (self.accuracy[used] - self.confidence[used]).abs()
        return float((gap * self.counts[used].double()).sum() / total)


def reliability_bins(confidence: Tensor, correct: Tensor, n_bins: int = N_BINS
                     ) -> ReliabilityBins:
    """Bin top-class confidences in [0, 1] into ``n_bins`` equal-width bins, right-closed:
    a confidence of exactly k / n_bins falls into bin k - 1 (and 0 into the first bin)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError("confidence and correct must be 1-d tensors of the same length")
    conf = confidence.detach().double().cpu()
    hit = correct.detach().double().cpu()
    if conf.numel() and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    index = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, hit)
    denom = counts.double()
    nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
    return ReliabilityBins(
        edges=torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
        counts=counts,
        confidence=torch.where(counts > 0, conf_sum / denom.clamp(min=1), nan),
        accuracy=torch.where(counts > 0, hit_sum / denom.clamp(min=1), nan),
    )


def confidence_and_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(dim=1)
    return conf, pred == labels


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = N_BINS) -> float:
    return reliability_bins(*confidence_and_correct(logits, labels), n_bins).ece


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits): the cross-entropy."""
    return float(F.cross_entropy(logits.double(), labels, reduction="mean"))


def calibration_summary(logits: Tensor, labels: Tensor, n_bins: int = N_BINS
                        ) -> tuple[dict[str, float], ReliabilityBins]:
    bins = reliability_bins(*confidence_and_correct(logits, labels), n_bins)
    return {"nll": negative_log_likelihood(logits, labels), "ece": bins.ece}, bins




def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = N_BINS
                           ) -> dict[str, float]:
    """``loss`` (mean cross-entropy of float32 logits, as training computes it), ``acc``,
    ``nll`` (the same in float64) and ``ece`` of a whole set's logits [N, C] and labels [N]."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    cal, _ = calibration_summary(logits, labels, n_bins)
    return {"loss": float(F.cross_entropy(logits, labels)),
            "acc": float((logits.argmax(1) == labels).double().mean()), **cal}


def language_model_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """``loss`` (the mean cross-entropy per token, float32 as training computes it) and
    ``ppl`` (its exponential) of a whole set's next-token logits [N, T, V] and targets [N, T]
    (targets of -1 are not counted, as ``F.cross_entropy``'s ignore_index=-1 in nanoGPT)."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [N, T, V] and targets [N, T], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
    loss = float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1))
    return {"loss": loss, "ppl": float(torch.tensor(loss, dtype=torch.float64).exp())}


def task_metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """The metrics the outputs' shape says: logits [N, C] with labels [N] are a
    classifier's (:func:`classification_metrics`), logits [N, T, V] with targets [N, T] a
    language model's (:func:`language_model_metrics`); any other shape is a ValueError that
    says to pass a metrics function."""
    if outputs.ndim == 2 and targets.shape == outputs.shape[:1]:
        return classification_metrics(outputs, targets)
    if outputs.ndim == 3 and targets.shape == outputs.shape[:2]:
        return language_model_metrics(outputs, targets)
    raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} are "
                     "neither a classifier's ([N, C], [N]) nor a language model's ([N, T, V], "
                     "[N, T]): pass metrics_fn=your_function(outputs, targets) -> dict")
