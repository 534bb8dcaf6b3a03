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

from collections.abc import Callable

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
from swa_research.averaging.swa import SWA
from swa_research.averaging.swag import SWAG, SWAGDiag
from swa_research.config import SwaConfig, UserError

# The public, versioned surface (docs/library.md).
PUBLIC = ["Average", "AveragingPlan", "METHODS", "SWAG", "SWAGDiag", "average_states",
          "bn_update", "classification_metrics", "expected_calibration_error", "fge_lr",
          "make_average",
          "make_plan", "predict", "register_method", "snapshot", "swag_bma", "update_bn"]

__all__ = ["METHODS", "PRIMARY", "SWAG", "Average", "AveragingPlan", "HostCountAveragedModel",
           "SWAGDiag", "WeightAverage", "average_names", "average_states", "bn_update",
           "build_averages", "check_budget", "check_methods", "classification_metrics",
           "expected_calibration_error", "fge_lr", "has_batch_norm", "make_average", "make_plan",
           "predict", "register_method", "snapshot", "swag_bma", "update_bn"]

METHODS: dict[str, Callable[[nn.Module, SwaConfig], Average]] = {
    "swa": SWA,
    "ema": EMA,
    "swag": SWAG,
    "swag_diag": SWAGDiag,
    "lawa": LAWA,
    "fge": FGE,
}

PRIMARY = "swa"  # the primary average's name in every output, whatever its method


def register_method(name: str, build: Callable[[nn.Module, SwaConfig], Average]) -> None:
    """Add an averaging method under ``name`` (from a plugin, a notebook or a test)."""
    METHODS[name] = build


def average_names(cfg: SwaConfig) -> dict[str, str]:
    """The run's averages: output name -> method name (empty when swa.method=none)."""
    if cfg.method == "none":
        return {}
    return {PRIMARY: cfg.method, **{m: m for m in cfg.also}}


def check_methods(cfg: SwaConfig) -> None:
    """swa.method and swa.also name registered methods, no two averages share a name, and each
    method's own options are valid (a method's optional ``check(cfg)``)."""
    known = ", ".join([*METHODS, "none"])
    if cfg.method != "none" and cfg.method not in METHODS:
        raise UserError(f"swa.method={cfg.method!r}: expected one of {known}")
    for m in cfg.also:
        if m not in METHODS:
            raise UserError(f"swa.also: {m!r} is not an averaging method; expected "
                            f"{', '.join(METHODS)}")
    if cfg.also and cfg.method == "none":
        raise UserError("swa.also needs a primary average: swa.method=none averages nothing")
    repeated = sorted({m for m in cfg.also if list(cfg.also).count(m) > 1})
    if repeated:
        raise UserError(f"swa.also={list(cfg.also)}: {', '.join(repeated)} is listed more "
                        "than once; each further average is kept once, under its method's "
                        f"name (e.g. swa.also=[{repeated[0]}])")
    if PRIMARY in cfg.also:
        raise UserError(f"swa.also={list(cfg.also)}: '{PRIMARY}' names the primary average "
                        f"(swa.method={cfg.method}); list only further methods, e.g. "
                        "swa.method=swa swa.also=[ema]")
    for method in set(average_names(cfg).values()):
        check = getattr(METHODS[method], "check", None)
        if check is not None:
            check(cfg)


def build_averages(model: nn.Module, cfg: SwaConfig) -> dict[str, Average]:
    """The run's averages of ``model``, by output name, primary first; of a model sharded with
    fully_shard, each sharded beside it (:mod:`.sharded`)."""
    from swa_research.averaging.sharded import ShardedAverage, is_sharded

    check_methods(cfg)
    if is_sharded(model):
        return {name: ShardedAverage(model, method, decay=cfg.decay, warmup=cfg.ema_warmup,
                                     k=cfg.lawa_k)
                for name, method in average_names(cfg).items()}
    return {name: METHODS[method](model, cfg) for name, method in average_names(cfg).items()}


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
)
