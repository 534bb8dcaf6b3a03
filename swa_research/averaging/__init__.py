"""Weight averaging: when (:mod:`.plan`), what (the methods, by name), and the BN update.
The methods: swa, ema, lawa, the SWAG posteriors swag and swag_diag (:mod:`.swag`), and fge,
the ensemble of models collected along a cyclical lr (:mod:`.fge`: predictions, not weights).

This package is the project's public library (docs/library.md), for any training loop: the
names in ``PUBLIC`` below are versioned (semantic versioning from 0.2: a change that breaks
one of them is a major version); everything else in the project is internal. The Hydra
framework's trainer is built on the same names.

The registry :data:`METHODS` maps ``swa.method`` names to builders ``(model, SwaConfig) ->``
:class:`~swa_research.averaging.base.Average`. Adding a method is one file with its class and
one line here (or a call of :func:`register_method`); ``swa.method=NAME`` then selects it.
A run's averages are named: the primary (``swa.method``) is ``swa`` in every output (history
columns ``swa_*``, metrics.json's ``swa``, W&B's ``swa/...``); each of ``swa.also`` is kept
under its method's name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from swa_research.averaging.base import (
    Average,
    HostCountAveragedModel,
    WeightAverage,
    bn_update,
    has_batch_norm,
)
from swa_research.averaging.ema import EMA
from swa_research.averaging.fge import FGE
from swa_research.averaging.lawa import LAWA
from swa_research.averaging.plan import AveragingPlan, check_budget
from swa_research.averaging.power_ema import PowerEMA
from swa_research.averaging.sharded import WEIGHT_METHODS, ShardedAverage
from swa_research.averaging.sharded_fge import ShardedFGE
from swa_research.averaging.sharded_swag import ShardedSWAG
from swa_research.averaging.swa import SWA
from swa_research.averaging.swag import SWAG, SWAGDiag
from swa_research.config import SwaConfig, UserError, validate_swa

# The public, versioned surface (docs/library.md).
PUBLIC = ["Average", "AveragingPlan", "METHODS", "SWAG", "SWAGDiag", "average_states",
          "bn_update", "classification_metrics", "expected_calibration_error", "fge_lr",
          "language_model_metrics", "make_average",
          "make_plan", "predict", "register_method", "snapshot", "swag_bma", "update_bn"]

__all__ = ["AVERAGE_OPTIONS", "METHODS", "PRIMARY", "SWAG", "Average", "AveragingPlan",
           "HostCountAveragedModel",
           "SWAGDiag", "WeightAverage", "average_names", "average_states", "bn_update",
           "average_config", "build_averages", "check_budget", "check_methods",
           "further_averages", "classification_metrics",
           "expected_calibration_error", "fge_lr", "has_batch_norm", "language_model_metrics",
           "make_average", "make_plan",
           "predict", "register_method", "snapshot", "swag_bma", "update_bn"]

METHODS: dict[str, Callable[[nn.Module, SwaConfig], Average]] = {
    "swa": SWA,
    "ema": EMA,
    "swag": SWAG,
    "swag_diag": SWAGDiag,
    "lawa": LAWA,
    "fge": FGE,
    "power_ema": PowerEMA,
}

PRIMARY = "swa"  # the primary average's name in every output, whatever its method


def register_method(name: str, build: Callable[[nn.Module, SwaConfig], Average]) -> None:
    """Add an averaging method under ``name`` (from a plugin, a notebook or a test)."""
    METHODS[name] = build


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


def check_methods(cfg: SwaConfig) -> None:
    """swa.method and swa.also name registered methods, no two averages share a name, and each
    average's own options are valid (a method's optional ``check(cfg)``)."""
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
        check = getattr(METHODS[method], "check", None)
        try:
            if name != PRIMARY:
                validate_swa(one)
            if check is not None:
                check(one)
        except UserError as e:
            if name == PRIMARY or not further[name][1]:
                raise
            raise UserError(f"swa.also ({name}): {str(e).removeprefix('swa.')}") from None


def sharded_average(model: nn.Module, cfg: Any) -> Average:
    """An average of a ``fully_shard``'ed model by ``cfg.method`` (a SwaConfig's), sharded as
    the model: :class:`~.sharded.ShardedAverage` (swa, ema, lawa, power_ema),
    :class:`~.sharded_swag.ShardedSWAG` or :class:`~.sharded_fge.ShardedFGE`."""
    if getattr(cfg, "offload", "none") == "cpu" and cfg.method not in WEIGHT_METHODS:
        raise ValueError(f"offload: {cfg.method}'s state is not kept in host memory yet "
                         f"(offload takes {', '.join(WEIGHT_METHODS)})")
    if cfg.method in ("swag", "swag_diag"):
        return ShardedSWAG(model, cfg)
    if cfg.method == "fge":
        return ShardedFGE(model, cfg)
    return ShardedAverage(model, cfg.method, decay=cfg.decay, warmup=cfg.ema_warmup,
                          k=cfg.lawa_k, offload=getattr(cfg, "offload", "none") == "cpu",
                          sigma_rel=getattr(cfg, "sigma_rel", 0.10))


def build_averages(model: nn.Module, cfg: SwaConfig) -> dict[str, Average]:
    """The run's averages of ``model``, by output name, primary first; of a model sharded with
    fully_shard, each sharded beside it (:mod:`.sharded`)."""
    from swa_research.averaging.sharded import is_sharded

    check_methods(cfg)
    configs = {name: average_config(cfg, name) for name in average_names(cfg)}
    if is_sharded(model):
        return {name: sharded_average(model, c) for name, c in configs.items()}
    return {name: METHODS[c.method](model, c) for name, c in configs.items()}


# The library functions build on METHODS above (imported last: they look it up at call time).
from swa_research.averaging.library import (  # noqa: E402
    average_states,
    fge_lr,
    make_average,
    make_plan,
    predict,
    snapshot,
    swag_bma,
    update_bn,
)
from swa_research.averaging.metrics import (  # noqa: E402
    classification_metrics,
    expected_calibration_error,
    language_model_metrics,
)
