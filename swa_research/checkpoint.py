"""Training checkpoints: atomic writes that keep the previous good one, detection of corrupt
files, and the config check before a resume.

A run dir holds ``checkpoint.pt`` (the newest) and ``checkpoint.prev.pt`` (the one before).
A new checkpoint is written to a temporary file and fsynced; only then is the newest renamed
to ``.prev`` and the new one renamed into place, so at every instant at least one complete
checkpoint exists.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swa_research.config import UserError, flatten_dict
from swa_research.faults import fault_point
from swa_research.fileio import atomic_write

log = logging.getLogger(__name__)

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "config", "epoch", "iteration", "model", "optimizer", "scheduler",
                 "rng")
# Keys that may differ between a checkpoint and the run that resumes it: they change how the
# run is operated, not what it computes.
OPERATIONAL_KEYS = ("trainer.resume", "trainer.resume_override", "trainer.progress",
                    "trainer.num_workers", "trainer.checkpoint_every",
                    "trainer.save_checkpoints", "trainer.device", "logger.", "data.root",
                    "data.download", "data.cache")

# What a run computed with before a key existed: a checkpoint that lacks the key is compared as
# if it held this value (trainer.conv_algorithm came with Winograd; before it, oneDNN only).
LEGACY_VALUES = {"trainer.conv_algorithm": "native", "trainer.compile_mode": "default"}


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read or lacks what a resume needs."""


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": generator.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator,
                  device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as the newest checkpoint, keeping the previous one as ``.prev``.

    An OSError (full disk, unwritable dir) becomes a UserError; the last good checkpoint is
    untouched then."""
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    staged = run_dir / f".{LATEST}.staged"
    state = {"format": FORMAT_VERSION, **state}

    def write(f: Any) -> None:
        torch.save(state, f)
        fault_point("checkpoint_write")  # tests kill the process here: half a file on disk

    try:
        atomic_write(staged, write)
        if latest.exists():
            os.replace(latest, previous)
        os.replace(staged, latest)
        _fsync_dir(run_dir)
    except OSError as e:
        staged.unlink(missing_ok=True)
        kept = latest if latest.exists() else previous if previous.exists() else None
        raise UserError(
            f"cannot write checkpoint {latest}: {e.strerror or e}; training stopped"
            + (f", the last good checkpoint {kept} is kept" if kept else "")) from e
    return latest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check one checkpoint; CorruptCheckpoint names the file."""
    path = Path(path)
    try:
        # Our own files, with numpy/python RNG states inside: not loadable with weights_only.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CorruptCheckpoint(f"checkpoint {path} is not a swa_research training checkpoint")
    if state["format"] != FORMAT_VERSION:
        raise CorruptCheckpoint(f"checkpoint {path} has format {state['format']}, "
                                f"expected {FORMAT_VERSION}")
    return state


def find_resume_checkpoint(run_dir: Path, resume: str) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to resume from, or None to start afresh.

    resume: "never"; "auto" (the run dir's newest good checkpoint, else the previous one, else
    none); or a path (which must load)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not path.is_file():
            raise UserError(f"trainer.resume={resume}: no such checkpoint file")
        try:
            return load_checkpoint(path), path
        except CorruptCheckpoint as e:
            raise UserError(str(e)) from e
    for name in (LATEST, PREVIOUS):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            return load_checkpoint(path), path
        except CorruptCheckpoint as e:
            log.warning("%s; trying the previous one", e)
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that changes what the run computes."""
    a, b = flatten_dict(saved), flatten_dict(current)
    a.update({k: v for k, v in LEGACY_VALUES.items() if k in b and k not in a})
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    return diffs
