"""Snapshots of the training model's weights for post-hoc averaging (``trainer.snapshot_every``).

Every ``trainer.snapshot_every`` ``trainer.snapshot_unit``\\ s (after the n-th iteration with
n % every == 0, or after the E-th epoch with E % every == 0) the training model's state dict
(parameters and buffers: BN statistics) is written to ``RUN_DIR/trajectory/itNNNNNN.pt``
(``{"state_dict", "iteration", "epoch"}``, on the CPU, in fp32 or bf16; integer buffers stay
integers), atomically, and ``trajectory/index.json`` is rewritten atomically after each one.
Under ``trainer.strategy=fsdp`` a snapshot is the folder ``trajectory/itNNNNNN/`` that
``torch.distributed.checkpoint`` writes, each rank its shards of ``{"state_dict": ...}``
(written as ``.itNNNNNN.tmp`` and renamed by rank 0 once complete);
:func:`swa_research.fileio.load_sharded_state` reads it whole in one process.

A snapshot is taken before the checkpoint of the same position is written, so on resume from a
checkpoint at iteration c every snapshot up to c is on disk; :meth:`SnapshotWriter.prepare`
rebuilds the index from the files up to c and removes the later ones (written after the
checkpoint, before the kill): they are taken again, and the trajectory has neither a gap nor a
duplicate. :func:`swa_research.analysis.posthoc` reads the trajectory back.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.config import TrainerConfig, UserError
from swa_research.fileio import atomic_torch_save, atomic_write_text, describe_write_error

log = logging.getLogger(__name__)

TRAJECTORY = "trajectory"
INDEX = "index.json"
FILE_RE = re.compile(r"^it(\d+)(\.pt)?$")  # a file, or a sharded snapshot's folder
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def snapshot_file(iteration: int, sharded: bool = False) -> str:
    return f"it{iteration:06d}" + ("" if sharded else ".pt")


def snapshot_points(unit: str, every: int, epochs: int, iters_per_epoch: int,
                    total: int = 0) -> range:
    """The iterations after which a snapshot is taken, in order (none when every is 0), in a
    budget of ``total`` steps (0: ``epochs`` whole epochs): a range, so that a plan of any
    budget costs nothing to hold."""
    total = total or epochs * iters_per_epoch
    if every <= 0:
        return range(0)
    step = every * iters_per_epoch if unit == "epoch" else every
    return range(step, total + 1, step)


def snapshot_state(state: dict[str, torch.Tensor], dtype: torch.dtype
                   ) -> dict[str, torch.Tensor]:
    """A state dict on the CPU, floating-point tensors in ``dtype``."""
    return {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype,
                             copy=True)
            for k, v in state.items()}


def bytes_per_snapshot(model: nn.Module, dtype: torch.dtype) -> int:
    """Parameters and buffers x bytes per element (floating point in ``dtype``): the tensor
    data of one snapshot, without the file format's few hundred bytes per tensor."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() * (size if v.is_floating_point() else v.element_size())
               for v in model.state_dict().values())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def read_index(run_dir: str | Path) -> dict[str, Any]:
    """The trajectory's index (a UserError when the run dir holds none)."""
    path = Path(run_dir) / TRAJECTORY / INDEX
    if not path.is_file():
        raise UserError(f"{run_dir} holds no snapshots ({TRAJECTORY}/{INDEX} not found); "
                        "train with trainer.snapshot_every=N to record them")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e})") from e
    check_index(index, path)
    return index


def check_index(index: Any, path: Path) -> None:
    """The index's layout, and every snapshot file a plain name inside ``trajectory/`` (an
    entry such as ``../../x.pt`` or an absolute path is refused, never followed)."""
    if not isinstance(index, dict):
        raise UserError(f"{path}: not a snapshot index (expected a JSON object)")
    missing = [k for k in ("unit", "every", "dtype", "snapshots") if k not in index]
    if missing:
        raise UserError(f"{path}: not a snapshot index (missing {', '.join(missing)})")
    if index["unit"] not in ("iter", "epoch") or not isinstance(index["every"], int) \
            or isinstance(index["every"], bool) or index["every"] < 1:
        raise UserError(f"{path}: unit must be iter or epoch and every a positive integer "
                        f"(got {index['unit']!r}, {index['every']!r})")
    entries = index["snapshots"]
    if not isinstance(entries, list):
        raise UserError(f"{path}: snapshots must be a list")
    if not entries:
        raise UserError(f"{path} lists no snapshots: the run stopped before its first one")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not all(
                isinstance(e.get(k), int) and not isinstance(e.get(k), bool)
                for k in ("iteration", "epoch")) or not isinstance(e.get("file"), str):
            raise UserError(f"{path}: snapshot entry {i} must hold integer iteration and "
                            f"epoch and a file name (got {e!r})")
        name = e["file"]
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise UserError(f"{path}: snapshot entry {i} names {name!r}, a file outside "
                            f"{TRAJECTORY}/; only files in {TRAJECTORY}/ are read")


def remove(path: Path) -> None:
    """A snapshot file or a sharded snapshot's folder, gone (nothing when absent)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class SnapshotWriter:
    """Takes the run's snapshots and keeps ``trajectory/index.json`` in step with them."""

    def __init__(self, run_dir: Path, cfg: TrainerConfig, iters_per_epoch: int, total: int = 0,
                 sharded: bool = False, main: bool = True, folder: str = TRAJECTORY,
                 points: Sequence[int] | None = None, every: int = 0,
                 what: str = "snapshots", every_key: str = "trainer.snapshot_every") -> None:
        # sharded: every rank takes part in each snapshot (its shards); main: this rank
        # writes the index and tidies the folder (rank 0). folder, points (iterations), every,
        # what: another series of weights kept the same way (trainer.posthoc_ema's profiles).
        self.sharded, self.main = sharded, main
        self.dir = Path(run_dir) / folder
        self.unit, self.every = cfg.snapshot_unit, cfg.snapshot_every
        self.dtype_name = cfg.snapshot_dtype
        self.dtype = DTYPES[cfg.snapshot_dtype]
        self.iters_per_epoch = iters_per_epoch
        self.what, self.every_key = what, every_key
        if points is not None:  # in iterations, every ``every`` of them (and maybe the last)
            self.unit, self.points, self.every = "iter", points, every
        else:
            self.points = snapshot_points(self.unit, self.every, cfg.epochs, iters_per_epoch,
                                          total)
        self.entries: list[dict[str, Any]] = []

    def due_after_iter(self, iteration: int) -> bool:
        return self.unit == "iter" and iteration % self.every == 0

    def due_after_epoch(self, epoch: int) -> bool:
        return self.unit == "epoch" and epoch % self.every == 0

    def epoch_of(self, iteration: int) -> int:
        return (iteration - 1) // self.iters_per_epoch + 1

    def prepare(self, model: nn.Module, iteration: int) -> None:
        """Before training (``iteration``: where it starts, 0 or a checkpoint's): log the plan
        and its disk cost, refuse one that does not fit the free space, and rebuild the index
        from the snapshots on disk up to ``iteration`` (later ones are removed)."""
        if not self.main:
            return
        per = bytes_per_snapshot(model, self.dtype)
        todo = self.points[bisect.bisect_right(self.points, iteration):]
        parent = self.dir
        while not parent.is_dir() and parent != parent.parent:
            parent = parent.parent  # the nearest folder that exists: its file system
        free = shutil.disk_usage(parent).free
        log.info("%s: %d (every %d %s%s, %s), %s each, %s in all into %s", self.what,
                 len(self.points), self.every, self.unit, "" if self.every == 1 else "s",
                 self.dtype_name, human(per), human(per * len(self.points)), self.dir)
        if per * len(todo) > free:
            raise UserError(
                f"{self.every_key}={self.every} ({self.unit}): {len(todo)} {self.what} of "
                f"{human(per)} need {human(per * len(todo))}, but {parent} has {human(free)} "
                "free; snapshot less often (a larger trainer.snapshot_every), in "
                "trainer.snapshot_dtype=bf16, or into another output dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):  # a write that a kill interrupted
            remove(tmp)
        wanted = set(self.points[:bisect.bisect_right(self.points, iteration)])
        on_disk: dict[int, Path] = {}
        for path in self.dir.glob("it*"):
            m = FILE_RE.match(path.name)
            if m:
                on_disk[int(m.group(1))] = path
        for n, path in sorted(on_disk.items()):
            if n not in wanted:  # after the checkpoint (taken again), or not in this plan
                remove(path)
        missing = sorted(wanted - set(on_disk))
        if missing:
            log.warning("%d snapshot(s) up to iteration %d are missing from %s (first: "
                        "iteration %d); the trajectory has a gap there", len(missing),
                        iteration, self.dir, missing[0])
        self.entries = [self._entry(n) for n in sorted(wanted & set(on_disk))]
        self._write_index()
        if self.entries:
            log.info("%s: %d on disk up to iteration %d", self.what, len(self.entries),
                     iteration)

    def save(self, model: nn.Module, iteration: int) -> None:
        self.save_state(model.state_dict(), iteration)

    def save_state(self, state: dict[str, torch.Tensor], iteration: int) -> None:
        """A state dict (under FSDP: of DTensors, every rank calling) as the snapshot after
        ``iteration``."""
        entry = self._entry(iteration)
        path = self.dir / entry["file"]
        try:
            if self.sharded:
                self._save_shards(state, path)
            else:
                atomic_torch_save({"state_dict": snapshot_state(state, self.dtype),
                                   "iteration": iteration, "epoch": entry["epoch"]}, path)
            if not self.main:
                return
            self.entries = [e for e in self.entries if e["iteration"] != iteration] + [entry]
            self._write_index()
        except OSError as e:  # as a failed checkpoint write: one line, nothing kept half-written
            last = self.entries[-1]["iteration"] if self.entries else None
            raise UserError(
                f"{describe_write_error(e, e.filename or path)}; training stopped (snapshot "
                f"at iteration {iteration}); "
                + (f"the snapshots up to iteration {last} and " if last else "")
                + "the last checkpoint are kept: free space (or snapshot less often) and rerun "
                "the same command to resume") from e

    def _save_shards(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """Every rank writes its shards (DTensors in the snapshot's dtype) into a hidden
        folder, which rank 0 renames to ``path`` once ``torch.distributed.checkpoint`` has
        written its metadata (the save's last step, after every rank's shards)."""
        import torch.distributed.checkpoint as dcp

        state = {k: v.detach().to(self.dtype) if v.is_floating_point() else v.detach()
                 for k, v in state.items()}
        tmp = path.with_name(f".{path.name}.tmp")
        dcp.save({"state_dict": state}, checkpoint_id=str(tmp))
        if self.main:
            remove(path)  # one a kill left after the checkpoint (prepare removes those too)
            tmp.rename(path)

    def _entry(self, iteration: int) -> dict[str, Any]:
        return {"iteration": iteration, "epoch": self.epoch_of(iteration),
                "file": snapshot_file(iteration, self.sharded)}

    def _write_index(self) -> None:
        index = {"unit": self.unit, "every": self.every, "dtype": self.dtype_name,
                 "iters_per_epoch": self.iters_per_epoch, "snapshots": self.entries}
        atomic_write_text(self.dir / INDEX, json.dumps(index, indent=1) + "\n")
