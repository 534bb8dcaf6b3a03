"""What a run leaves: the metrics.json record and the weight files.

metrics.json keeps one layout for every run: ``task`` (its name and metric names:
:class:`~swa_research.tasks.TaskMetrics`), ``sgd`` (the final SGD model), ``sgd_best_val``
(the SGD model of the best validation epoch), one entry per average by name (``swa`` for the
primary; ``averages`` lists the names), ``calibration``, ``model`` (name and parameter count) and
``train`` (budget, timing, memory).
The weights: ``sgd_final.pt``, ``sgd_best_val.pt`` and ``<name>.pt`` per average that holds
anything (``swa.pt`` for the primary), with what the average exports besides (``Average.export``:
SWAG's posterior under "swag").
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.averaging import Average
from swa_research.averaging.sharded import whole_tensor
from swa_research.distributed import barrier
from swa_research.fileio import DCP_INFO, DCP_SUFFIX, atomic_torch_save
from swa_research.tasks import CLASSIFICATION, TaskMetrics


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (getrusage)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def peak_gpu_mb(device: torch.device) -> float | None:
    """The most GPU memory tensors have held on ``device`` so far (since the last
    ``torch.cuda.reset_peak_memory_stats``), MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_metrics(status: str, wall: float, error: str | None, *, epochs: int, iterations: int,
                sgd: dict[str, Any], best: dict[str, Any] | None,
                averages: dict[str, dict[str, Any]], names: list[str],
                calibration: dict[str, Any] | None, images_seen: int, train_time: float,
                device: torch.device, model: dict[str, Any] | None = None,
                task: TaskMetrics = CLASSIFICATION) -> dict[str, Any]:
    """The contents of metrics.json. ``averages``: the latest evaluation of each average by
    name; ``names``: the run's averages (the primary ``swa`` is always there, empty when the
    run averages nothing, so that readers find the key); ``task``: whose metrics these are."""
    empty = task.empty(("test", "val"))
    out: dict[str, Any] = {
        "status": status,
        "task": task.record(),
        "sgd": sgd or dict(empty),
        "sgd_best_val": best or {"epoch": None, **empty},
    }
    for name in ["swa", *[n for n in names if n != "swa"]]:
        out[name] = averages.get(name) or {**empty, "n_averaged": 0}
    out["averages"] = list(names)
    out["calibration"] = calibration
    out["model"] = model or {"name": None, "parameters": None}  # name, parameter count
    gpu = peak_gpu_mb(device)
    out["train"] = {
        "epochs": epochs,
        "iterations": iterations,
        "wall_time_s": round(wall, 3),
        # Named by the task's unit: images_per_s, tokens_per_s.
        f"{task.unit}_per_s": round(images_seen / train_time, 1) if train_time > 0 else None,
        # Of this process (a resumed run: since the resume).
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": None if gpu is None else round(gpu, 1),
    }
    if error:
        out["error"] = error
    return out


def vocabulary_record(data: Any) -> dict[str, Any]:
    """What a language model's weight files record of its tokens (``{"tokenizer": {name,
    vocab_size, chars}}``), so that weights never start a run on another vocabulary; empty for
    data without a tokenizer."""
    tok = getattr(data, "tokenizer", None)
    if tok is None:
        return {}
    return {"tokenizer": {"name": tok.name, "vocab_size": int(tok.vocab_size),
                          "chars": tok.chars}}


def save_weights(run_dir: Path, config: dict[str, Any], model: nn.Module, iteration: int,
                 best_state: dict[str, torch.Tensor] | None, best: dict[str, Any] | None,
                 averages: dict[str, Average], extra: dict[str, Any] | None = None,
                 write: bool = True, sharded_format: bool = False) -> list[str]:
    """sgd_final.pt, sgd_best_val.pt and one file per average that holds anything, each
    written atomically, each with ``extra`` (:func:`vocabulary_record`); returns their
    names. The weights are whole: a model sharded with FSDP and its averages are gathered one
    tensor at a time, with every rank taking part (``write``: this rank writes the files).
    ``sharded_format`` (FSDP's ``trainer.fsdp.final_format=dcp``): each is instead a folder
    ``NAME.dcp`` that ``torch.distributed.checkpoint`` writes rank by rank (no rank gathers
    anything), with ``info.pt`` beside the shards (:func:`swa_research.fileio.read_weights`
    reads both kinds)."""
    def state_of(average: Average) -> dict[str, torch.Tensor]:
        if not getattr(average, "sharded", False):
            return average.module.state_dict()
        return (average.sharded_state_dict() if sharded_format  # type: ignore[attr-defined]
                else average.full_state_dict())  # type: ignore[attr-defined]

    keep = (lambda s: s) if sharded_format else whole
    blobs = {"sgd_final.pt": {"state_dict": keep(model.state_dict()), "config": config,
                              "iteration": iteration}}
    if best_state is not None:
        blobs["sgd_best_val.pt"] = {"state_dict": keep(best_state), "config": config,
                                    "epoch": best["epoch"] if best else None}
    for name, average in averages.items():
        if average.n_averaged > 0:
            blobs[f"{name}.pt"] = {"state_dict": state_of(average), "config": config,
                                   "n_averaged": average.n_averaged, "method": average.method,
                                   **({} if sharded_format else average.export())}
    if sharded_format:
        return [save_sharded(run_dir / name, {**blob, **(extra or {})}, write)
                for name, blob in blobs.items()]
    if write:
        for name, blob in blobs.items():
            atomic_torch_save({**blob, **(extra or {})}, Path(run_dir) / name)
    return list(blobs)


def save_sharded(path: Path, blob: dict[str, Any], write: bool) -> str:
    """``blob`` as the folder ``path`` with the suffix ``.dcp``: its state dict written by
    every rank (its shards), the rest in ``info.pt`` by the writing rank, which then renames
    the finished folder into place. Returns the folder's name."""
    import shutil

    import torch.distributed.checkpoint as dcp

    folder = Path(path).with_suffix(DCP_SUFFIX)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if write and tmp.exists():
        shutil.rmtree(tmp)
    barrier()  # no rank writes into a folder that the writing rank is still removing
    dcp.save({"state_dict": blob["state_dict"]}, checkpoint_id=str(tmp))
    if write:
        atomic_torch_save({k: v for k, v in blob.items() if k != "state_dict"}, tmp / DCP_INFO)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    return folder.name


def whole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every sharded tensor (a DTensor of FSDP) gathered whole, in turn and
    to the CPU; other tensors as they are."""
    return {k: whole_tensor(v) if hasattr(v, "full_tensor") else v for k, v in state.items()}
