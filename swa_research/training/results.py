"""What a run reports besides its evaluations: the lines it starts with, its training
throughput and model FLOPs utilization, and the contents of metrics.json. The trainer is read
through a protocol, so that it imports this module and not the other way round."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from swa_research.tracking.outputs import run_metrics
from swa_research.tracking.progress import batch_lines, start_lines
from swa_research.training.speed import mfu

log = logging.getLogger(__name__)


class Run(Protocol):
    """What this module reads of the trainer (:class:`swa_research.training.trainer.Trainer`)."""

    cfg: Any
    config_dict: dict[str, Any]
    plan: Any
    data: Any
    ranks: Any
    evaluator: Any
    averages: dict[str, Any]
    task: Any
    device: Any
    model_info: dict[str, Any]
    peak_tflops: float | None
    calibration: dict[str, Any] | None
    iteration: int
    start_epoch: int
    partial: dict[str, Any] | None
    images_seen: int
    train_time: float


def world_size(t: Run) -> int:
    return t.ranks.world.size if t.ranks.distributed else 1


def run_mfu(t: Run, per_s: float) -> float | None:
    """The model FLOPs utilization at ``per_s`` training units a second (all ranks)."""
    return mfu(t.model_info.get("flops_per_unit"), per_s, t.peak_tflops, world_size(t))


def run_results(t: Run, status: str, wall: float, error: str | None = None) -> dict[str, Any]:
    """The contents of metrics.json (:func:`swa_research.tracking.outputs.run_metrics`), with
    the MFU and the non-finite results."""
    ev = t.evaluator
    out = run_metrics(status, wall, error, epochs=t.cfg.epochs, iterations=t.iteration,
                      sgd=ev.last_sgd, best=ev.best, averages=ev.last_avg,
                      names=list(t.averages), calibration=t.calibration,
                      model=t.model_info, images_seen=t.images_seen,
                      train_time=t.train_time, device=t.device, task=t.task.spec)
    out["train"]["mfu"] = run_mfu(t, t.images_seen / t.train_time) if t.train_time > 0 else None
    out["split"] = split_record(t.config_dict, t.data)
    # Each average's bytes on this process (under FSDP its shards: rank 0's) and whole.
    out["train"]["average_bytes"] = {
        name: {"this_rank": a.nbytes(), "whole": getattr(a, "whole_nbytes", a.nbytes)()}
        for name, a in t.averages.items()}
    if ev.nonfinite:
        out["nonfinite"] = dict(ev.nonfinite)
    return out


def split_record(config: dict[str, Any], data: Any) -> dict[str, Any]:
    """Which examples the run held out: the validation split's seed (``data.split_seed``, the
    same for every training seed), its share and size. Runs whose records differ held out
    different examples and are never ranked against each other."""
    d = config.get("data", {})
    return {"seed": d.get("split_seed"), "val_fraction": d.get("val_fraction"),
            "val_size": None if data.val is None else len(data.val)}


def log_start(t: Run) -> None:
    """The model, budget and data; where a resume starts; how a step's batch is made."""
    d = t.data
    log.info("%s", start_lines(t.model_info["name"], t.model_info["parameters"], t.cfg.epochs,
                               t.plan.iters_per_epoch, t.device,
                               (len(d.train), d.val and len(d.val), len(d.test))))
    if t.start_epoch > 1 or t.partial is not None:
        log.info("resumed at iteration %d (epoch %d)", t.iteration,
                 t.start_epoch - (t.partial is None))
    for line in batch_lines(t.cfg.batch_size, t.cfg.grad_accum, world_size(t),
                            getattr(d.train, "block_size", None),
                            "FSDP" if t.cfg.strategy == "fsdp" else "DDP"):
        log.info("%s", line)
