"""Image classification: cross-entropy, accuracy, class probabilities (SWAG's model average,
calibration)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swa_research.data import DataSplits
from swa_research.errors import UserError
from swa_research.models import model_task
from swa_research.tasks.base import CLASSIFICATION, Task, register_task


@register_task("classification")
class Classification(Task):
    spec = CLASSIFICATION
    probabilistic = True

    def check(self, config: Any) -> None:
        if config.data.name == "text":
            raise UserError("data=text is for language models: set task=lm (and model=gpt)")
        if model_task(config.model) == "lm":
            raise UserError(f"model={config.model.get('name')} is a language model: set "
                            "task=lm data=text")

    def output_size(self, data: DataSplits) -> int:
        return data.num_classes

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.float(), target)

    def metric_sums(self, output: Tensor, target: Tensor) -> list[Tensor]:
        return [(output.argmax(1) == target).sum()]

    def eval_sums(self, output: Tensor, target: Tensor) -> Tensor:
        if output.dtype != torch.float64:
            output = output.float()
        return torch.stack([F.cross_entropy(output, target, reduction="sum").double(),
                            (output.argmax(1) == target).sum().double()])

    def probs_sums(self, probs: Tensor, target: Tensor) -> Tensor:
        """The NLL of the predicted distribution and the correct count."""
        logits = log_probs(probs)
        return self.eval_sums(logits, target.to(logits.device))


def log_probs(probs: Tensor) -> Tensor:
    """log(probabilities) in float64 (a probability of 0 becomes the smallest positive double's
    log rather than -inf): softmax of it gives the probabilities back."""
    return probs.double().clamp_min(torch.finfo(torch.float64).tiny).log()
