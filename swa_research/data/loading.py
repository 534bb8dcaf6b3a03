"""The run's sets from its data config: in memory or streamed (``data.in_memory``), with the
seeded validation split, cut to a shortened run's limits (the debug group)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from swa_research.config import DataConfig, UserError
from swa_research.data import streaming
from swa_research.data.folders import list_image_folder
from swa_research.data.memory import DataSplits, split_train_val
from swa_research.data.sources import load_datasets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Shortened runs (``data.subset`` and the trainer's ``limit_*`` / ``overfit_batches``;
    the debug group): each applies to the sets that :func:`build_data` returns, so that the
    trainer, posthoc and the flatness analysis see the same images. 0: off."""

    subset: int = 0
    train_images: int = 0  # limit_train_batches x batch_size
    eval_images: int = 0  # limit_eval_batches x eval_batch_size
    overfit_images: int = 0  # overfit_batches x batch_size

    @classmethod
    def of(cls, config: Any) -> Limits:
        t = config.trainer
        return cls(subset=int(getattr(config.data, "subset", 0) or 0),
                   train_images=int(t.limit_train_batches) * t.batch_size,
                   eval_images=int(t.limit_eval_batches) * t.eval_batch_size,
                   overfit_images=int(t.overfit_batches) * t.batch_size)


def balanced_index(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` positions of ``labels``, seeded and class-balanced: the classes take turns in a
    seeded order, each giving its next image of a seeded permutation, until ``n`` are taken."""
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    by_class = [perm[labels[perm] == c] for c in torch.unique(labels).tolist()]
    order = torch.randperm(len(by_class), generator=g).tolist()
    rounds = max((len(ix) for ix in by_class), default=0)
    picked = [by_class[c][r] for r in range(rounds) for c in order if r < len(by_class[c])]
    return torch.stack(picked[:n]) if picked and n else torch.zeros(0, dtype=torch.int64)


def _first(part: Any, n: int, seed: int | None = None) -> Any:
    """The first ``n`` images of a set (of a seeded permutation when ``seed`` is given)."""
    if part is None or not n or n >= len(part):
        return part
    index = (torch.randperm(len(part), generator=torch.Generator().manual_seed(seed))[:n]
             if seed is not None else torch.arange(n))
    return part.subset(index)


def apply_limits(splits: DataSplits, limits: Limits, seed: int) -> DataSplits:
    """The sets of a shortened run (see :class:`Limits`); logged when anything is cut."""
    train, val, test = splits.train, splits.val, splits.test
    before = (len(train), None if val is None else len(val), len(test))
    if limits.subset and limits.subset < len(train):
        train = train.subset(balanced_index(train.labels, limits.subset, seed + 1))
    if limits.overfit_images:
        train = _first(train, limits.overfit_images, seed + 2)
        val = train  # validated on the very images it fits: the loss should reach ~0
    elif limits.train_images:
        train = _first(train, limits.train_images, seed + 2)
    if limits.eval_images:
        val = val if limits.overfit_images else _first(val, limits.eval_images)
        test = _first(test, limits.eval_images)
    after = (len(train), None if val is None else len(val), len(test))
    if after != before:
        log.info("shortened run (data.subset, trainer.limit_*/overfit_batches): train %d of "
                 "%d, val %s of %s, test %d of %d images", after[0], before[0], after[1],
                 before[1], after[2], before[2])
    return DataSplits(train, val, test, splits.classes, streamed=splits.streamed)


def build_data(cfg: DataConfig, seed: int, device: torch.device, num_workers: int = 0,
               memory_format: torch.memory_format = torch.contiguous_format,
               limits: Limits | None = None) -> DataSplits:
    """The run's sets: in memory on ``device``, or for an image folder that does not fit
    (``data.in_memory``, :func:`swa_research.streaming.choose_path`) streamed from disk, cut
    to ``limits`` when given. The log says which path and why."""
    splits = _build_data(cfg, seed, device, num_workers, memory_format)
    return splits if limits is None else apply_limits(splits, limits, seed)


def _build_data(cfg: DataConfig, seed: int, device: torch.device, num_workers: int,
                memory_format: torch.memory_format) -> DataSplits:
    listing = None
    if cfg.name in ("imagefolder", "imagenet"):
        listing = list_image_folder(cfg)  # once, for the choice and either path
        in_memory, reason = streaming.choose_path(cfg, device, listing)
        log.info("%s", reason)
        if not in_memory:
            s = streaming.open_image_folder(cfg, num_workers, listing=listing,
                                            memory_format=memory_format)
            return DataSplits(s.train, s.val, s.test, s.classes, streamed=True)
    train_full, test, classes = load_datasets(cfg, num_workers, listing)
    if train_full.images.shape[-1] != train_full.images.shape[-2]:
        raise UserError(f"images are {tuple(train_full.images.shape[-2:])}: square images "
                        "are expected; set data.image_size")
    train, val = split_train_val(train_full, cfg.val_fraction, cfg.split_seed)
    if len(train) == 0:
        raise UserError("the training set is empty after the validation split")
    return DataSplits(train.to(device), None if val is None else val.to(device),
                      test.to(device), classes)
