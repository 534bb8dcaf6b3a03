"""SWA: the equal average of the weights at the averaging points (Izmailov et al., 2018)."""

from __future__ import annotations

from torch import nn

from swa_research.averaging.base import WeightAverage


class SWA(WeightAverage):
    method = "swa"

    def __init__(self, model: nn.Module, *, bn_update: bool = True) -> None:
        super().__init__(model, None, bn_update=bn_update)  # None: the equal average
