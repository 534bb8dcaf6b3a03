"""What a checkpoint of a run holds, writing it (also on a preemption signal) and resuming from
it: everything a resume needs to continue bit for bit (the model, optimizer, schedule, averages,
evaluations so far, history, random state, the position inside an epoch and, under DDP, what
differs between the ranks). The file format is :mod:`swa_research.training.checkpoint`."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from swa_research.averaging import PRIMARY
from swa_research.averaging.sharded import is_sharded
from swa_research.errors import UserError
from swa_research.tracking.runs import LATEST, PREVIOUS
from swa_research.training.checkpoint import (
    CorruptCheckpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from swa_research.training.fsdp import (
    load_shards,
    remove_unreferenced_shards,
    save_shards,
    shard_entries,
    shards_dir,
)
from swa_research.training.preemption import REQUEUE_EXIT_CODE, Preempted
from swa_research.training.ranks import buffers_of, load_buffers, networks_of


class Trainer(Protocol):
    """What a checkpoint holds of the trainer (:class:`swa_research.training.trainer.Trainer`);
    a protocol, so that the trainer imports this module and not the other way round."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    averages: dict[str, Any]
    evaluator: Any
    loggers: Any
    ranks: Any
    step: Any
    signals: Any
    generator: torch.Generator
    device: Any
    config_dict: dict[str, Any]
    run_dir: Path
    history: list[dict[str, Any]]
    partial: dict[str, Any] | None
    window: Any  # the loop's Window: the steps since the last evaluation by steps
    posthoc_ema: Any  # trainer.posthoc_ema's profiles, or None
    cfg: Any
    task: Any
    iteration: int
    start_epoch: int
    train_time: float
    images_seen: int
    wall_before: float

log = logging.getLogger(__name__)


def trainer_state(t: Trainer, epoch: int, partial: dict[str, Any] | None, wall: float
                  ) -> dict[str, Any]:
    """The checkpoint's contents after ``epoch`` completed epochs (and ``partial``: a position
    inside the next). Under DDP every rank takes part (the ranks' own parts are gathered)."""
    return {
        "config": t.config_dict,
        "epoch": epoch,  # completed epochs
        "iteration": t.iteration,
        "partial": partial,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "averages": {name: a.state_dict() for name, a in t.averages.items()},
        **t.evaluator.state_dict(),
        "history": t.history,
        "scaler": t.step.scaler.state_dict(),
        "rng": rng_state(t.generator, t.device),
        "timing": {"train_time": t.train_time, "images_seen": t.images_seen,
                   "wall": t.wall_before + wall},
        "window": _window_totals(t),
        "posthoc_ema": None if t.posthoc_ema is None else t.posthoc_ema.state_dict(),
        # Under DDP, what differs between the ranks: their RNG (dropout) and the BN running
        # statistics of their shards (the model's and those the averages copied).
        "ranks": t.ranks.gather({"rng": rng_state(t.generator, t.device),
                                 "buffers": buffers_of(networks_of(t.model, t.averages))}),
    }


def _window_totals(t: Trainer) -> dict[str, Any] | None:
    """The steps since the last evaluation by steps (trainer.eval_every_steps): their metric
    sums and count over the ranks (a collective under DDP, made by every rank), on the CPU."""
    if not t.cfg.eval_every_steps:
        return None
    sums, seen = t.window.totals(t.ranks, len(t.task.spec.metrics), t.device)
    return {"sums": sums.cpu(), "seen": seen}


def write_checkpoint(t: Trainer, epoch: int, partial: dict[str, Any] | None = None,
                     wall: float = 0.0) -> Path:
    """Every rank takes part (the state gathers the ranks' own parts); rank 0 writes, and the
    others wait for it, so that no rank exits before the checkpoint is on disk. Under FSDP the
    sharded parts are written first, each rank its shards (:mod:`.fsdp`), and checkpoint.pt
    names their folder."""
    sharded = is_sharded(t.model)
    if sharded:
        folder = shards_dir(t.run_dir, t.iteration)
        save_shards(t, folder)
        t.ranks.barrier()  # every rank's shards on disk before checkpoint.pt names them
    state = trainer_state(t, epoch, partial, wall)
    if sharded:
        state.update(shard_entries(t, folder))
    path = t.run_dir / LATEST
    if t.ranks.is_main:
        path = save_checkpoint(t.run_dir, state)
        if sharded:
            remove_unreferenced_shards(t.run_dir, named_shards(t.run_dir))
    t.ranks.barrier()
    return path


def named_shards(run_dir: Path) -> set[str]:
    """The shard folders the run dir's checkpoints name."""
    names = set()
    for name in (LATEST, PREVIOUS):
        try:
            state = load_checkpoint(Path(run_dir) / name)
        except (FileNotFoundError, CorruptCheckpoint):
            continue
        if state.get("shards"):
            names.add(state["shards"]["dir"])
    return names


def preempt(t: Trainer, epoch: int, partial: dict[str, Any] | None, wall: float = 0.0) -> None:
    """Checkpoint at the current position (inside ``epoch``, or before it when ``partial`` is
    None) and stop with the requeue status."""
    signum = t.signals.signum or signal.SIGTERM
    if partial is not None:
        partial = partial_with_ranks(t, partial)
    path = write_checkpoint(t, epoch - 1, partial, wall)
    why = signal.Signals(signum).name + " received" if t.signals.signum is not None \
        else "another rank was signalled"
    log.warning("%s: checkpoint %s written at iteration %d; exiting with status %d for a "
                "requeue", why, path, t.iteration, REQUEUE_EXIT_CODE)
    raise Preempted(signum)


def partial_with_ranks(t: Trainer, partial: dict[str, Any]) -> dict[str, Any]:
    """A mid-epoch position under DDP: each rank's sums of the epoch so far (a resume on as
    many ranks continues them bit for bit), and their totals (for another number of ranks)."""
    ranks = t.ranks.gather([partial["sums"].cpu(), partial["seen"]])
    if ranks is None:
        return partial
    return {**partial, "rank_sums": ranks, "sums": sum(r[0].double() for r in ranks),
            "seen": sum(r[1] for r in ranks)}


def _sums_of(part: dict[str, Any]) -> torch.Tensor:
    """The epoch's metric sums of a saved position (a checkpoint from before tasks kept the
    loss sum and the correct count apart)."""
    if "sums" in part:
        return part["sums"].double()
    return torch.stack([part["loss_sum"].double().reshape(()),
                        part["correct"].double().reshape(())])


def _rank_entry(entry: Any) -> tuple[torch.Tensor, int]:
    if len(entry) == 3:  # (loss_sum, correct, seen): before tasks
        return _sums_of({"loss_sum": entry[0], "correct": entry[1]}), entry[2]
    return entry[0].double(), entry[1]


def load_trainer_state(t: Trainer, state: dict[str, Any]) -> None:
    """Continue ``t`` from a checkpoint's contents."""
    if bool(state.get("shards")) != is_sharded(t.model):
        raise UserError("cannot resume: the checkpoint was written " + (
            "under trainer.strategy=fsdp; resume it with trainer.strategy=fsdp" if
            state.get("shards") else "without FSDP; resume it with the strategy it was "
            "written with (trainer.strategy=ddp or single)"))
    _check_posthoc_ema(t, state)
    if state.get("shards"):  # written under FSDP: on any number of ranks
        load_shards(t, t.run_dir, state)
        state = {**state, "best_state": t.evaluator.best_state, "averages": {}}
    else:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        t.step.scaler.load_state_dict(state["scaler"])
    saved = state.get("averages")
    if saved is None:  # a checkpoint of format 2 from before named averages: one, "swa"
        saved = {} if state.get("averager") is None else {PRIMARY: state["averager"]}
    if saved and set(saved) != set(t.averages) and any(saved.values()):
        raise KeyError(f"the checkpoint holds the averages {sorted(saved)}, this run "
                       f"keeps {sorted(t.averages)}")
    for name, average in t.averages.items():
        if saved.get(name) is not None:
            average.load_state_dict(saved[name])
    t.evaluator.load_state_dict(state)
    t.history = [dict(r) for r in state["history"]]
    t.loggers.restore_history(t.history)
    t.iteration = state["iteration"]
    t.partial = _load_partial(t, state["partial"])
    t.start_epoch = state["epoch"] + 1
    timing = state["timing"]
    t.train_time, t.images_seen = timing["train_time"], timing["images_seen"]
    t.wall_before = timing["wall"]
    if t.posthoc_ema is not None and state.get("posthoc_ema"):
        t.posthoc_ema.load_state_dict(state["posthoc_ema"])
    window = state.get("window")
    if window is not None and (t.ranks.is_main or not t.ranks.distributed):
        t.window.sums, t.window.seen = window["sums"].to(t.device), window["seen"]
    set_rng_state(state["rng"], t.generator, t.device)
    _load_rank_state(t, state.get("ranks"))


def _check_posthoc_ema(t: Trainer, state: dict[str, Any]) -> None:
    """The run's post-hoc EMA profiles are the checkpoint's: a profile's time counts the steps
    from the first, so one cannot start midway (its saved times would be wrong)."""
    if t.posthoc_ema is None:
        return
    mine = sorted(f"{s:g}" for s in t.posthoc_ema.sigma_rels)
    saved = sorted(state.get("posthoc_ema") or {})
    if saved != mine:
        raise UserError(
            f"cannot resume: this run keeps post-hoc EMA profiles of sigma_rel {mine} "
            f"(trainer.posthoc_ema), the checkpoint at iteration {state['iteration']} "
            f"holds {saved or 'none'}; a profile's time counts the steps "
            "from the first, so profiles cannot be added midway: resume with the checkpoint's "
            "trainer.posthoc_ema, or start afresh in another output dir")


def _load_partial(t: Trainer, part: dict[str, Any] | None) -> dict[str, Any] | None:
    if part is None:
        return None
    part = dict(part)
    ranks = part.pop("rank_sums", None)
    sums, seen = _sums_of(part), part["seen"]
    mine = t.ranks.own(ranks)
    if mine is not None:
        sums, seen = _rank_entry(mine)
    elif t.ranks.distributed and not t.ranks.is_main:  # the totals continue on rank 0
        sums, seen = torch.zeros_like(sums), 0
    part.pop("loss_sum", None)
    part.pop("correct", None)
    return {**part, "sums": sums, "seen": seen}


def _load_rank_state(t: Trainer, ranks: list[dict[str, Any]] | None) -> None:
    if ranks is None or not t.ranks.distributed:
        return
    mine = t.ranks.own(ranks)
    if mine is None:
        log.warning("the checkpoint was written by %d ranks, this run has %d: every rank "
                    "continues from rank 0's BN running statistics and random state",
                    len(ranks), t.ranks.world.size)
        return
    load_buffers(networks_of(t.model, t.averages), mine["buffers"])
    set_rng_state(mine["rng"], t.generator, t.device)
