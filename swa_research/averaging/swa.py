"""SWA: the equal average of the weights at the averaging points (Izmailov et al., 2018)."""

from __future__ import annotations

from torch import nn

from swa_research.averaging.base import WeightAverage
from swa_research.config import SwaConfig


class SWA(WeightAverage):
    method = "swa"

    def __init__(self, model: nn.Module, cfg: SwaConfig) -> None:
        super().__init__(model, None, bn_update=cfg.bn_update)  # None: the equal average
