"""File locks for work that several jobs on one machine may start at once: downloading a data
set, building its decode cache, choosing a GPU."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


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
    dies). Says so when it has to wait."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process %s (lock %s)", what, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class GpuClaim:
    """One GPU of several for this process, held through a lock file per GPU until
    :meth:`release` (or the process ends). Jobs that share a machine (joblib, several W&B
    agents) thus take different GPUs; a job waits while every GPU is taken."""

    def __init__(self, index: int, handle: IO[Any]) -> None:
        self.index = index
        self._handle: IO[Any] | None = handle

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
                handle = open(folder / f"swa_research-gpu{index}-of-{visible}.lock", "a+")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                return cls(index, handle)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"all {count} GPUs are taken by other jobs")
            if not waited:
                log.info("all %d GPUs are taken by other jobs; waiting for one", count)
                waited = True
            time.sleep(poll_s)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class RunDirLock:
    """An exclusive lock on a run dir for the whole run: a second process started into the same
    dir (two jobs given one ``hydra.run.dir``) is refused instead of interleaving its files with
    the first's. The lock is an ``flock`` on ``RUN_DIR/.lock``, so the kernel releases it when
    the holder dies, however it dies: a later run takes it over. The file names the holder
    (pid, host, start time) for the refusal message."""

    NAME = ".lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self._handle: IO[Any] | None = None

    def acquire(self) -> None:
        from swa_research.config import UserError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"run dir {self.path.parent} is in use by {holder}; wait for it to "
                            "end, or choose another output dir with hydra.run.dir=...") from None
        except OSError as e:  # a file system without locks: run unprotected, but say so
            log.warning("cannot lock %s (%s); two runs started into this dir would clash",
                        self.path, e.strerror or e)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} "
                     f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
