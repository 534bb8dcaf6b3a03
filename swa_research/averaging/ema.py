"""EMA: an exponential moving average of the weights at the averaging points, decay
``swa.decay`` (w <- decay * w + (1 - decay) * w_model; the first point is copied)."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from swa_research.averaging.base import WeightAverage
from swa_research.config import SwaConfig, UserError


class EMA(WeightAverage):
    method = "ema"

    @staticmethod
    def check(cfg: SwaConfig) -> None:
        if not 0.0 < cfg.decay < 1.0:
            raise UserError(f"swa.decay={cfg.decay}: must be in (0, 1)")

    def __init__(self, model: nn.Module, cfg: SwaConfig) -> None:
        self.check(cfg)
        super().__init__(model, get_ema_multi_avg_fn(cfg.decay), bn_update=cfg.bn_update)
