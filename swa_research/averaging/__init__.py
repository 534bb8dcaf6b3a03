"""Weight averaging: when (:mod:`.plan`), what (the methods, by name), and the BN update.
The methods: swa, ema, lawa, the SWAG posteriors swag and swag_diag (:mod:`.swag`), and fge,
the ensemble of models collected along a cyclical lr (:mod:`.fge`: predictions, not weights).

This package is the project's public library (docs/library.md), for any training loop: the
names in ``PUBLIC`` below are versioned (semantic versioning from 0.2: a change that breaks
one of them is a major version); everything else in the project is internal. The Hydra
framework's trainer is built on the same names.

The registry :data:`METHODS` maps method names to builders ``(model, **options) ->``
:class:`~swa_research.averaging.base.Average`: a method's options are its constructor's
keyword arguments, checked there (a one-line ValueError in the argument's name). Adding a
method is one file with its class and one line here (or a call of :func:`register_method`).
The package imports nothing of the framework (its config, data, process groups): the
framework maps its ``swa.*`` keys onto these options (:mod:`swa_research.training.averages`)
and hands the averages its batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from swa_research.averaging.base import (
    Average,
    EvalSet,
    HostCountAveragedModel,
    WeightAverage,
    bn_update,
    has_batch_norm,
)
from swa_research.averaging.ema import EMA
from swa_research.averaging.fge import FGE
from swa_research.averaging.lawa import LAWA
from swa_research.averaging.plan import AveragingPlan
from swa_research.averaging.power_ema import PowerEMA
from swa_research.averaging.sharded import WEIGHT_METHODS, ShardedAverage
from swa_research.averaging.sharded_fge import ShardedFGE
from swa_research.averaging.sharded_swag import ShardedSWAG
from swa_research.averaging.swa import SWA
from swa_research.averaging.swag import SWAG, SWAGDiag

# The public, versioned surface (docs/library.md).
PUBLIC = ["Average", "AveragingPlan", "METHODS", "SWAG", "SWAGDiag", "average_states",
          "bn_update", "classification_metrics", "expected_calibration_error", "fge_lr",
          "language_model_metrics", "make_average",
          "make_plan", "predict", "register_method", "snapshot", "swag_bma", "update_bn"]

__all__ = ["METHODS", "PRIMARY", "SWAG", "Average", "AveragingPlan", "EvalSet",
           "HostCountAveragedModel",
           "SWAGDiag", "WeightAverage", "average_states", "bn_update", "build_average",
           "check_options", "method_options", "sharded_average", "classification_metrics",
           "expected_calibration_error", "fge_lr", "has_batch_norm", "language_model_metrics",
           "make_average", "make_plan",
           "predict", "register_method", "snapshot", "swag_bma", "update_bn"]

METHODS: dict[str, Callable[..., Average]] = {
    "swa": SWA,
    "ema": EMA,
    "swag": SWAG,
    "swag_diag": SWAGDiag,
    "lawa": LAWA,
    "fge": FGE,
    "power_ema": PowerEMA,
}

PRIMARY = "swa"  # the primary average's name in every output, whatever its method


def register_method(name: str, build: Callable[..., Average]) -> None:
    """Add an averaging method under ``name`` (from a plugin, a notebook or a test):
    ``build(model, **options)`` makes the average; its keyword parameters are the method's
    options (``make_average(name, model, **options)`` and the framework's ``swa.*`` keys of
    those names reach it), checked by ``build.check(**options)`` where it has one."""
    METHODS[name] = build


def _parameters(build: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword options ``build`` (a function or a class) takes, and whether it takes any
    (``**kwargs``)."""
    params = inspect.signature(build).parameters.values()
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Those of ``options`` that ``method``'s builder takes (its keyword parameters): a
    caller offers every option it has, each method takes its own."""
    named, anything = _parameters(METHODS[method])
    return {k: v for k, v in options.items() if anything or k in named}


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """``method``'s options checked without a model (its builder's ``check``, if it has one):
    a one-line ValueError in the options' names."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    check = getattr(METHODS[method], "check", None)
    if check is not None:
        check(**method_options(method, options))


def sharded_average(model: nn.Module, method: str, *, offload: bool = False,
                    **options: Any) -> Average:
    """An average of a ``fully_shard``'ed model, sharded as the model:
    :class:`~.sharded.ShardedAverage` (swa, ema, lawa, power_ema),
    :class:`~.sharded_swag.ShardedSWAG` or :class:`~.sharded_fge.ShardedFGE`; ``options`` as
    the unsharded methods' (those a method does not take are left out)."""
    if offload and method not in WEIGHT_METHODS:
        raise ValueError(f"offload: {method}'s state is not kept in host memory yet "
                         f"(offload takes {', '.join(WEIGHT_METHODS)})")
    if method in ("swag", "swag_diag"):
        return ShardedSWAG(model, method, **method_options(method, options))
    if method == "fge":
        return ShardedFGE(model, **method_options(method, options))
    check_options(method, options)
    return ShardedAverage(model, method, decay=options.get("decay", 0.999),
                          warmup=options.get("ema_warmup", False),
                          k=options.get("lawa_k", 10), offload=offload,
                          sigma_rel=options.get("sigma_rel", 0.10))


def build_average(method: str, model: nn.Module, **options: Any) -> Average:
    """An average of ``model`` by ``method`` with the options it takes (the others left
    out); of a model sharded with fully_shard, sharded beside it (:mod:`.sharded`)."""
    from swa_research.averaging.sharded import is_sharded

    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if is_sharded(model):
        return sharded_average(model, method, **options)
    if options.pop("offload", False):
        raise ValueError("offload=True keeps a sharded model's average in host memory: pass "
                         "a model passed through fully_shard")
    return METHODS[method](model, **method_options(method, options))


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
