"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target,
so that a reader or a crash never sees half a file."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else
                                                        {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_in(e)
        if os_error is not None and (os_error is not e or not os_error.filename):
            # Name the file; torch.save wraps a failed write (ENOSPC) in a RuntimeError from its
            # C++ writer.
            raise OSError(os_error.errno, os_error.strerror, str(path)) from e
        raise


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError that caused ``e``, if any (itself, its cause or its context)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe_write_error(e: OSError, path: str | Path) -> str:
    """'no space left on device writing PATH', or 'cannot write PATH: reason'."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device writing {path}"
    return f"cannot write {path}: {e.strerror or e}"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Staged files that a killed writer left behind (``.NAME.*.tmp``, ``.NAME.staged``).

    Call only while holding the folder's run lock: another writer's files look the same."""
    removed = []
    for pattern in (".*.tmp", ".*.staged"):
        for p in Path(folder).glob(pattern):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def probe_writable(folder: str | Path) -> None:
    """Creates the folder if needed and writes and removes a file in it: an OSError now, not
    after the work whose results would go there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_torch_save(obj: object, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
