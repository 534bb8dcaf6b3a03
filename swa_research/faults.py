"""Fault injection for the crash/resume tests: ``SWA_RESEARCH_FAULT=point`` or ``point@N``
kills the process with SIGKILL the N-th time (default 1st) it reaches the named point;
``point@N:TERM`` (or ``:USR1``, ``:USR2``) sends that signal instead, as a scheduler would.
With ``SWA_RESEARCH_FAULT_ONCE=PATH`` it fires once across processes (marker file PATH).

Points: ``step`` (after an optimizer step), ``eval`` (during an evaluation), ``bn_update``
(during the BN update of the average), ``checkpoint_write`` (a checkpoint half written),
``averaged`` (right after an update of the average). Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "SWA_RESEARCH_FAULT"
ONCE_ENV = "SWA_RESEARCH_FAULT_ONCE"  # a marker file's path: fire only if it does not exist
_counts: dict[str, int] = {}


def _target() -> tuple[str, int, signal.Signals] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    spec, _, sig = spec.partition(":")
    point, _, nth = spec.partition("@")
    return point, int(nth or 1), signal.Signals[f"SIG{sig or 'KILL'}"]


def fault_point(point: str) -> None:
    target = _target()
    if target is None or target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != target[1]:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        # Fire in one process only (a requeued job must not be killed again).
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    os.kill(os.getpid(), target[2])
