"""File locks for work that several jobs on one machine may start at once: downloading a data
set, building its decode cache, choosing a GPU, running in a run dir. All are ``flock`` locks
(through ``filelock``), so the kernel releases them when the holder dies, however it dies."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def _flock(path: str | Path, **options: Any) -> FileLock:
    """A kernel lock, releasable from any thread; no soft-lock marker that outlives a holder."""
    return FileLock(path, thread_local=False, fallback_to_soft=False, **options)


def lock_path(folder: str | Path, name: str) -> Path:
    """``folder/.name.lock`` when the folder is writable, else a file in the temp dir keyed by
    the folder's path (a read-only shared data set)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f".{name}.lock"
        path.touch(exist_ok=True)
        return path
    except OSError:
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"swa_research-{key}-{name}.lock"


@contextmanager
def file_lock(path: str | Path, what: str = "") -> Iterator[None]:
    """Exclusive lock on ``path`` for the duration of the block (released if the process
    dies). Says so when it has to wait. The lock file is removed as the block ends (while
    still held), so none stays beside the user's data; a process that was waiting on it then
    holds a lock of its own, and finds the work the block guarded done (the guarded work is
    checked under the lock and written by atomic renames)."""
    lock = _flock(path)
    try:
        held = lock.acquire(blocking=False)
    except Timeout:
        log.info("waiting for another process %s (lock %s)", what, path)
        held = lock.acquire()
    with held:
        try:
            yield
        finally:
            Path(path).unlink(missing_ok=True)


class GpuClaim:
    """One GPU of several for this process, held through a lock file per GPU until
    :meth:`release` (or the process ends). Jobs that share a machine (joblib, several W&B
    agents) thus take different GPUs; a job waits while every GPU is taken."""

    def __init__(self, index: int, lock: FileLock) -> None:
        self.index = index
        self._lock = lock

    @classmethod
    def acquire(cls, count: int, preferred: int = 0, lock_dir: str | Path | None = None,
                poll_s: float = 2.0, timeout_s: float | None = None) -> GpuClaim:
        folder = Path(lock_dir or os.environ.get("SWA_GPU_LOCK_DIR") or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-")
        order = [(preferred + k) % count for k in range(count)]
        start = time.monotonic()
        waited = False
        while True:
            for index in order:
                lock = _flock(folder / f"swa_research-gpu{index}-of-{visible}.lock")
                try:
                    lock.acquire(blocking=False)
                except Timeout:
                    continue
                return cls(index, lock)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"all {count} GPUs are taken by other jobs")
            if not waited:
                log.info("all %d GPUs are taken by other jobs; waiting for one", count)
                waited = True
            time.sleep(poll_s)

    def release(self) -> None:
        self._lock.release()  # a no-op once released


def _holder() -> str:
    return (f"pid {os.getpid()} on host {socket.gethostname()} "
            f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")


class RunDirLock:
    """An exclusive lock on a run dir for the whole run: a second process started into the same
    dir (two jobs given one ``hydra.run.dir``) is refused instead of interleaving its files with
    the first's. The lock is an ``flock`` on ``RUN_DIR/.lock``, so the kernel releases it when
    the holder dies, however it dies: a later run takes it over. The file names the holder
    (pid, host, start time) for the refusal message; filelock (>= 3.30) opens it without
    truncating, so a refused process still reads the holder's line."""

    NAME = ".lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self._lock = _flock(self.path, blocking=False, on_acquired=self._name_holder)

    @staticmethod
    def _name_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)

    def acquire(self) -> None:
        from swa_research.config import UserError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:  # caught before OSError, which filelock's Timeout (a TimeoutError) is
            holder = self.path.read_text().strip() or "another process"
            raise UserError(f"run dir {self.path.parent} is in use by {holder}; wait for it to "
                            "end, or choose another output dir with hydra.run.dir=...") from None
        except OSError as e:  # a file system without locks: run unprotected, but say so
            log.warning("cannot lock %s (%s); two runs started into this dir would clash",
                        self.path, e.strerror or e)
            self.path.write_text(_holder())

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
