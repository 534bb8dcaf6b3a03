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

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import Average, HostCountAveragedModel, bn_update, first_item
from swa_research.averaging.ema import ema_multi_avg_fn
from swa_research.averaging.plan import AveragingPlan
from swa_research.averaging.swag import SWAG

__all__ = ["average_states", "check_average_options", "fge_lr", "make_average", "make_plan",
           "predict", "snapshot", "swag_bma", "update_bn"]

Module = nn.Module | Average


def _whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be a whole number of at least {minimum}")


def make_average(method: str, model: nn.Module, *, bn_update: bool = True,
                 decay: float = 0.999, ema_warmup: bool = False, max_models: int = 20,
                 scale: float | None = None, samples: int = 30, device: str = "auto",
                 lawa_k: int = 5, offload: bool = False, sigma_rel: float = 0.10,
                 ema_buffers: str = "recompute") -> Average:
    """An average of ``model``'s weights by method name: ``swa`` (equal), ``ema`` (``decay``,
    timm's warm-up with ``ema_warmup``), ``swag`` / ``swag_diag`` (Gaussian posteriors:
    ``max_models`` deviations, sample variance ``scale``, default 0.5 for SWAG and 1.0 for
    SWAG-Diagonal, ``samples`` networks per Bayesian model average, moments on ``device``),
    ``lawa`` (the mean of the latest ``lawa_k`` points), ``power_ema`` (EDM2's power-function
    EMA of relative width ``sigma_rel``), ``fge`` (the ensemble of the points'
    predictions, up to ``max_models``), or any method registered with
    :func:`~swa_research.averaging.register_method`.
    ``offload`` (a model sharded with ``fully_shard``; ``swa``, ``ema``, ``lawa``): keep
    the average in pinned host memory, each update's copy made without waiting.
    ``bn_update``: recompute BN statistics before the average is evaluated; an EMA's
    ``ema_buffers="average"`` averages them like the weights instead (timm's ``ModelEmaV3``).
    A copy of ``model`` is taken now; call ``update(model)`` at each averaging point. A bad
    argument is a one-line ValueError naming it."""
    from swa_research.averaging import METHODS, build_average
    from swa_research.averaging.sharded import SHARDED_METHODS, is_sharded

    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    for name, value, minimum in (("max_models", max_models, 2), ("samples", samples, 1),
                                 ("lawa_k", lawa_k, 1)):
        _whole(name, value, minimum)
    for name, value in (("decay", decay), ("scale", scale)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise ValueError(f"{name}={value!r}: must be a number")
    if is_sharded(model) and method not in SHARDED_METHODS:
        raise ValueError(f"method={method!r}: a model sharded with fully_shard is averaged "
                         f"with {', '.join(SHARDED_METHODS)} (not yet {method})")
    return build_average(method, model, bn_update=bn_update, decay=decay,
                         ema_warmup=ema_warmup, max_models=max_models, scale=scale,
                         samples=samples, device=device, lawa_k=lawa_k, offload=offload,
                         sigma_rel=sigma_rel, ema_buffers=ema_buffers)


def check_average_options(method: str, options: dict[str, Any]) -> None:
    """``make_average(method, model, **options)``'s arguments checked without a model: a
    one-line ValueError naming an unknown option or a bad value."""
    known = [p for p in inspect.signature(make_average).parameters
             if p not in ("method", "model")]
    for name in options:
        if name not in known:
            raise ValueError(f"unknown option {name!r}; expected some of {', '.join(known)}")
    make_average(method, nn.Linear(1, 1), **options)


def check_plan(start: float, freq: int, unit: str, cycle: int | None = None,
               collect: str = "end") -> None:
    """:func:`make_plan`'s arguments checked without a budget: a one-line ValueError."""
    if unit not in ("iter", "epoch"):
        raise ValueError(f"unit={unit!r}: expected 'iter' or 'epoch'")
    _whole("freq", freq, 1)
    if isinstance(start, bool) or not isinstance(start, (int, float)) \
            or not 0 <= start < math.inf:
        raise ValueError(f"start={start!r}: must be a number >= 0 (below 1: a fraction of the "
                         "budget; from 1: a whole number of iterations or epochs)")
    if start >= 1 and start != int(start):
        units = "epochs" if unit == "epoch" else "iterations"
        raise ValueError(f"start={start}: from 1 on, start counts {units} and must be whole "
                         "(below 1 it is a fraction of the budget)")
    if collect not in ("end", "middle"):
        raise ValueError(f"collect={collect!r}: expected 'end' (each cycle's end, cyclical SWA) "
                         "or 'middle' (each cycle's low point, FGE)")
    if cycle is not None:
        _whole("cycle", cycle, 2 if collect == "middle" else 1)
        if collect == "middle" and cycle % 2:
            raise ValueError(f"cycle={cycle}: FGE's cycle must be even (a model is collected "
                             "at its middle)")
    elif collect == "middle":
        raise ValueError("collect='middle' needs cycle= (FGE's cycle, in iterations)")


def make_plan(*, start: float, freq: int, epochs: int, iters_per_epoch: int,
              unit: str = "iter", cycle: int | None = None,
              collect: str = "end") -> AveragingPlan:
    """When to update an average: with ``unit="iter"`` after the steps n > start with
    n % freq == 0; with ``unit="epoch"`` after the epochs E >= start with (E - start) % freq
    == 0 (epochs counted from 1); with ``cycle`` (iterations) once a cycle after the start: at
    its end (``collect="end"``, cyclical SWA) or at its middle (``collect="middle"``, FGE's
    low point of :func:`fge_lr`; timgaripov/dnn-mode-connectivity fge.py). A ``start`` below
    1.0 is a fraction of the budget (``epochs`` x ``iters_per_epoch`` iterations, or
    ``epochs``); from 1 a whole count. Ask the plan ``due_after_iter(n)`` /
    ``due_after_epoch(e)``; ``count_updates()`` and ``update_points()`` describe it. A plan
    with no update in the budget is a ValueError."""
    check_plan(start, freq, unit, cycle, collect)
    _whole("epochs", epochs, 1)
    _whole("iters_per_epoch", iters_per_epoch, 1)
    budget = epochs if unit == "epoch" else epochs * iters_per_epoch
    plan = AveragingPlan(method="swa", unit=unit, freq=freq, iters_per_epoch=iters_per_epoch,
                         epochs=epochs, start=int(round(start * budget)) if start < 1.0
                         else int(start), cycle=cycle,
                         phase=cycle // 2 if cycle and collect == "middle" else None)
    if plan.count_updates() == 0:
        budget = epochs if unit == "epoch" else epochs * iters_per_epoch
        what = f"cycle={cycle} with start" if cycle else "start"
        units = "epochs" if unit == "epoch" else "iterations"
        raise ValueError(f"{what}={start:g}: no update within the budget of {budget} {units} "
                         f"(epochs={epochs}, iters_per_epoch={iters_per_epoch}); give the start "
                         "as a fraction of the budget, e.g. start=0.75")
    return plan


def fge_lr(step: int, *, start: int, cycle: int, lr_high: float, lr_low: float) -> float:
    """FGE's learning rate at ``step`` (counted from 0) from the averaging start ``start`` on:
    triangular cycles of ``cycle`` steps, from ``lr_high`` down to ``lr_low`` at mid-cycle
    (where :func:`make_plan` with ``collect="middle"`` collects a model) and back up
    (timgaripov/dnn-mode-connectivity ``utils.cyclic_learning_rate``); before ``start`` the
    lr is your own schedule's (the reference pre-trains with its ``train.py``)."""
    if step < start:
        raise ValueError(f"step={step} is before the FGE start {start}: FGE's lr begins there")
    t = ((step - start) % cycle) / cycle
    if t < 0.5:
        return lr_high * (1.0 - 2.0 * t) + lr_low * 2.0 * t
    return lr_high * (2.0 * t - 1.0) + lr_low * (2.0 - 2.0 * t)


def network_of(model: Module) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """The module whose train/eval mode is set, and the function that gives logits, of a
    network or an average (an average predicts through its ``predict``)."""
    if isinstance(model, Average):
        return model.module, model.predict
    return model, model


@contextlib.contextmanager
def as_network(model: Module) -> Iterator[tuple[nn.Module, Callable[[Tensor], Tensor]]]:
    """:func:`network_of` for a whole pass: a sharded average (FSDP2) is swapped into its
    model for the pass and out after. An average never updated holds no average: refused."""
    if isinstance(model, Average) and model.n_averaged == 0:
        raise ValueError(f"the {model.method} average was never updated (call update(model) "
                         "at the averaging points first): it holds the weights it was made "
                         "from, not an average")
    if getattr(model, "sharded", False) and hasattr(model, "swapped"):
        with model.swapped() as net:  # type: ignore[union-attr]
            yield net, net
    elif getattr(model, "sharded", False):  # an ensemble (FGE): each member through the model
        yield model.model, model.predict  # type: ignore[union-attr]
    else:
        yield network_of(model)


def update_bn(model: Module, batches: Iterable[Any],
              input_fn: Callable[[Any], Tensor] = first_item) -> None:
    """Recompute the BN statistics of a network or an average over one pass of ``batches``
    (any batch structure: ``input_fn`` gives the model input, by default the first item of a
    tuple or the batch itself), each batch weighted by its size, as the SWA paper's code."""
    with as_network(model) as (module, _):
        bn_update(batches, module, checked_input(input_fn, "update_bn"))


def checked_input(input_fn: Callable[[Any], Tensor], where: str) -> Callable[[Any], Tensor]:
    """``input_fn`` whose result must be a tensor: a batch of another structure (a dict, a
    language model's record) is a one-line TypeError that says to pass ``input_fn``."""
    def read(batch: Any) -> Tensor:
        x = input_fn(batch)
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: the model input read from a batch (a "
                            f"{type(batch).__name__}) is a {type(x).__name__}, not a tensor; "
                            "pass input_fn= to read it (e.g. input_fn=lambda b: b['x'])")
        return x
    return read


@torch.no_grad()
def predict(model: Module, batches: Iterable[Any], input_fn: Callable[[Any], Tensor] = first_item,
            label_fn: Callable[[Any], Tensor] | None = None,
            output_fn: Callable[[Tensor, Any], Tensor] | None = None
            ) -> tuple[Tensor, Tensor | None]:
    """Logits (float32, CPU) of a network or an average over ``batches`` in eval mode (its
    mode restored after), and the labels when the batches carry them (``label_fn``, default:
    the second item of a tuple). ``output_fn(logits, batch)``, when given, reduces each
    batch's logits before they are kept (a language model's to per-token losses: a whole
    set's logits would not fit)."""
    input_fn = checked_input(input_fn, "predict")
    outs: list[Tensor] = []
    labels: list[Tensor] = []
    with as_network(model) as (module, forward):
        was_training = module.training
        module.eval()
        try:
            for batch in batches:
                out = forward(input_fn(batch)).float()
                outs.append((out if output_fn is None else output_fn(out, batch)).cpu())
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
    if average.n_averaged == 0:
        raise ValueError(f"swag_bma: the {average.method} average was never updated (call "
                         "update(model) at the averaging points first)")
    if average.samples < 1:
        raise ValueError(f"swag_bma: samples={average.samples}: must be at least 1")
    input_fn = checked_input(input_fn, "swag_bma")
    inputs = {"set": lambda: (input_fn(b) for b in batches())}
    bn = None if bn_batches is None else (lambda: (input_fn(b) for b in bn_batches()))
    probs = average.bma(inputs, bn, seed).get("set")
    if probs is None:
        raise ValueError("swag_bma: batches() gave no batch to predict")
    return probs


def snapshot(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A CPU copy of the model's state dict for post-hoc averaging: floating tensors in
    ``dtype`` (bfloat16 halves the size; averages of bf16 snapshots then approximate the
    online ones), integer buffers as they are."""
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
            .clone() for k, v in model.state_dict().items()}


def average_states(model: nn.Module, states: Iterable[dict[str, Tensor]], kind: str = "swa",
                   decay: float = 0.999, warmup: bool = False, *,
                   times: Sequence[float] | None = None,
                   sigma_rels: Sequence[float] | None = None, sigma_rel: float = 0.10,
                   at: float | None = None) -> nn.Module:
    """A network of ``model``'s architecture holding the average of ``states`` (snapshots, in
    order): ``swa`` the equal average, ``ema`` the exponential moving average (the first copied,
    then avg <- d avg + (1 - d) w; ``warmup``: timm's warm-up). The arithmetic is the online
    averages', so snapshots taken at the online points give the online average.
    ``posthoc_ema`` (Karras et al. 2024, EDM2's post-hoc EMA): the power EMA of width
    ``sigma_rel`` at time ``at`` (default: the last of ``times``) reconstructed from saved power
    EMAs, ``states[i]`` the one of width ``sigma_rels[i]`` saved at time ``times[i]`` (its
    points counted from 1; those saved after ``at`` are left out;
    :func:`~swa_research.averaging.power_ema.posthoc_ema_coefficients`).
    BN statistics are the last snapshot's: recompute them with :func:`update_bn`. ``model`` is
    not changed."""
    if kind == "posthoc_ema":
        if times is None or sigma_rels is None:
            raise ValueError("kind='posthoc_ema' needs times= and sigma_rels= (one of each per "
                             "state)")
        from swa_research.averaging.power_ema import combine_states, posthoc_ema_coefficients

        at = max(times) if at is None else at
        kept = [i for i, t in enumerate(times) if t <= at]  # a later profile saw later steps
        weights = posthoc_ema_coefficients([times[i] for i in kept],
                                           [sigma_rels[i] for i in kept], at, sigma_rel)
        keep = set(kept)
        chosen = (st for i, st in enumerate(states) if i in keep)
        work = copy.deepcopy(model)
        try:
            work.load_state_dict(combine_states(chosen, weights.tolist()))
        except RuntimeError as e:
            raise ValueError(f"average_states: the states do not fit the model: "
                             f"{str(e).strip().splitlines()[-1].strip()}") from None
        return work
    if kind not in ("swa", "ema"):
        raise ValueError(f"kind={kind!r}: expected 'swa', 'ema' or 'posthoc_ema' (LAWA: the "
                         "'swa' of the last k states)")
    work = copy.deepcopy(model)
    averaged = HostCountAveragedModel(work, ema_multi_avg_fn(decay, warmup)
                                      if kind == "ema" else None)
    for i, state in enumerate(states):
        try:
            work.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"average_states: state {i} does not fit the model: "
                             f"{str(e).strip().splitlines()[-1].strip()}") from None
        averaged.update_parameters(work)
    if averaged.count == 0:
        raise ValueError("no states to average")
    return averaged.module
