"""Fault injection for the crash/resume tests, outside the product.

A Python process started with this folder on PYTHONPATH and ``SWA_RESEARCH_FAULT`` set imports
this file at startup (Python's ``sitecustomize`` hook, so that processes a launcher starts,
e.g. submitit's workers, get it too) and patches named points of swa_research:

``SWA_RESEARCH_FAULT=point`` or ``point@N`` kills the process with SIGKILL the N-th time
(default 1st) it reaches the point; ``point@N:TERM`` (or ``:USR1``, ``:USR2``) sends that signal
instead, as a scheduler would. With ``SWA_RESEARCH_FAULT_ONCE=PATH`` it fires in one process
only (marker file PATH: a requeued job is not stopped again). With ``SWA_RESEARCH_FAULT_RANK=R``
it fires only in the process whose ``RANK`` (torchrun's variable) is R: one rank of a DDP run.

Points: ``step`` (after an optimizer step), ``averaged`` (after an update of an average),
``eval`` (as an evaluation starts), ``bn_update`` (at each batch of the BN update of an
average), ``checkpoint_write`` (a checkpoint half written, before its rename).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

ENV = "SWA_RESEARCH_FAULT"
ONCE_ENV = "SWA_RESEARCH_FAULT_ONCE"
RANK_ENV = "SWA_RESEARCH_FAULT_RANK"
_counts: dict[str, int] = {}


def _target() -> tuple[str, int, signal.Signals]:
    spec, _, sig = os.environ[ENV].partition(":")
    point, _, nth = spec.partition("@")
    return point, int(nth or 1), signal.Signals[f"SIG{sig or 'KILL'}"]


def fire(point: str) -> None:
    name, nth, sig = _target()
    if name != point:
        return
    rank = os.environ.get(RANK_ENV)
    if rank and os.environ.get("RANK", "0") != rank:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != nth:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), sig)


def _replace_everywhere(original: Any, replacement: Any) -> None:
    """Rebind a function in every loaded swa_research module that imported it by name."""
    for name, module in list(sys.modules.items()):
        if name.startswith("swa_research") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, replacement)


def install() -> None:
    import swa_research.averaging.base as base
    import swa_research.training.build  # noqa: F401  (loads every module whose names are rebound)
    import swa_research.training.checkpoint as checkpoint
    import swa_research.training.evaluation as evaluation
    import swa_research.training.step as step

    train_step = step.TrainStep.__call__

    def step_then_fire(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = train_step(self, *args, **kwargs)
        fire("step")
        return out

    step.TrainStep.__call__ = step_then_fire

    update = base.WeightAverage.update

    def update_then_fire(self: Any, model: Any) -> None:
        update(self, model)
        fire("averaged")

    base.WeightAverage.update = update_then_fire

    evaluate = evaluation.evaluate

    def fire_then_evaluate(*args: Any, **kwargs: Any) -> Any:
        fire("eval")
        return evaluate(*args, **kwargs)

    _replace_everywhere(evaluate, fire_then_evaluate)

    bn_update = base.bn_update

    def bn_update_firing(batches: Any, model: Any) -> None:
        def firing() -> Any:
            for batch in batches:
                fire("bn_update")
                yield batch
        bn_update(firing(), model)

    _replace_everywhere(bn_update, bn_update_firing)

    atomic_write = checkpoint.atomic_write

    def atomic_write_firing(path: Any, write: Any, *args: Any, **kwargs: Any) -> None:
        def write_then_fire(f: Any) -> None:
            write(f)
            f.flush()  # half a file on disk when the process dies here
            fire("checkpoint_write")
        atomic_write(path, write_then_fire, *args, **kwargs)

    checkpoint.atomic_write = atomic_write_firing


if os.environ.get(ENV):
    install()
