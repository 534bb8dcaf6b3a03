"""The run's averages from its config: ``swa.method`` and the named averages of ``swa.also``,
their ``swa.*`` keys mapped onto the averaging core's options (:mod:`swa_research.averaging`:
each method's constructor keywords), the plan of their updates and the check that it fits the
budget. The core knows nothing of the config; this module is the bridge.

A run's averages are named: the primary (``swa.method``) is ``swa`` in every output (history
columns ``swa_*``, metrics.json's ``swa``, W&B's ``swa/...``); each of ``swa.also`` is kept
under its own name (a method's, or the one given: ``{name: ema_fast, method: ema, ...}``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from swa_research.averaging import (
    METHODS,
    PRIMARY,
    Average,
    AveragingPlan,
    build_average,
    check_options,
)
from swa_research.averaging.sharded import is_sharded
from swa_research.config import Config, ScheduleConfig, SwaConfig, UserError, validate_swa
from swa_research.config.checks import swa_key_message

log = logging.getLogger(__name__)

# What a named average (swa.also={NAME: {method: M, ...}}) may set for itself: SwaConfig's
# keys that shape one average; the others (lr, start, freq, unit) are the run's plan.
AVERAGE_OPTIONS = ("decay", "ema_warmup", "bn_update", "max_models", "swag_scale",
                   "swag_diag_scale", "samples", "swag_device", "swag_eval_every", "lawa_k",
                   "offload", "sigma_rel", "ema_buffers")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def further_averages(cfg: SwaConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """``swa.also`` as name -> (method, options), in order: a method's name is kept under that
    name; a mapping ``{name: N, method: M, <options>}`` under N (``method`` defaults to the
    name, ``name`` to the method). Two entries of one name: a UserError."""
    also = cfg.also if cfg.also is not None else []
    if not isinstance(also, (list, tuple)):
        raise UserError(f"swa.also={also}: a list of methods ([ema]) or of named averages "
                        "([{name:ema_fast,method:ema,decay:0.99}])")
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in also:
        if isinstance(entry, Mapping):
            spec = dict(entry)
            method = str(spec.pop("method", spec.get("name", "")))
            name = str(spec.pop("name", method))
        else:
            name = method = str(entry)
            spec = {}
        if name in out:
            raise UserError(f"swa.also: two averages are named {name!r}; to keep several "
                            f"averages of one method, name them: swa.also=[{{name:{name}_a,"
                            f"method:{method}}},{{name:{name}_b,method:{method},...}}]")
        out[name] = (method, spec)
    return out


def average_names(cfg: SwaConfig) -> dict[str, str]:
    """The run's averages: output name -> method name (empty when swa.method=none)."""
    if cfg.method == "none":
        return {}
    return {PRIMARY: cfg.method, **{n: m for n, (m, _) in further_averages(cfg).items()}}


def average_config(cfg: SwaConfig, name: str) -> SwaConfig:
    """The config one average is built from: the run's, with its method and its own
    options (a named average of ``swa.also``)."""
    if name == PRIMARY:
        return cfg
    method, options = further_averages(cfg)[name]
    unknown = sorted(set(options) - set(AVERAGE_OPTIONS))
    if unknown:
        raise UserError(f"swa.also ({name}): {unknown[0]} is not an option of an average; "
                        f"expected name, method or some of {', '.join(AVERAGE_OPTIONS)}")
    return dataclasses.replace(cfg, method=method, also=[], **options)


def average_options(cfg: SwaConfig) -> dict[str, Any]:
    """One average's ``swa.*`` keys as the core's options (every method takes its own)."""
    scale = cfg.swag_diag_scale if cfg.method == "swag_diag" else cfg.swag_scale
    return {"bn_update": cfg.bn_update, "decay": cfg.decay, "ema_warmup": cfg.ema_warmup,
            "ema_buffers": cfg.ema_buffers, "lawa_k": cfg.lawa_k, "sigma_rel": cfg.sigma_rel,
            "max_models": cfg.max_models, "samples": cfg.samples, "device": cfg.swag_device,
            "eval_every": cfg.swag_eval_every, "scale": scale,
            "offload": cfg.offload == "cpu"}


def _config_error(e: ValueError, cfg: SwaConfig, name: str, named: bool) -> UserError:
    """The core's error in the config's keys: ``swa.decay=...`` for the primary,
    ``swa.also (NAME): decay=...`` for a named average with options of its own."""
    scale_key = "swag_diag_scale" if cfg.method == "swag_diag" else "swag_scale"
    text = swa_key_message(str(e), scale_key)
    if name != PRIMARY and named:
        return UserError(f"swa.also ({name}): {text.removeprefix('swa.')}")
    return UserError(text)


def check_methods(cfg: SwaConfig) -> None:
    """swa.method and swa.also name registered methods, no two averages share a name, and each
    average's own options are valid (its method's ``check``)."""
    known = ", ".join([*METHODS, "none"])
    if cfg.method != "none" and cfg.method not in METHODS:
        raise UserError(f"swa.method={cfg.method!r}: expected one of {known}")
    further = further_averages(cfg)
    for name, (m, options) in further.items():
        if m not in METHODS:
            where = f"swa.also ({name})" if options or name != m else "swa.also"
            raise UserError(f"{where}: {m!r} is not an averaging method; expected "
                            f"{', '.join(METHODS)}")
        if not _NAME.fullmatch(name):
            raise UserError(f"swa.also: {name!r} cannot name an average (lower-case letters, "
                            "digits and _, from a letter: it names files and columns)")
    if further and cfg.method == "none":
        raise UserError("swa.also needs a primary average: swa.method=none averages nothing")
    if PRIMARY in further:
        raise UserError(f"swa.also: '{PRIMARY}' names the primary average "
                        f"(swa.method={cfg.method}); name only further averages, e.g. "
                        "swa.method=swa swa.also=[ema]")
    for name, method in average_names(cfg).items():
        one = average_config(cfg, name)
        named = name != PRIMARY and bool(further[name][1])
        try:
            if name != PRIMARY:
                validate_swa(one)
            check_options(method, average_options(one))
        except UserError as e:
            if not named:
                raise
            raise UserError(f"swa.also ({name}): {str(e).removeprefix('swa.')}") from None
        except ValueError as e:
            raise _config_error(e, one, name, named) from None


def build_averages(model: nn.Module, cfg: SwaConfig) -> dict[str, Average]:
    """The run's averages of ``model``, by output name, primary first; of a model sharded with
    fully_shard, each sharded beside it."""
    check_methods(cfg)
    out: dict[str, Average] = {}
    further = further_averages(cfg)
    for name in average_names(cfg):
        one = average_config(cfg, name)
        options = average_options(one)
        if not is_sharded(model):
            options.pop("offload")  # host memory is for sharded averages (checked with FSDP)
        try:
            out[name] = build_average(one.method, model, **options)
        except ValueError as e:
            named = name != PRIMARY and bool(further[name][1])
            raise _config_error(e, one, name, named) from None
    return out


def plan_from_config(swa: SwaConfig, schedule: ScheduleConfig, epochs: int,
                     iters_per_epoch: int, max_steps: int = 0) -> AveragingPlan:
    """The run's plan (:class:`~swa_research.averaging.AveragingPlan`) from ``swa.*``, the
    schedule's cycle and the budget: ``epochs`` of ``iters_per_epoch``, or ``max_steps`` > 0
    (``epochs`` then the epochs it takes). A start below 1.0 is a fraction of the budget."""
    if max_steps:
        epochs = -(-max_steps // iters_per_epoch)
    budget = (max_steps // iters_per_epoch if max_steps else epochs) if swa.unit == "epoch" \
        else (max_steps or epochs * iters_per_epoch)
    start = int(round(swa.start * budget)) if swa.start < 1.0 else int(round(swa.start))
    cycle = phase = None
    if schedule.name == "cyclical":
        cycle = schedule.cycle
    elif schedule.name == "fge":
        cycle = schedule.fge_cycle * iters_per_epoch
        phase = cycle // 2
    return AveragingPlan(method=swa.method, unit=swa.unit, start=start, freq=swa.freq,
                         iters_per_epoch=iters_per_epoch, epochs=epochs, cycle=cycle,
                         phase=phase, steps=max_steps)


def check_budget(cfg: Config, iters_per_epoch: int) -> None:
    """Checks that need the data set's size: the averaging must fit in the budget."""
    if iters_per_epoch < 1:
        raise UserError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training set "
            "(drop_last leaves no batch)")
    steps = cfg.trainer.max_steps
    if steps and cfg.swa.unit == "epoch" and cfg.swa.method != "none" and \
            steps % iters_per_epoch:
        raise UserError(
            f"swa.unit=epoch counts whole epochs, and trainer.max_steps={steps} ends inside "
            f"epoch {steps // iters_per_epoch + 1} ({iters_per_epoch} steps an epoch): set "
            f"swa.unit=iter (swa.start and swa.freq in steps), or max_steps to a multiple of "
            f"{iters_per_epoch}")
    if cfg.swa.method == "none":
        return
    plan = plan_from_config(cfg.swa, cfg.schedule, cfg.trainer.epochs, iters_per_epoch, steps)
    count, first = plan.count_updates(), plan.first_update()
    budget = plan.whole_epochs if cfg.swa.unit == "epoch" else plan.total_iters
    given = f"trainer.max_steps={steps}" if steps else f"trainer.epochs={cfg.trainer.epochs}"
    if not count and plan.start < budget:
        unit = "epochs" if cfg.swa.unit == "epoch" else "iterations"
        room = budget - plan.start  # in swa.unit
        if cfg.schedule.name == "fge":
            # The user's key counts epochs; the first model comes half a cycle after the start.
            room_epochs = room if cfg.swa.unit == "epoch" else room // iters_per_epoch
            raise UserError(
                f"schedule.fge_cycle={cfg.schedule.fge_cycle}: FGE collects its first model "
                f"half a cycle ({cfg.schedule.fge_cycle // 2} epochs) after the start "
                f"({cfg.swa.unit} {plan.start}), beyond the end of the budget "
                f"({given}); set schedule.fge_cycle to an even "
                f"number of at most {2 * room_epochs} epochs, or move swa.start earlier")
        what = f"schedule.cycle={plan.cycle}" if plan.cycle is not None else \
            f"swa.freq={cfg.swa.freq}"
        raise UserError(
            f"{what}: no averaging point between the start ({cfg.swa.unit} {plan.start}) and "
            f"the end of the budget ({budget} {unit}, {given}); "
            f"lower it below {room}")
    if not count:
        unit = "epochs" if cfg.swa.unit == "epoch" else "iterations"
        raise UserError(
            f"swa.start={cfg.swa.start:g} is beyond the training budget of {budget} {unit} "
            f"({given}): no weights would be averaged; give the "
            "start as a fraction of the budget, e.g. swa.start=0.75")
    if count == 1 and plan.cycle is None:
        # An average of one point is that checkpoint (with recomputed BN statistics): almost
        # always a swa.freq meant for a longer run, e.g. the group's 50 with swa.unit=epoch.
        unit = "epoch" if cfg.swa.unit == "epoch" else "iteration"
        log.warning("swa.freq=%d with swa.unit=%s averages only once in this run (after %s %d "
                    "of %d): the 'average' is that one checkpoint; lower swa.freq to average "
                    "more", cfg.swa.freq, cfg.swa.unit, unit, first, budget)
