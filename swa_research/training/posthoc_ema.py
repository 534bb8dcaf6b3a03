"""``trainer.posthoc_ema``: EDM2's post-hoc EMA (Karras et al. 2024, Section 3.2). Power-function
EMAs of the given relative widths (EDM2's pair: 0.05 and 0.10) are updated after every
optimizer step, from the first (their time t is the step), and their weights are saved every
``trainer.posthoc_ema_every`` steps and after the last one into ``RUN_DIR/posthoc_ema/
sigma_rel_<s>/`` (an ``index.json`` and ``itNNNNNN.pt`` files each, as the trajectory's
snapshots, in ``trainer.snapshot_dtype``: bf16 halves the disk and makes the reconstruction
approximate). After training, ``python -m swa_research.posthoc RUN_DIR --ema-sigma-rel ...``
reconstructs the EMA of any width at any saved step from them
(:func:`swa_research.averaging.power_ema.posthoc_ema_coefficients`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from swa_research.averaging.power_ema import PowerEMA
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
    """The profiles (one :class:`PowerEMA` each) and their writers."""

    def __init__(self, model: nn.Module, run_dir: Path, cfg: TrainerConfig,
                 iters_per_epoch: int, total: int, main: bool = True) -> None:
        self.sigma_rels = [float(s) for s in cfg.posthoc_ema]
        self.profiles = {s: PowerEMA(model, sigma_rel=s, bn_update=False)
                         for s in self.sigma_rels}
        points = save_points(cfg.posthoc_ema_every, total)
        self.writers = {s: SnapshotWriter(run_dir, cfg, iters_per_epoch, total, main=main,
                                          folder=profile_folder(s), points=points,
                                          every=cfg.posthoc_ema_every,
                                          what=f"post-hoc EMA profile sigma_rel={s:g}",
                                          every_key="trainer.posthoc_ema_every")
                        for s in self.sigma_rels}
        self.due = set(points)

    def prepare(self, iteration: int) -> None:
        for s, writer in self.writers.items():
            writer.prepare(self.profiles[s].module, iteration)

    def after_step(self, model: nn.Module, iteration: int) -> None:
        """Each profile takes the step's weights (the t-th point at step t); saved when due."""
        for s, profile in self.profiles.items():
            profile.update(model)
            if iteration in self.due:
                self.writers[s].save(profile.module, iteration)

    def state_dict(self) -> dict[str, Any]:
        return {f"{s:g}": p.state_dict() for s, p in self.profiles.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, profile in self.profiles.items():
            profile.load_state_dict(state[f"{s:g}"])
