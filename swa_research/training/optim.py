"""Optimizers from config, and the learning rate as a pure function of the iteration."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from swa_research.config import OptimizerConfig, ScheduleConfig


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    params = list(params)
    # The fused kernels: one pass over each tensor (about 3x faster than the per-tensor loop
    # on a CPU), and with fp16's GradScaler no host read of its inf check.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                 for p in params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                               fused=fused)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                 fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}: expected sgd, adam or adamw")


@dataclass(frozen=True)
class LRSchedule:
    """lr(i) for the 0-based iteration i (the i-th optimizer step uses lr(i)).

    constant: ``lr`` until the averaging start, ``swa_lr`` from it on (torchcontrib's SWA, the
      seed's schedule). Without averaging, ``lr`` throughout.
    decay_then_constant: the SWA paper's code (timgaripov/swa train.py) with t = epoch / horizon:
      ``lr`` while t <= decay_start, linear to ``swa_lr`` by t = decay_end, then constant. The
      horizon is the averaging start, or the whole budget (final ratio ``final_ratio``) when
      averaging is off. ``per_epoch`` uses the integer epoch as the paper does; otherwise the
      fractional epoch i / iters_per_epoch.
    cyclical: from the averaging start (iteration 0 without averaging), cycles of ``cycle``
      iterations, each linear from ``lr`` down to ``swa_lr``; ``lr`` before the start.
    """

    name: str
    lr: float
    swa_lr: float
    iters_per_epoch: int
    total_iters: int
    start_iter: int | None  # first iteration of the averaging phase; None when averaging is off
    decay_start: float = 0.5
    decay_end: float = 0.9
    final_ratio: float = 0.01
    per_epoch: bool = True
    cycle: int = 1
    # constant: the first iteration at swa_lr (AveragingPlan.lr_switch_iter); None: start_iter.
    switch_iter: int | None = None

    def __call__(self, i: int) -> float:
        if self.name == "constant":
            switch = self.start_iter if self.switch_iter is None else self.switch_iter
            if self.start_iter is not None and i >= switch:
                return self.swa_lr
            return self.lr
        if self.name == "decay_then_constant":
            return self._decay_then_constant(i)
        if self.name == "cyclical":
            origin = self.start_iter if self.start_iter is not None else 0
            if i < origin:
                return self.lr
            t = ((i - origin) % self.cycle + 1) / self.cycle
            return (1.0 - t) * self.lr + t * self.swa_lr
        raise ValueError(f"unknown schedule {self.name!r}")

    def _decay_then_constant(self, i: int) -> float:
        epoch = i // self.iters_per_epoch if self.per_epoch else i / self.iters_per_epoch
        if self.start_iter is not None:
            horizon = self.start_iter / self.iters_per_epoch
            ratio = self.swa_lr / self.lr
        else:
            horizon = self.total_iters / self.iters_per_epoch
            ratio = self.final_ratio
        t = epoch / horizon if horizon > 0 else math.inf
        if t <= self.decay_start:
            factor = 1.0
        elif t <= self.decay_end:
            span = self.decay_end - self.decay_start
            factor = 1.0 - (1.0 - ratio) * (t - self.decay_start) / span
        else:
            factor = ratio
        return self.lr * factor

    def multiplier(self, i: int) -> float:
        """For torch.optim.lr_scheduler.LambdaLR, whose base lr is ``self.lr``."""
        return self(i) / self.lr


def build_schedule(cfg: ScheduleConfig, lr: float, swa_lr: float, iters_per_epoch: int,
                   total_iters: int, start_iter: int | None,
                   switch_iter: int | None = None) -> LRSchedule:
    return LRSchedule(switch_iter=switch_iter,
        name=cfg.name, lr=lr, swa_lr=swa_lr, iters_per_epoch=iters_per_epoch,
        total_iters=total_iters, start_iter=start_iter, decay_start=cfg.decay_start,
        decay_end=cfg.decay_end, final_ratio=cfg.final_ratio,
        per_epoch=cfg.step_unit == "epoch", cycle=cfg.cycle)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration; its state_dict holds the position."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.multiplier)
