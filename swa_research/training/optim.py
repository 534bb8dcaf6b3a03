"""Optimizers from config, and the learning rate as a pure function of the iteration."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swa_research.averaging import bn_update, fge_lr, has_batch_norm
from swa_research.config import OptimizerConfig, ScheduleConfig, UserError

NO_DECAY_KINDS = ("bias", "norm", "embedding")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def decay_groups(model: nn.Module, no_decay: Iterable[str], weight_decay: float
                 ) -> list[dict[str, Any]]:
    """The model's parameters in two groups: with ``weight_decay``, and without it for the
    kinds in ``no_decay`` (``bias``: biases, ``norm``: the weights of normalisation layers,
    ``embedding``: embedding tables, also where a head shares them). Each parameter once, in
    the model's order; an empty group is left out."""
    kinds = set(no_decay)
    unknown = kinds - set(NO_DECAY_KINDS)
    if unknown:
        raise UserError(f"optimizer.no_decay: {sorted(unknown)} are not parameter kinds; "
                        f"expected some of {', '.join(NO_DECAY_KINDS)}")
    exempt: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if ("bias" in kinds and name == "bias") or ("norm" in kinds and isinstance(
                    module, _NORMS)) or ("embedding" in kinds and isinstance(
                    module, nn.Embedding)):
                exempt.add(id(p))
    params = list(model.parameters())  # shared parameters once
    groups = [{"params": [p for p in params if id(p) not in exempt],
               "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module | Iterable[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s parameters (or of the parameters given), with weight decay
    except on the kinds in ``optimizer.no_decay`` (a model is needed for those)."""
    if isinstance(model, nn.Module):
        groups: Any = decay_groups(model, cfg.no_decay, cfg.weight_decay)
        params = [p for g in groups for p in g["params"]]
    else:
        params = groups = list(model)
    # The fused kernels: one pass over each tensor (about 3x faster than the per-tensor loop
    # on a CPU), and with fp16's GradScaler no host read of its inf check.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                 for p in params)
    if cfg.name == "sgd" and any(hasattr(p, "device_mesh") for p in params):
        fused = False  # FSDP's DTensors: torch has no sharding rule for the fused SGD kernel
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                               fused=fused)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                 fused=fused)
    if cfg.name == "adamw_schedulefree":
        try:
            import schedulefree
        except ImportError as e:
            raise UserError("optimizer=adamw_schedulefree needs the schedulefree package: "
                            "pip install 'swa_research[lm]' (or pip install schedulefree)") from e
        # Its warm-up is the project's schedule (warmup_constant): the package's own is off.
        return schedulefree.AdamWScheduleFree(groups, lr=cfg.lr, betas=betas,
                                              weight_decay=cfg.weight_decay, warmup_steps=0,
                                              r=cfg.r, weight_lr_power=cfg.weight_lr_power)
    raise ValueError(f"unknown optimizer {cfg.name!r}: expected sgd, adam, adamw or "
                     "adamw_schedulefree")


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """An optimizer that averages inside its step (Defazio et al. 2024): its parameters hold y,
    where gradients are taken, in train mode, and x, the average one evaluates, in eval mode."""
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0] \
        and callable(getattr(optimizer, "eval", None))


@contextmanager
def averaged_iterate(optimizer: torch.optim.Optimizer, model: nn.Module,
                     bn_batches: Callable[[], Iterable[Any]] | None = None) -> Iterator[None]:
    """Inside: ``model`` holds a schedule-free optimizer's averaged iterate x (what the run
    evaluates, averages, snapshots and saves as its SGD model), with its BN statistics
    recomputed over ``bn_batches()`` when given and the model has BN layers (they were gathered
    at y; the pass's dropout draws from a forked RNG, not training's). After: the parameters
    and buffers training left, bit for bit (not the lerp back, whose rounding would make the
    training run depend on how often it was evaluated). Other optimizers: a no-op."""
    if not is_schedule_free(optimizer) or not optimizer.param_groups[0]["train_mode"]:
        yield
        return
    kept = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    optimizer.eval()  # type: ignore[attr-defined]
    try:
        if bn_batches is not None and has_batch_norm(model):
            device = kept[0].device
            with torch.random.fork_rng(devices=[device.index or 0]
                                       if device.type == "cuda" else []):
                bn_update(bn_batches(), model)
        yield
    finally:
        with torch.no_grad():
            for t, old in zip((*model.parameters(), *model.buffers()), kept, strict=True):
                t.copy_(old)
        for group in optimizer.param_groups:
            group["train_mode"] = True


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

    The schedules of language-model pretraining ignore ``swa_lr`` (the averages are formed
    under the schedule as it is); each starts with ``warmup`` iterations of linear warm-up,
    lr (i + 1) / (warmup + 1), as karpathy/nanoGPT's ``get_lr``, and ``lr_min`` =
    ``final_ratio`` lr:
    warmup_cosine: then nanoGPT's cosine from ``lr`` to ``lr_min`` over the rest of the budget,
      lr_min + (lr - lr_min) (1 + cos(pi r)) / 2 with r = (i - warmup) / (total - warmup).
    warmup_constant: then ``lr`` to the end (averaging at a constant lr, Hagele et al. 2024).
    fge: Fast Geometric Ensembling (Garipov et al. 2018; timgaripov/dnn-mode-connectivity
      fge.py with utils.cyclic_learning_rate): before the averaging start decay_then_constant's
      decay over the whole budget to ``final_ratio`` lr, epochs counted from 1 as the
      reference's train.py (the reference pre-trains with train.py
      over the budget's epochs and starts FGE from its checkpoint at the start, e.g. 160 of 200);
      from it, cycles of ``fge_cycle_iters`` steps with t = ((i - start) mod cycle) / cycle:
      ``fge_lr_high`` (1 - 2t) + ``swa_lr`` 2t for t < 1/2, ``fge_lr_high`` (2t - 1) +
      ``swa_lr`` (2 - 2t) after: down to swa_lr at mid-cycle (where a model is collected) and
      back up.
    wsd: epfml/schedules-and-scaling's ``wsd_schedule`` step for step (:func:`wsd_factor`): a
      warm-up from lr/100, stable at ``lr``, then a cooldown over the last int(``cooldown`` x
      budget) steps towards ``lr_min`` (linear, or ``1-sqrt``: Hagele et al.'s best).
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
    warmup: int = 0
    cooldown: float = 0.2
    cooldown_shape: str = "linear"
    fge_lr_high: float = 0.05
    fge_cycle_iters: int = 0

    def __call__(self, i: int) -> float:
        if self.name == "constant":
            switch = self.start_iter if self.switch_iter is None else self.switch_iter
            if self.start_iter is not None and i >= switch:
                return self.swa_lr
            return self.lr
        if self.name == "decay_then_constant":
            return self._decay_then_constant(i)
        if self.name in ("warmup_cosine", "warmup_constant", "wsd"):
            return self._pretraining(i)
        if self.name == "fge":
            return self._fge(i)
        if self.name == "cyclical":
            origin = self.start_iter if self.start_iter is not None else 0
            if i < origin:
                return self.lr
            t = ((i - origin) % self.cycle + 1) / self.cycle
            return (1.0 - t) * self.lr + t * self.swa_lr
        raise ValueError(f"unknown schedule {self.name!r}")

    def _pretraining(self, i: int) -> float:
        lr_min = self.final_ratio * self.lr
        if self.name == "wsd":
            return self.lr * wsd_factor(i, self.total_iters, self.warmup, self.cooldown,
                                        self.cooldown_shape, self.final_ratio)
        if i < self.warmup:
            return self.lr * (i + 1) / (self.warmup + 1)
        if self.name == "warmup_constant":
            return self.lr
        r = min(1.0, (i - self.warmup) / max(1, self.total_iters - self.warmup))
        return lr_min + 0.5 * (1.0 + math.cos(math.pi * r)) * (self.lr - lr_min)

    def _fge(self, i: int) -> float:
        start = self.start_iter if self.start_iter is not None else self.total_iters
        if i < start:
            # dnn-mode-connectivity's train.py, which FGE starts from, counts epochs from 1.
            return self._decay_then_constant(i, horizon_iter=self.total_iters,
                                             ratio=self.final_ratio, first_epoch=1)
        return fge_lr(i, start=start, cycle=self.fge_cycle_iters, lr_high=self.fge_lr_high,
                      lr_low=self.swa_lr)

    def _decay_then_constant(self, i: int, horizon_iter: int | None = None,
                             ratio: float | None = None, first_epoch: int = 0) -> float:
        # timgaripov/swa's train.py counts epochs from 0; dnn-mode-connectivity's from 1
        # (``first_epoch``; fractional epochs then end each epoch at its number).
        epoch = (i // self.iters_per_epoch + first_epoch if self.per_epoch
                 else (i + first_epoch) / self.iters_per_epoch)
        if horizon_iter is not None and ratio is not None:
            horizon = horizon_iter / self.iters_per_epoch
        elif self.start_iter is not None:
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


def wsd_steps(total: int, cooldown: float) -> tuple[int, int]:
    """The WSD cooldown's length and first step: ``int(cooldown x total)`` steps (truncated),
    ending with the budget, as epfml/schedules-and-scaling's ``wsd_schedule``."""
    length = int(cooldown * total)
    return length, total - length


def wsd_factor(i: int, total: int, warmup: int, cooldown: float, shape: str,
               final: float, init_div: float = 100.0) -> float:
    """The lr factor of step ``i`` (from 0) of epfml/schedules-and-scaling's ``wsd_schedule``
    (src/optim/utils.py): the warm-up rises linearly from 1/``init_div`` (its
    ``init_div_factor``), then 1, then the cooldown over the last ``int(cooldown x total)``
    steps from 1 towards ``final`` with t = (i - hold) / length in [0, 1): 1 - t (linear) or
    1 - sqrt(t) (``1-sqrt``); the last step still trains (t < 1)."""
    length, hold = wsd_steps(total, cooldown)
    if i < warmup:
        return i / warmup + (1 - i / warmup) / init_div
    if i < hold:
        return 1.0
    if i >= total:
        return final
    t = (i - hold) / length
    return final + (1.0 - final) * (1.0 - (math.sqrt(t) if shape == "1-sqrt" else t))


def check_schedule(cfg: ScheduleConfig, total_iters: int, budget: str) -> None:
    """A schedule that cannot happen in the budget is refused (UserError naming the keys):
    a warm-up as long as the run, a WSD cooldown of no step or one that the warm-up reaches.
    ``budget`` says how the run's ``total_iters`` came about (for the message)."""
    if cfg.name not in ("warmup_cosine", "warmup_constant", "wsd"):
        return
    if cfg.warmup >= total_iters:
        raise UserError(f"schedule.warmup={cfg.warmup}: the warm-up is not shorter than the "
                        f"run ({total_iters} iterations: {budget}), so the lr never reaches "
                        "optimizer.lr; lower schedule.warmup or train longer")
    if cfg.name != "wsd":
        return
    length, hold = wsd_steps(total_iters, cfg.cooldown)
    if cfg.cooldown > 0 and length == 0:
        raise UserError(f"schedule.cooldown={cfg.cooldown:g}: {cfg.cooldown:g} of "
                        f"{total_iters} iterations is no step ({budget}); raise it, or set "
                        "schedule.cooldown=0 for no cooldown")
    if cfg.warmup > hold:
        raise UserError(f"schedule.warmup={cfg.warmup} and schedule.cooldown={cfg.cooldown:g}: "
                        f"the warm-up runs into the cooldown, which starts at iteration {hold} "
                        f"of {total_iters} ({budget}); lower either")


def build_schedule(cfg: ScheduleConfig, lr: float, swa_lr: float, iters_per_epoch: int,
                   total_iters: int, start_iter: int | None,
                   switch_iter: int | None = None) -> LRSchedule:
    return LRSchedule(switch_iter=switch_iter,
        name=cfg.name, lr=lr, swa_lr=swa_lr, iters_per_epoch=iters_per_epoch,
        total_iters=total_iters, start_iter=start_iter, decay_start=cfg.decay_start,
        decay_end=cfg.decay_end, final_ratio=cfg.final_ratio,
        per_epoch=cfg.step_unit == "epoch", cycle=cfg.cycle, warmup=cfg.warmup,
        cooldown=cfg.cooldown, cooldown_shape=cfg.cooldown_shape,
        fge_lr_high=cfg.fge_lr_high, fge_cycle_iters=cfg.fge_cycle * iters_per_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration; its state_dict holds the position."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.multiplier)
