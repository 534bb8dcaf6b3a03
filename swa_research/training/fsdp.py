"""``trainer.strategy=fsdp``: the model sharded with FSDP2 (``torch.distributed.fsdp.
fully_shard``, as torchtitan) over the ranks torchrun or srun started, and every average sharded
beside it (:mod:`swa_research.averaging.sharded`: each rank averages its own shards, no
collective per update, 1/N of the memory).

``fully_shard`` goes on each module whose class is named in ``trainer.fsdp.wrap`` (default: the
model's blocks, the GPT's ``Block``), then on the root. On CUDA the parameters are all-gathered
and computed in bf16 with gradients reduced in fp32 (``MixedPrecisionPolicy``); on the CPU all
in fp32. A model with batch norm is refused (FSDP does not shard BN statistics: use DDP).

Checkpoints: the sharded parts (the model, the optimizer, every average, the best validation
epoch's weights) are written with ``torch.distributed.checkpoint``, each rank its own shards,
into ``.shards.itNNNNNNNN/`` beside ``checkpoint.pt``, which rank 0 then writes as always (the
commit point) naming that folder; folders no checkpoint names are removed after. A kill at any
point leaves the previous checkpoint and its folder whole. A resume loads the shards on any
number of ranks (``torch.distributed.checkpoint`` reshards them), one included: in one process
the run shards over a process group of one (:func:`swa_research.distributed.group_of_one`).

Every averaging method is sharded. Not built yet, refused in one line before training:
schedule-free AdamW. Evaluation is split over the ranks as under DDP (each forward being a
collective, a rank whose slice is shorter repeats a batch, uncounted); the final weights are
gathered one tensor at a time and written whole by rank 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.averaging import has_batch_norm
from swa_research.averaging.sharded import SHARDED_METHODS, WEIGHT_METHODS, is_sharded
from swa_research.errors import UserError

__all__ = ["check_fsdp", "is_sharded", "shard_model"]

# The blocks fully_shard wraps by default, by the model registry's name.
DEFAULT_WRAP = {"gpt": ["Block"]}


def check_fsdp(config: Any) -> None:
    """What ``trainer.strategy=fsdp`` does not support yet, refused before anything is built."""
    t = config.trainer
    from swa_research.training.averages import average_config, average_names

    offloaded = [n for n in average_names(config.swa)
                 if average_config(config.swa, n).offload == "cpu"]
    if t.strategy != "fsdp":
        if offloaded:
            raise UserError(f"swa.offload=cpu (averages {', '.join(offloaded)}): host memory "
                            "holds a sharded model's averages; it needs trainer.strategy=fsdp")
        if t.fsdp.final_format != "whole":
            raise UserError(f"trainer.fsdp.final_format={t.fsdp.final_format} writes a sharded "
                            "model's weights rank by rank: it needs trainer.strategy=fsdp")
        return
    refused = []
    methods = sorted(set(average_names(config.swa).values()) - set(SHARDED_METHODS))
    heavy = sorted({average_names(config.swa)[n] for n in offloaded} - set(WEIGHT_METHODS))
    if heavy:
        refused.append(f"swa.offload=cpu for {', '.join(heavy)} (host memory takes "
                       f"{', '.join(WEIGHT_METHODS)} averages)")
    if methods:
        refused.append(f"swa averages {', '.join(methods)} (a sharded model is averaged with "
                       f"{', '.join(SHARDED_METHODS)})")
    if config.optimizer.name == "adamw_schedulefree":
        refused.append("optimizer=adamw_schedulefree")
    if refused:
        raise UserError("trainer.strategy=fsdp: not supported yet with " + "; ".join(refused))


def shard_model(model: nn.Module, model_name: str | None, wrap: list[str],
                reshard_after_forward: bool, device: torch.device) -> nn.Module:
    """``model`` with ``fully_shard`` on each module of a class in ``wrap`` (empty: the
    registry's default for ``model_name``), then on the root; in place, returned."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if has_batch_norm(model):
        raise UserError(f"trainer.strategy=fsdp: model={model_name} has batch norm, whose "
                        "statistics FSDP does not shard; use trainer.strategy=ddp")
    if any(not p.is_contiguous() for p in model.parameters()):
        raise UserError("trainer.strategy=fsdp: FSDP shards contiguous parameters only, and "
                        f"model={model_name}'s are in channels-last memory; set "
                        "trainer.channels_last=false")
    classes = list(wrap) or DEFAULT_WRAP.get(str(model_name), [])
    units = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    if not units:
        names = sorted({type(m).__name__ for m in model.modules()})
        raise UserError(f"trainer.fsdp.wrap={classes}: no module of model={model_name} is of "
                        f"these classes; name the blocks to shard, e.g. one of "
                        f"{', '.join(names[:12])}")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    return model


SHARDS_PREFIX = ".shards.it"


def shards_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / f"{SHARDS_PREFIX}{iteration:010d}"


def sharded_tensors(t: Any, averages: dict[str, Any] | None = None, posthoc: bool = True
                    ) -> dict[str, Any]:
    """The sharded parts of a run's state, as ``torch.distributed.checkpoint`` reads and
    writes them: the model, the optimizer, each average's tensors, the post-hoc EMA profiles
    (trainer.posthoc_ema; with ``posthoc``) and the best validation epoch's weights (when
    kept). ``averages``: the ring lengths to make ready for a load."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    parts: dict[str, Any] = {
        "model": get_model_state_dict(t.model),
        "optimizer": get_optimizer_state_dict(t.model, t.optimizer),
        "averages": {n: a.tensors(None if averages is None else averages[n]["ring"])
                     for n, a in t.averages.items()},
    }
    if posthoc and t.posthoc_ema is not None:
        parts["posthoc_ema"] = t.posthoc_ema.tensors()
    if t.evaluator.best_state is not None:
        parts["best_state"] = t.evaluator.best_state
    return parts


def save_shards(t: Any, folder: Path) -> None:
    """Every rank writes its shards of :func:`sharded_tensors` into ``folder``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_tensors(t), checkpoint_id=str(folder))


def shard_entries(t: Any, folder: Path) -> dict[str, Any]:
    """What checkpoint.pt holds of a sharded run in place of its sharded parts."""
    return {"model": {}, "optimizer": {}, "best_state": None,
            "averages": {n: a.meta() for n, a in t.averages.items()},
            "shards": {"dir": folder.name, "best": t.evaluator.best_state is not None}}


def load_shards(t: Any, run_dir: Path, state: dict[str, Any]) -> None:
    """A sharded checkpoint's parts into ``t`` (on any number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    folder = Path(run_dir) / state["shards"]["dir"]
    if not (folder / ".metadata").is_file():
        raise UserError(f"cannot resume: {folder}, the shards checkpoint.pt names, is missing or "
                        "incomplete; start over with trainer.resume=never")
    metas = state["averages"]
    if set(metas) != set(t.averages):
        raise UserError(f"cannot resume: the checkpoint holds the averages {sorted(metas)}, "
                        f"this run keeps {sorted(t.averages)}")
    if state["shards"]["best"] and t.evaluator.best_state is None:
        t.evaluator.best_state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    parts = sharded_tensors(t, metas, posthoc=bool(state.get("posthoc_ema")))
    dcp.load(parts, checkpoint_id=str(folder))
    set_model_state_dict(t.model, parts["model"])
    set_optimizer_state_dict(t.model, t.optimizer, parts["optimizer"])
    for name, average in t.averages.items():
        average.load_meta(metas[name])
    if "best_state" in parts:
        t.evaluator.best_state = parts["best_state"]


def remove_unreferenced_shards(run_dir: Path, keep: set[str]) -> None:
    """Shard folders that no checkpoint names (an older one, or one a kill left half
    written); rank 0, after a checkpoint was committed."""
    for folder in Path(run_dir).glob(f"{SHARDS_PREFIX}*"):
        if folder.name not in keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
