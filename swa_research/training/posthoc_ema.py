"""``trainer.posthoc_ema``: EDM2's post-hoc EMA (Karras et al. 2024, Section 3.2). Power-function
EMAs of the given relative widths (EDM2's pair: 0.05 and 0.10) are updated after every
optimizer step, from the first (their time t is the step), and their weights are saved every
``trainer.posthoc_ema_every`` steps and after the last one into ``RUN_DIR/posthoc_ema/
sigma_rel_<s>/`` (an ``index.json`` and ``itNNNNNN.pt`` files each, as the trajectory's
snapshots, in ``trainer.snapshot_dtype``: bf16 halves the disk and makes the reconstruction
approximate). After training, ``python -m swa_research.posthoc RUN_DIR --ema-sigma-rel ...``
reconstructs the EMA of any width at any saved step from them
(:func:`swa_research.averaging.power_ema.posthoc_ema_coefficients`). Under
``trainer.strategy=fsdp`` each rank updates its shards of the profiles and a saved profile is
the folder ``itNNNNNN/`` that ``torch.distributed.checkpoint`` writes (read whole in one
process by the post-hoc tool); a checkpoint keeps the profiles' shards with its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from swa_research.averaging.power_ema import PowerEMA
from swa_research.averaging.sharded import ShardedAverage
from swa_research.config import TrainerConfig
from swa_research.training.snapshots import SnapshotWriter

log = logging.getLogger(__name__)

FOLDER = "posthoc_ema"


def profile_folder(sigma_rel: float) -> str:
    return f"{FOLDER}/sigma_rel_{sigma_rel:g}"


def save_points(every: int, total: int) -> list[int]:
    """The steps after which the profiles are saved: every ``every`` and the last."""
    return sorted({*range(every, total + 1, every), total})


class PosthocEma:
    """The profiles (one power EMA each) and their writers. ``sharded`` (the model under
    ``trainer.strategy=fsdp``): every rank keeps its shards of each profile
    (:class:`~swa_research.averaging.sharded.ShardedAverage`), every rank calls each method,
    and a saved profile is a ``torch.distributed.checkpoint`` folder, each rank its shards;
    ``main``: this rank writes the indexes."""

    def __init__(self, model: nn.Module, run_dir: Path, cfg: TrainerConfig,
                 iters_per_epoch: int, total: int, main: bool = True,
                 sharded: bool = False) -> None:
        self.sigma_rels = [float(s) for s in cfg.posthoc_ema]
        self.model, self.sharded = model, sharded
        self.profiles: dict[float, Any] = {
            s: ShardedAverage(model, "power_ema", sigma_rel=s) if sharded
            else PowerEMA(model, sigma_rel=s, bn_update=False) for s in self.sigma_rels}
        points = save_points(cfg.posthoc_ema_every, total)
        self.writers = {s: SnapshotWriter(run_dir, cfg, iters_per_epoch, total, main=main,
                                          sharded=sharded, folder=profile_folder(s),
                                          points=points, every=cfg.posthoc_ema_every,
                                          what=f"post-hoc EMA profile sigma_rel={s:g}",
                                          every_key="trainer.posthoc_ema_every")
                        for s in self.sigma_rels}
        self.due = set(points)

    def prepare(self, iteration: int) -> None:
        for s, writer in self.writers.items():  # (the sharded model: its whole size)
            writer.prepare(self.model if self.sharded else self.profiles[s].module, iteration)

    def after_step(self, model: nn.Module, iteration: int) -> None:
        """Each profile takes the step's weights (the t-th point at step t); saved when due."""
        for s, profile in self.profiles.items():
            profile.update(model)
            if iteration in self.due:
                self.writers[s].save_state(profile.sharded_state_dict() if self.sharded
                                           else profile.module.state_dict(), iteration)

    def state_dict(self) -> dict[str, Any]:
        """What checkpoint.pt holds: each profile's state (sharded: its count and identity;
        the tensors go with the checkpoint's shards, :meth:`tensors`)."""
        return {f"{s:g}": p.meta() if self.sharded else p.state_dict()
                for s, p in self.profiles.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, profile in self.profiles.items():
            if self.sharded:
                profile.load_meta(state[f"{s:g}"])
            else:
                profile.load_state_dict(state[f"{s:g}"])

    def tensors(self) -> dict[str, Any]:
        """Sharded: each profile's DTensors, what the checkpoint's shards hold of them (and,
        their storage, what a resume loads into)."""
        return {f"{s:g}": p.tensors() for s, p in self.profiles.items()}
