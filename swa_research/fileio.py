"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target,
so that a reader or a crash never sees half a file."""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def user_cache_dir() -> Path:
    """The user's cache folder for this project: ``$SWA_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/swa_research``, else ``~/.cache/swa_research``."""
    base = os.environ.get("SWA_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swa_research"
    return Path(base).expanduser()


def own_writable(folder: Path) -> bool:
    """Whether ``folder`` is writable and this user's: where files may be written beside a
    user's data (never into a system folder that root happens to be able to write)."""
    try:
        owner = folder.stat().st_uid
    except OSError:
        return False
    mine = owner == os.getuid() if hasattr(os, "getuid") else True
    return mine and os.access(folder, os.W_OK)


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


def load_sharded_state(folder: str | Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    """The whole state dict that ``torch.distributed.checkpoint`` wrote under ``key`` into
    ``folder`` (each rank its shards: a sharded snapshot, a sharded final weight folder), read
    in this one process without ``torch.distributed``, every tensor whole on the CPU. An
    OSError or ValueError when the folder is not such a checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    try:
        meta = reader.read_metadata()
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign .metadata file
        raise ValueError(f"{folder}: not a torch.distributed.checkpoint folder ({e})") from e
    prefix = key + "."
    out = {name[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
           for name, m in meta.state_dict_metadata.items()
           if name.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not out:
        raise ValueError(f"{folder}: holds no tensors under {key!r}")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: out}, storage_reader=reader, no_dist=True)
    return out


DCP_SUFFIX = ".dcp"  # trainer.fsdp.final_format=dcp: sgd_final.dcp/ in place of sgd_final.pt
DCP_INFO = "info.pt"  # what such a folder holds besides its sharded state dict


def weights_location(path: str | Path) -> Path | None:
    """Where the weights ``path`` names are: the file, or the folder ``torch.distributed.
    checkpoint`` wrote in its place (``X.dcp`` for ``X.pt``, or ``path`` itself a folder);
    None when neither is there."""
    path = Path(path)
    for candidate in (path, path.with_suffix(DCP_SUFFIX)):
        if candidate.is_file() or (candidate / ".metadata").is_file():
            return candidate
    return None


def read_weights(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A weights file's contents (``{"state_dict": ..., "config": ..., ...}``), from a ``.pt``
    file or from a sharded folder (:func:`weights_location`), whose state dict is read whole
    in this process. FileNotFoundError when neither is there."""
    found = weights_location(path)
    if found is None:
        raise FileNotFoundError(2, "no such weights file or folder", str(path))
    if found.is_file():
        return torch.load(found, map_location=map_location, weights_only=True)
    info = torch.load(found / DCP_INFO, map_location="cpu", weights_only=True)
    state = load_sharded_state(found)
    if map_location not in (None, "cpu"):
        state = {k: v.to(map_location) for k, v in state.items()}
    return {**info, "state_dict": state}
