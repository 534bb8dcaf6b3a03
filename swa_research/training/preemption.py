"""Preemption: SIGTERM, SIGUSR1 or SIGUSR2 (what SLURM and submitit send before preemption or the
time limit) stop a run with the requeue status, after a checkpoint where there is work to save.

Before the training loop, :func:`stop_on_signals` stops at once (nothing to save yet, or the
checkpoint on disk is current). In the loop, :class:`SignalFlag` notes the signal; the trainer
finishes its step, writes a checkpoint and raises :class:`Preempted`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again": asks for a requeue
# SIGUSR2 too: submitit's default preemption signal.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    """A preemption signal arrived; the process exits for a requeue.

    A SystemExit, so that Hydra's job runner and launchers let it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.signum = signum


def _install(handler: Any) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread
    return {sig: signal.signal(sig, handler) for sig in SIGNALS}


def _restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


BEFORE_TRAINING = "before training started"
WRITING_RESULTS = ("after training, while the run's results were being written (the rerun "
                   "completes them from the checkpoint)")
_phase = [BEFORE_TRAINING]  # what the run is doing outside the training loop, for the log


def set_phase(text: str) -> None:
    """Where a run outside its training loop is (:data:`BEFORE_TRAINING`,
    :data:`WRITING_RESULTS`): named by the line a preemption signal logs."""
    _phase[0] = text


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Until the training loop takes over, a preemption signal raises :class:`Preempted`. The
    signal is then handed on to the handler that was there before (under submitit, its own,
    which requeues the job)."""
    def stop(signum: int, frame: Any) -> None:
        log.warning("%s received %s; exiting with status %d for a requeue",
                    signal.Signals(signum).name, _phase[0], REQUEUE_EXIT_CODE)
        raise Preempted(signum)

    set_phase(BEFORE_TRAINING)

    previous = _install(stop)
    try:
        yield
    except Preempted as e:
        _restore(previous)
        handler = previous.get(e.signum)
        previous = {}
        if callable(handler):
            handler(e.signum, None)
        raise
    finally:
        _restore(previous)


class SignalFlag:
    """While active (a context manager), notes the latest preemption signal in :attr:`signum`
    instead of acting on it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __enter__(self) -> SignalFlag:
        self._previous = _install(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        _restore(self._previous)
        self._previous = {}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: where the run stopped and how to go on, on one line."""

    def __init__(self, iteration: int, resumable: bool) -> None:
        how = ("rerun the same command to resume from its last checkpoint" if resumable else
               "trainer.checkpoint_every=0 kept no checkpoint: a rerun starts again")
        super().__init__(f"interrupted at iteration {iteration}; {how}")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def outcome(e: BaseException, iteration: int = 0, resumable: bool = True
            ) -> tuple[str, str | None, BaseException | None]:
    """How a run that raised ``e`` ended, for metrics.json: its status, the error line, and
    what to raise instead: under DDP the failure of another rank that ``e`` stands for; for
    Ctrl-C the one line of :class:`Interrupted` (at ``iteration``)."""
    from swa_research.distributed import as_peer_failure

    if isinstance(e, Preempted):
        return "preempted", "stopped by a signal; resumes from its checkpoint", None
    if isinstance(e, TrainingDiverged):
        return "diverged", str(e), None
    if isinstance(e, KeyboardInterrupt):
        again = None if isinstance(e, Interrupted) else Interrupted(iteration, resumable)
        return "interrupted", "interrupted by the user", again
    peer = as_peer_failure(e) if isinstance(e, Exception) else None
    if peer is not None and peer is not e:
        return "failed", str(peer), peer
    return "failed", f"{type(e).__name__}: {e}", None
