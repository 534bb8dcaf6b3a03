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
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swa_research.config import UserError, flatten_dict
from swa_research.fileio import atomic_write, describe_write_error
from swa_research.tracking.runs import LATEST, PREVIOUS

log = logging.getLogger(__name__)

# 2: loadable with torch.load(weights_only=True) (the numpy RNG state as a tensor and numbers).
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "config", "epoch", "iteration", "model", "optimizer", "scheduler",
                 "rng")
# Keys that may differ between a checkpoint and the run that resumes it: they change how the
# run is operated, not what it computes.
OPERATIONAL_KEYS = ("trainer.resume", "trainer.resume_override", "trainer.progress",
                    "trainer.num_workers", "trainer.checkpoint_every",
                    "trainer.save_checkpoints", "trainer.keep_checkpoint", "trainer.device",
                    "trainer.strategy", "logger.", "data.root",
                    "data.download", "data.cache", "trainer.peak_tflops")

# What a run computed with before a key existed: a checkpoint that lacks the key is compared as
# if it held this value.
LEGACY_VALUES = {"trainer.compile_mode": "default", "swa.also": [], "swa.max_models": 20,
                 "swa.swag_scale": 0.5, "swa.swag_diag_scale": 0.5, "swa.samples": 30,
                 "swa.swag_device": "auto",
                 "swa.swag_eval_every": 0, "swa.ema_warmup": False,
                 "trainer.snapshot_every": 0, "trainer.snapshot_unit": "epoch",
                 "trainer.snapshot_dtype": "fp32", "model.sync_bn": False,
                 "trainer.eval_at_start": False, "trainer.limit_train_batches": 0,
                 "trainer.limit_eval_batches": 0, "trainer.overfit_batches": 0,
                 "data.subset": 0,
                 # the task seam, language models, schedule-free AdamW, FGE, init weights
                 "task.name": "classification", "data.tokenizer": "char",
                 "data.pattern": "*.txt", "data.test_fraction": 0.0,
                 "data.windows_per_epoch": 0, "data.eval_tokens": 0,
                 "optimizer.no_decay": [], "optimizer.grad_clip": 0.0,
                 "optimizer.weight_lr_power": 2.0, "optimizer.r": 0.0,
                 "schedule.warmup": 0, "schedule.cooldown": 0.2,
                 "schedule.cooldown_shape": "linear", "schedule.fge_cycle": 4,
                 "schedule.fge_lr_high": 0.05, "swa.lawa_k": 5, "trainer.grad_accum": 1,
                 "trainer.init_weights": None}
# Keys that no longer exist: a checkpoint that holds one still resumes (trainer.conv_algorithm
# chose CPU convolution kernels, which changed rounding only).
RETIRED_KEYS = ("trainer.conv_algorithm",)


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read or lacks what a resume needs."""


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # Plain numbers and a tensor, not numpy objects: the file loads with weights_only=True.
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
        "data": generator.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator,
                  device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
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

    try:
        atomic_write(staged, lambda f: torch.save(state, f))
        if latest.exists():
            os.replace(latest, previous)
        os.replace(staged, latest)
        _fsync_dir(run_dir)
    except OSError as e:
        staged.unlink(missing_ok=True)
        kept = latest if latest.exists() else previous if previous.exists() else None
        raise UserError(
            f"{describe_write_error(e, latest)}; training stopped"
            + (f", the last good checkpoint {kept} is kept" if kept else "")) from e
    return latest


def remove_finished_checkpoints(run_dir: Path, keep_latest: bool) -> None:
    """After a run is committed (metrics.json written): its training checkpoints are several
    times the size of its weights and no longer needed to resume. ``keep_latest`` keeps
    checkpoint.pt (``trainer.keep_checkpoint``: to extend or analyse the run later)."""
    for name in (PREVIOUS,) if keep_latest else (PREVIOUS, LATEST):
        try:
            (Path(run_dir) / name).unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove %s: %s", Path(run_dir) / name, e.strerror or e)
    # A sharded run's (FSDP) shard folders: all, or all but the kept checkpoint's.
    keep = set()
    if keep_latest and (Path(run_dir) / LATEST).is_file():
        try:
            keep.add((load_checkpoint(Path(run_dir) / LATEST).get("shards") or {}).get("dir"))
        except CorruptCheckpoint:
            pass
    for folder in Path(run_dir).glob(".shards.it*"):
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


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
    """Load and sanity-check one checkpoint; CorruptCheckpoint names the file.

    The file is read with ``weights_only=True``: only tensors, numbers, strings and containers
    of them; a pickle that names any other object is refused before it can run."""
    path = Path(path)
    try:
        # Never unpickle arbitrary objects: a crafted checkpoint.pt would run its code here.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise CorruptCheckpoint(
                f"checkpoint {path} holds objects other than tensors and numbers (an older "
                "format, or a crafted file): refused, as loading it could run code") from e
        raise CorruptCheckpoint(_corrupt(path, e)) from e
    except Exception as e:
        raise CorruptCheckpoint(_corrupt(path, e)) from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CorruptCheckpoint(f"checkpoint {path} is not a swa_research training checkpoint")
    if state["format"] != FORMAT_VERSION:
        raise CorruptCheckpoint(f"checkpoint {path} has format {state['format']}, "
                                f"expected {FORMAT_VERSION}")
    return state


def _corrupt(path: Path, e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch's weights-only unpickler puts the reason after a paragraph of advice.
    marker = [i for i, ln in enumerate(lines) if ln.startswith("Please file an issue")]
    detail = lines[marker[0] + 1] if marker and marker[0] + 1 < len(lines) else (
        lines[0] if lines else "")
    detail = detail.removeprefix("WeightsUnpickler error:").strip()
    return f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {detail[:200]})"


def find_resume_checkpoint(run_dir: Path, resume: str) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to resume from, or None to start afresh.

    resume: "never"; "auto" (the run dir's newest good checkpoint, else the previous one, else
    none when there is neither); or a path (which must load). When every checkpoint the run
    dir holds is unreadable, nothing is touched: a UserError names them, and
    ``trainer.resume=never`` is the explicit way to start over."""
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
    present = [Path(run_dir) / n for n in (LATEST, PREVIOUS) if (Path(run_dir) / n).is_file()]
    errors: list[str] = []
    for i, path in enumerate(present):
        try:
            state = load_checkpoint(path)
        except CorruptCheckpoint as e:
            errors.append(str(e))
            if i + 1 < len(present):
                log.warning("%s; trying the previous one, %s", e, present[i + 1])
            continue
        return state, path
    if errors:
        what = "; ".join(errors) if len(errors) > 1 else errors[0]
        raise UserError(f"cannot resume: {what}; nothing was changed. Start over in this dir "
                        "with trainer.resume=never, or choose another output dir")
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that changes what the run computes."""
    a, b = flatten_dict(saved), flatten_dict(current)
    for key in RETIRED_KEYS:
        a.pop(key, None)
    a.update({k: v for k, v in LEGACY_VALUES.items() if k in b and k not in a})
    if "data.split_seed" in b and "data.split_seed" not in a and "seed" in a:
        # Before data.split_seed, the validation split was drawn with the training seed.
        a["data.split_seed"] = a["seed"]
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
    return diffs
