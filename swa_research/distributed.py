"""One run on several processes: PyTorch's DDP, started by torchrun or by SLURM (srun, submitit).

``torchrun --nproc-per-node N -m swa_research.train ...`` (or ``srun`` with one task per GPU)
starts N copies of the entry point; :func:`setup` (called by the entry point before Hydra runs)
reads the launcher's environment, joins the process group (NCCL for CUDA tensors, gloo for CPU
tensors) and makes every rank agree on the run id, so that all ranks name the same run dir.

What the rest of the project asks of the world: :func:`world` (rank, size; ``size == 1`` when
running alone, where every function here is a no-op), sums across ranks
(:func:`all_reduce_sum_`), objects gathered from every rank (:func:`gather_objects`), a check
that every rank got through a phase (:func:`agree`), a checksum comparison
(:func:`check_identical`) and the mean of BN buffers (:func:`average_buffers_`).

Collectives time out after ``SWA_DIST_TIMEOUT`` seconds (default 900): a rank that died or hangs
makes the others stop with an error (:class:`PeerFailed`) instead of waiting for ever.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from swa_research.averaging.base import mean_over_ranks
from swa_research.errors import UserError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "SWA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0


class PeerFailed(RuntimeError):
    """Another rank of this run failed, died or stopped answering."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = ""  # "torchrun", "slurm", "submitit" (local), or "" (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this run has several processes (collectives run between them). One
        process under a launcher (torchrun --nproc-per-node 1) trains alone."""
        return bool(self.launcher) and self.size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.launcher})" if self.launcher else \
            "one process"


_WORLD = World()


def world() -> World:
    return _WORLD


def from_env(env: Mapping[str, str] | None = None) -> World:
    """The world a launcher describes in the environment: torchrun's ``WORLD_SIZE``/``RANK``/
    ``LOCAL_RANK``, an ``srun`` step of several tasks (``SLURM_STEP_NUM_TASKS`` > 1: a batch
    script that only asked for several tasks runs alone), or a job of submitit's local executor
    with several tasks; otherwise one process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                     "torchrun")
    local_tasks = int(env.get("SUBMITIT_LOCAL_NTASKS", "1") or "1")
    if local_tasks > 1 and "SUBMITIT_LOCAL_GLOBALID" in env:
        return World(int(env["SUBMITIT_LOCAL_GLOBALID"]), local_tasks,
                     int(env.get("SUBMITIT_LOCAL_LOCALID", "0")), "submitit")
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or "1")
    if tasks > 1 and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", "0")), "slurm")
    return World()


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV}={raw}: expected a number of seconds > 0")
    return value


def _slurm_master(env: Mapping[str, str]) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT of an srun step: the step's first node, a port from the job
    id (the same on every task, different for jobs sharing a node)."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        host = out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        if "[" in nodes or "," in nodes:
            raise UserError(f"cannot find the first node of {nodes} (scontrol failed): set "
                            "MASTER_ADDR to the first node's address") from None
        host = nodes
    port = 15000 + int(env.get("SLURM_JOB_ID", "0") or "0") % 20000
    return host, str(port)


def setup() -> World:
    """Join the process group the launcher describes (once per process) and return the world.
    Alone, nothing happens."""
    global _WORLD
    if _WORLD.distributed:
        return _WORLD
    found = from_env()
    if not found.distributed:
        return _WORLD
    if found.launcher == "slurm":
        host, port = _slurm_master(os.environ)
        os.environ.setdefault("MASTER_ADDR", host)
        os.environ.setdefault("MASTER_PORT", port)
    elif found.launcher == "submitit":  # all tasks on this machine
        job = os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(15000 + int(job) % 20000 if job.isdigit()
                                                 else 29500))
    if not (0 <= found.rank < found.size):
        raise UserError(f"rank {found.rank} is not below the world size {found.size}")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, rank=found.rank, world_size=found.size,
                                timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:  # a missing variable, a rendezvous timeout
        raise UserError(f"cannot join the process group as {found.describe()}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    _WORLD = found
    return found


@contextlib.contextmanager
def group_of_one() -> Iterator[None]:
    """A process group of this process alone for the block (gloo over an in-memory store; the
    CUDA tensors' NCCL beside it when there is a GPU): what ``fully_shard`` needs to shard a
    model over one rank (``trainer.strategy=fsdp`` in one process, e.g. resuming a sharded
    checkpoint written by several). Nothing happens when a group exists already."""
    if dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # as teardown: the sharded model's cycles before the group they hold
        dist.destroy_process_group()


def teardown() -> None:
    """Leave the process group. A sharded model lives in reference cycles (FSDP's states and
    hooks) that hold the device mesh and, through it, the process group's C++ object with its
    threads; left to the interpreter's exit, their destruction aborted a rank now and then
    (std::terminate, SIGABRT, seen under load). They are collected here first, while the
    interpreter is whole."""
    global _WORLD
    gc.collect()
    if _WORLD.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def _failed(e: Exception) -> PeerFailed:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return PeerFailed(f"another rank of this run failed or stopped answering (rank "
                      f"{_WORLD.rank} of {_WORLD.size}: {first[:200]}); its log has the cause")


# What the collectives' errors say when a peer died or hangs (gloo, NCCL, the store).
_PEER_MARKERS = ("gloo", "nccl", "processgroup", "connection reset", "connection closed",
                 "timed out", "timeout", "broken pipe", "socket")


def as_peer_failure(e: BaseException) -> PeerFailed | None:
    """``e`` as a :class:`PeerFailed` when it is a collective that failed under DDP (raised
    inside torch, e.g. DDP's gradient all-reduce in the backward pass), else None."""
    if isinstance(e, PeerFailed):
        return e
    if not _WORLD.distributed or not isinstance(e, RuntimeError):
        return None
    if isinstance(e, getattr(dist, "DistError", ())) or any(
            m in str(e).lower() for m in _PEER_MARKERS):
        return _failed(e)
    return None


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over the ranks, in place."""
    if not _WORLD.distributed:
        return
    try:
        for t in tensors:
            dist.all_reduce(t)
    except (RuntimeError, ValueError) as e:
        raise _failed(e) from e


def broadcast_str(text: str, limit: int = 256) -> str:
    """Rank 0's ``text`` on every rank."""
    if not _WORLD.distributed:
        return text
    data = text.encode()[:limit]
    buf = torch.zeros(limit + 1, dtype=torch.uint8)
    buf[0] = len(data)
    buf[1:1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    try:
        dist.broadcast(buf, src=0)
    except (RuntimeError, ValueError) as e:
        raise _failed(e) from e
    return bytes(buf[1:1 + int(buf[0])].tolist()).decode()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not _WORLD.distributed:
        return [obj]
    out: list[Any] = [None] * _WORLD.size
    try:
        dist.all_gather_object(out, obj)
    except (RuntimeError, ValueError) as e:
        raise _failed(e) from e
    return out


def agree(error: BaseException | None, phase: str) -> None:
    """Every rank reports whether it got through ``phase``; where one did not, the others raise
    a UserError that names it and its error (the failed rank raises its own)."""
    if not _WORLD.distributed:
        return
    message = None if error is None else (str(error) or type(error).__name__)
    reports = gather_objects(message)
    if error is not None:
        return
    for rank, msg in enumerate(reports):
        if msg is not None:
            raise UserError(f"rank {rank} failed while {phase}: {msg}")


def barrier() -> None:
    if not _WORLD.distributed:
        return
    try:
        # Through the CPU backend: a barrier must not allocate on a GPU it does not know.
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s())) \
            if dist.get_backend() == "gloo" else dist.barrier()
    except (RuntimeError, ValueError) as e:
        raise _failed(e) from e


def weighted_mean_(tensors: list[Tensor], weight: float = 1.0) -> None:
    """Each tensor replaced by the mean of its values over the ranks, each rank's weighted by
    its ``weight`` (one all-reduce for all of them, in float64; the averaging core's
    :func:`~swa_research.averaging.base.mean_over_ranks`); unchanged where the weights sum to
    0. A failed collective reads as a peer's failure."""
    if not _WORLD.distributed:
        return
    try:
        mean_over_ranks(tensors, weight)
    except (RuntimeError, ValueError) as e:
        raise _failed(e) from e


def average_buffers_(module: nn.Module) -> None:
    """The floating-point buffers (BN running statistics) replaced by their mean over the
    ranks. DDP runs with ``broadcast_buffers=False``: every rank keeps the statistics of its own
    shard, and their mean is that of the whole batch's (the mean's update is linear)."""
    weighted_mean_([b for b in module.buffers() if b.is_floating_point()])


def checksum(tensors: Iterable[Tensor], chunk: int = 1 << 22) -> float:
    """A cheap fingerprint of tensors: the float64 sum of their values and of their values
    weighted by position (a swap of two values changes it). In chunks, so that a large tensor
    (SWAG's deviation matrix) needs no float64 copy of itself."""
    total = 0.0
    for t in tensors:
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        sums = torch.zeros(2, dtype=torch.float64, device=flat.device)
        for start in range(0, n, chunk):
            v = flat[start:start + chunk].double()
            w = torch.arange(start + 1, start + v.numel() + 1, device=v.device,
                             dtype=torch.float64)
            sums[0] += v.sum()
            sums[1] += (v * w).sum()
        a, b = sums.tolist()
        total += a + b / max(1, n)
    return total


def check_identical(named: Mapping[str, Iterable[Tensor]], where: str) -> None:
    """Compare each named group of tensors' checksum across the ranks; a difference is an
    error (weights that should be identical on every rank drifted apart)."""
    if not _WORLD.distributed:
        return
    mine = {name: checksum(ts) for name, ts in named.items()}
    ranks = gather_objects(mine)
    for name in mine:
        values = [r[name] for r in ranks]
        if any(v != values[0] for v in values):
            raise RuntimeError(
                f"{name} differs across ranks {where} (checksums "
                f"{', '.join(f'rank {i}: {v!r}' for i, v in enumerate(values))}); the ranks "
                "no longer train the same model")
