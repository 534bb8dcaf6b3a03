"""A second task in one file: regression of a number from each image (its class index scaled to
[0, 1], a quantity the synthetic images carry), with the squared error as the loss and the mean
absolute error as the headline metric.
tests/test_tasks.py registers it with one line (importing this file) and trains it through the
whole framework."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from swa_research.data import DataSplits, ImageSet
from swa_research.tasks import Task, TaskMetrics, register_task


def target_of(labels: Tensor, num_classes: int) -> Tensor:
    return labels.float() / max(1, num_classes - 1)


@register_task("regression")
class Regression(Task):
    spec = TaskMetrics("regression", ("loss", "mae"), headline="mae")

    def output_size(self, data: DataSplits) -> int:
        return 1

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output.float().squeeze(-1), target)

    def metric_sums(self, output: Tensor, target: Tensor) -> list[Tensor]:
        return [(output.float().squeeze(-1) - target).abs().sum()]

    def build_data(self, config: object, device: torch.device, num_workers: int = 0,
                   memory_format: torch.memory_format = torch.contiguous_format) -> DataSplits:
        splits = super().build_data(config, device, num_workers, memory_format)

        n = splits.num_classes

        def relabel(s: ImageSet | None) -> ImageSet | None:
            return None if s is None else ImageSet(s.images, target_of(s.labels, n))

        return DataSplits(relabel(splits.train), relabel(splits.val), relabel(splits.test),
                          ["target"])
