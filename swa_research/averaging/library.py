"""The averaging core for any training loop: build an average by method name, plan when it is
updated, recompute its BN statistics over your own batches, score it, and average saved
snapshots after training. No Hydra, no W&B, no data sets: plain PyTorch objects in, plain
PyTorch objects out. The project's trainer uses the same classes (``Average``,
``AveragingPlan``, ``bn_update``), so a plain loop and the trainer give the same averages.

    model = MyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = make_average("swa", model)
    plan = make_plan(start=0.75, freq=1, unit="epoch", epochs=20, iters_per_epoch=len(loader))
    for epoch in range(1, 21):
        for x, y in loader:
            ...  # your step
        if plan.due_after_epoch(epoch):
            avg.update(model)
    update_bn(avg, loader)                    # BN statistics of the averaged weights
    logits, labels = predict(avg, test_loader)
    print(classification_metrics(logits, labels))   # loss, acc, nll, ece

See docs/library.md for the whole surface and its stability promise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import Average, HostCountAveragedModel, bn_update, first_item
from swa_research.averaging.ema import ema_multi_avg_fn
from swa_research.averaging.plan import AveragingPlan
from swa_research.averaging.swag import SWAG
from swa_research.config import ScheduleConfig, SwaConfig, validate_swa

__all__ = ["average_states", "make_average", "make_plan", "predict", "snapshot", "swag_bma",
           "update_bn"]

Module = nn.Module | Average


def make_average(method: str, model: nn.Module, *, bn_update: bool = True,
                 decay: float = 0.999, ema_warmup: bool = False, max_models: int = 20,
                 scale: float | None = None, samples: int = 30, device: str = "auto",
                 lawa_k: int = 5) -> Average:
    """An average of ``model``'s weights by method name: ``swa`` (equal), ``ema`` (``decay``,
    timm's warm-up with ``ema_warmup``), ``swag`` / ``swag_diag`` (Gaussian posteriors:
    ``max_models`` deviations, sample variance ``scale``, default 0.5 for SWAG and 1.0 for
    SWAG-Diagonal, ``samples`` networks per Bayesian model average, moments on ``device``),
    ``lawa`` (the mean of the latest ``lawa_k`` points), or any method registered with
    :func:`~swa_research.averaging.register_method`.
    ``bn_update``: recompute BN statistics before the average is evaluated. A copy of
    ``model`` is taken now; call ``update(model)`` at each averaging point."""
    from swa_research.averaging import METHODS, check_methods

    options: dict[str, Any] = dict(method=method, bn_update=bn_update, decay=decay,
                                   ema_warmup=ema_warmup, max_models=max_models,
                                   samples=samples, swag_device=device, lawa_k=lawa_k)
    if scale is not None:
        options["swag_diag_scale" if method == "swag_diag" else "swag_scale"] = scale
    cfg = SwaConfig(**options)
    check_methods(cfg)
    validate_swa(cfg)
    return METHODS[method](model, cfg)


def make_plan(*, start: float, freq: int, epochs: int, iters_per_epoch: int,
              unit: str = "iter", cycle: int | None = None) -> AveragingPlan:
    """When to update an average: with ``unit="iter"`` after the steps n > start with
    n % freq == 0; with ``unit="epoch"`` after the epochs E >= start with (E - start) % freq
    == 0 (epochs counted from 1); with ``cycle`` (iterations) at the end of every cycle after
    the start. A ``start`` below 1.0 is a fraction of the budget (``epochs`` x
    ``iters_per_epoch`` iterations, or ``epochs``). Ask the plan ``due_after_iter(n)`` /
    ``due_after_epoch(e)``; ``count_updates()`` and ``update_points()`` describe it."""
    if unit not in ("iter", "epoch"):
        raise ValueError(f"unit={unit!r}: expected 'iter' or 'epoch'")
    if freq < 1 or epochs < 1 or iters_per_epoch < 1 or not start >= 0:
        raise ValueError("freq, epochs and iters_per_epoch must be >= 1 and start >= 0")
    swa = SwaConfig(method="swa", start=start, freq=freq, unit=unit)
    schedule = ScheduleConfig(name="cyclical" if cycle else "constant", cycle=cycle or 1)
    return AveragingPlan.from_config(swa, schedule, epochs, iters_per_epoch)


def network_of(model: Module) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """The module whose train/eval mode is set, and the function that gives logits, of a
    network or an average (an average predicts through its ``predict``)."""
    if isinstance(model, Average):
        return model.module, model.predict
    return model, model


def update_bn(model: Module, batches: Iterable[Any],
              input_fn: Callable[[Any], Tensor] = first_item) -> None:
    """Recompute the BN statistics of a network or an average over one pass of ``batches``
    (any batch structure: ``input_fn`` gives the model input, by default the first item of a
    tuple or the batch itself), each batch weighted by its size, as the SWA paper's code."""
    module, _ = network_of(model)
    bn_update(batches, module, input_fn)


@torch.no_grad()
def predict(model: Module, batches: Iterable[Any], input_fn: Callable[[Any], Tensor] = first_item,
            label_fn: Callable[[Any], Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits (float32, CPU) of a network or an average over ``batches`` in eval mode (its
    mode restored after), and the labels when the batches carry them (``label_fn``, default:
    the second item of a tuple)."""
    module, forward = network_of(model)
    was_training = module.training
    module.eval()
    outs: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for batch in batches:
            outs.append(forward(input_fn(batch)).float().cpu())
            if label_fn is not None:
                labels.append(label_fn(batch).cpu())
            elif isinstance(batch, (tuple, list)) and len(batch) > 1:
                labels.append(batch[1].cpu())
    finally:
        module.train(was_training)
    if not outs:  # an empty set
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def swag_bma(average: SWAG, batches: Callable[[], Iterable[Any]],
             bn_batches: Callable[[], Iterable[Any]] | None = None, seed: int = 0,
             input_fn: Callable[[Any], Tensor] = first_item) -> Tensor:
    """SWAG's Bayesian model average: class probabilities [N, C] (float64) over ``batches()``
    (a function giving a fresh pass in a fixed order), the mean over ``average.samples``
    sampled networks, each with BN statistics recomputed over ``bn_batches()``. Score it with
    ``classification_metrics(probs.log(), labels)``."""
    if not isinstance(average, SWAG):
        raise TypeError(f"swag_bma needs a swag or swag_diag average, got {average.method!r}")
    inputs = {"set": lambda: (input_fn(b) for b in batches())}
    bn = None if bn_batches is None else (lambda: (input_fn(b) for b in bn_batches()))
    return average.bma(inputs, bn, seed)["set"]


def snapshot(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A CPU copy of the model's state dict for post-hoc averaging: floating tensors in
    ``dtype`` (bfloat16 halves the size; averages of bf16 snapshots then approximate the
    online ones), integer buffers as they are."""
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
            .clone() for k, v in model.state_dict().items()}


def average_states(model: nn.Module, states: Iterable[dict[str, Tensor]], kind: str = "swa",
                   decay: float = 0.999, warmup: bool = False) -> nn.Module:
    """A network of ``model``'s architecture holding the average of ``states`` (snapshots, in
    order): ``swa`` the equal average, ``ema`` the exponential moving average (the first copied,
    then avg <- d avg + (1 - d) w; ``warmup``: timm's warm-up). The arithmetic is the online
    averages', so snapshots taken at the online points give the online average. BN statistics
    are the last snapshot's: recompute them with :func:`update_bn`. ``model`` is not changed."""
    if kind not in ("swa", "ema"):
        raise ValueError(f"kind={kind!r}: expected 'swa' or 'ema' (LAWA: the 'swa' of the last "
                         "k states)")
    work = copy.deepcopy(model)
    averaged = HostCountAveragedModel(work, ema_multi_avg_fn(decay, warmup)
                                      if kind == "ema" else None)
    for state in states:
        work.load_state_dict(state)
        averaged.update_parameters(work)
    if averaged.count == 0:
        raise ValueError("no states to average")
    return averaged.module
