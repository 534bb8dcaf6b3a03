"""Calibration: ECE against hand computations and a perfectly calibrated toy predictor, NLL
against cross-entropy, and the "calibration" key every run writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config

from swa_research.tracking.loggers import summary_values
from swa_research.training.build import train
from swa_research.training.evaluation import (
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def logits_for(confidence: torch.Tensor, predicted: torch.Tensor, num_classes: int
               ) -> torch.Tensor:
    """Logits whose softmax gives ``confidence`` to ``predicted`` and spreads the rest evenly
    (so the top class is ``predicted`` whenever confidence > 1 / num_classes)."""
    rest = ((1 - confidence) / (num_classes - 1)).log()
    logits = rest[:, None].repeat(1, num_classes)
    logits[torch.arange(len(confidence)), predicted] = confidence.log()
    return logits


def labelled(confidence: torch.Tensor, correct: torch.Tensor, num_classes: int = 10,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels: the label is the predicted class exactly where ``correct``."""
    g = torch.Generator().manual_seed(seed)
    n = len(confidence)
    predicted = torch.randint(0, num_classes, (n,), generator=g)
    wrong = (predicted + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    labels = torch.where(correct, predicted, wrong)
    return logits_for(confidence.double(), predicted, num_classes), labels


def test_perfectly_calibrated_predictor_has_ece_near_zero() -> None:
    g = torch.Generator().manual_seed(1)
    n = 200_000
    confidence = 0.15 + 0.849 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < confidence
    logits, labels = labelled(confidence, correct)
    ece = expected_calibration_error(logits, labels)
    # Sampling noise alone: about sqrt(p(1-p)/n_bin) per bin, a few 1e-3 in all.
    assert ece < 0.006
    # The same predictor with every confidence pushed towards 1 is overconfident.
    sharp = logits_for(confidence.sqrt(), logits.argmax(1), 10)
    assert expected_calibration_error(sharp, labels) > 0.1


def test_miscalibrated_predictor_matches_hand_computation() -> None:
    # Bin (13/15, 14/15] holds confidences 0.88 (500, half right) and 0.92 (500, all right):
    # mean confidence 0.90, accuracy 0.75, gap 0.15 on 1000 samples. Confidence 0.55 with
    # 80% right (bin (8/15, 9/15]): gap 0.25 on 1000. Confidence 0.3 with 30% right: no gap.
    groups = [(0.88, 500, 250), (0.92, 500, 500), (0.55, 1000, 800), (0.30, 2000, 600)]
    conf = torch.cat([torch.full((n,), c, dtype=torch.float64) for c, n, _ in groups])
    correct = torch.cat([torch.arange(n) < k for _, n, k in groups])
    expected = (1000 * 0.15 + 1000 * 0.25 + 2000 * 0.0) / 4000
    assert reliability_bins(conf, correct).ece == pytest.approx(expected, abs=1e-12)
    logits, labels = labelled(conf, correct)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-9)
    # Per-sample gaps are not what ECE averages: that would give a different number.
    assert abs((conf - correct.double()).abs().mean().item() - expected) > 0.1


def test_bins_are_equal_width_and_right_closed() -> None:
    conf = torch.tensor([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0], dtype=torch.float64)
    bins = reliability_bins(conf, torch.ones(5, dtype=torch.bool))
    assert len(bins.counts) == 15 and bins.edges[1].item() == pytest.approx(1 / 15)
    assert bins.counts[0] == 2 and bins.counts[1] == 1 and bins.counts[7] == 1
    assert bins.counts[14] == 1 and int(bins.counts.sum()) == 5
    assert math.isnan(bins.accuracy[3].item())  # empty bins have no accuracy
    assert reliability_bins(torch.tensor([0.95]), torch.tensor([False]), n_bins=1).ece == \
        pytest.approx(0.95)
    with pytest.raises(ValueError):
        reliability_bins(torch.tensor([1.5]), torch.tensor([True]))


def test_nll_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(500, 7, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)
    expected = F.cross_entropy(logits.double(), labels).item()
    assert negative_log_likelihood(logits, labels) == pytest.approx(expected, rel=1e-12)
    manual = -torch.log_softmax(logits.double(), 1)[torch.arange(500), labels].mean().item()
    assert negative_log_likelihood(logits, labels) == pytest.approx(manual, rel=1e-12)


@pytest.mark.parametrize("averaging", ["swa", "none"])
def test_every_run_writes_its_calibration(tmp_path: Path, averaging: str) -> None:
    metrics = train(compose_config(["experiment=smoke", *TINY, f"swa={averaging}"]), tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["calibration"] == metrics["calibration"]
    cal = metrics["calibration"]
    # The NLL on the test set is the trainer's test loss, computed separately.
    assert cal["sgd"]["nll"] == pytest.approx(metrics["sgd"]["test_loss"], abs=1e-6)
    assert 0.0 <= cal["sgd"]["ece"] <= 1.0
    if averaging == "none":
        assert cal["swa"] is None
    else:
        assert cal["swa"]["nll"] == pytest.approx(metrics["swa"]["test_loss"], abs=1e-6)
        assert 0.0 <= cal["swa"]["ece"] <= 1.0
    assert (tmp_path / "reliability.png").read_bytes().startswith(PNG_MAGIC)
    summary = summary_values(metrics)
    assert summary["calibration/sgd_ece"] == cal["sgd"]["ece"]
    assert summary["calibration/swa_nll"] == (None if averaging == "none"
                                              else cal["swa"]["nll"])
