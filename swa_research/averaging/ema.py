"""EMA: an exponential moving average of the weights at the averaging points, decay
``swa.decay`` (w <- decay * w + (1 - decay) * w_model; the first point is copied).

With ``swa.ema_warmup`` the decay is warmed up as timm's ``ModelEmaV3`` does it
(``timm/utils/model_ema.py``, ``get_decay`` with ``use_warmup=True``, warmup_gamma 1, warmup_power
2/3, min_decay 0): the update that mixes in a point when n points are already averaged uses
decay_n = min(decay, 1 - (1 + n) ** (-2/3)) (n >= 1; the first point is copied, timm's decay 0 at
its first step). The same function mixes snapshots post hoc (:mod:`swa_research.analysis.posthoc`),
so both give the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from swa_research.averaging.base import WeightAverage

log = logging.getLogger(__name__)


def warmup_decay(decay: float, n: int) -> float:
    """The decay of the update that mixes a point into an average of ``n`` points."""
    return max(0.0, min(decay, 1.0 - (1.0 + n) ** (-2.0 / 3.0)))


def first_point_weight(decay: float, warmup: bool, updates: int) -> float:
    """The weight an EMA of ``updates`` points still gives its first point at the end: the
    first is copied, then each later update multiplies the old weights by its decay."""
    weight = 1.0
    for n in range(1, updates):
        weight *= warmup_decay(decay, n) if warmup else decay
    return weight


def warn_stale_ema(key: str, decay: float, warmup: bool, updates: int) -> None:
    """Said once per EMA (``key``: its decay's key, ``swa.decay`` or a named average's): an
    EMA whose decay does not fit its number of updates still weighs its first point more than
    a half at the end (decay 0.99 over 50 updates: 0.61), so what the run reports as its EMA is
    mostly a stale early model."""
    if updates < 1:
        return
    weight = first_point_weight(decay, warmup, updates)
    if weight > 0.5:
        fit = 1 - 1 / max(2, updates // 5)
        log.warning("%s=%g over this run's %d EMA updates: the first point still weighs %.2f at "
                    "the end, so the EMA is mostly that early model; lower the decay (e.g. "
                    "%.2f averages about the last fifth of the updates) or set ema_warmup",
                    key, decay, updates, weight, fit)


def ema_multi_avg_fn(decay: float, warmup: bool = False
                     ) -> Callable[[list[Tensor], list[Tensor], Any], None]:
    """The multi-tensor EMA update (upstream's ``get_ema_multi_avg_fn`` without warmup); with
    ``warmup`` its decay follows :func:`warmup_decay` of the number of points averaged."""
    if not warmup:
        return get_ema_multi_avg_fn(decay)
    return decayed_multi_avg_fn(lambda n: warmup_decay(decay, n))


def decayed_multi_avg_fn(decay_of: Callable[[int], float]
                         ) -> Callable[[list[Tensor], list[Tensor], Any], None]:
    """The multi-tensor update avg <- d * avg + (1 - d) * cur whose decay d is
    ``decay_of(n)`` for an average of n points (a warmed-up EMA's, a power EMA's)."""

    @torch.no_grad()
    def update(avg: list[Tensor], cur: list[Tensor], n_averaged: Any) -> None:
        d = decay_of(int(n_averaged))
        if torch.is_floating_point(avg[0]):
            torch._foreach_lerp_(avg, cur, 1.0 - d)
        else:
            for a, c in zip(avg, cur, strict=True):
                a.copy_(a * d + c * (1.0 - d))

    return update


class EMA(WeightAverage):
    method = "ema"

    @staticmethod
    def check(*, decay: float = 0.999, ema_buffers: str = "recompute", **_: Any) -> None:
        """The options' one-line ValueError, in the arguments' names."""
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) \
                or not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay}: must be in (0, 1)")
        if ema_buffers not in ("recompute", "average"):
            raise ValueError(f"ema_buffers={ema_buffers}: expected recompute or average")

    def __init__(self, model: nn.Module, *, decay: float = 0.999, ema_warmup: bool = False,
                 ema_buffers: str = "recompute", bn_update: bool = True) -> None:
        """``decay`` per update (timm's warm-up with ``ema_warmup``); ``ema_buffers``:
        ``recompute`` (BN statistics copied, recomputed before evaluation when ``bn_update``)
        or ``average`` (mixed like the weights, timm's ``ModelEmaV3``)."""
        self.check(decay=decay, ema_buffers=ema_buffers)
        self.decay, self.warmup = float(decay), bool(ema_warmup)
        self.buffers = ema_buffers
        super().__init__(model, ema_multi_avg_fn(decay, ema_warmup),
                         bn_update=bn_update, average_buffers=ema_buffers == "average")

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"decay": self.decay, "ema_warmup": self.warmup}
        if self.buffers == "average":
            out["ema_buffers"] = "average"
        return out

    def state_settings(self) -> dict[str, Any]:
        return self.settings()
