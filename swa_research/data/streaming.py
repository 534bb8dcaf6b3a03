"""Image folders too big for memory: decoded from disk in DataLoader worker processes, batch by
batch, with the same batch order, sharding and resume rules as the in-memory path
(:mod:`swa_research.data`).

Which path a run takes is :func:`choose_path`'s decision (``data.in_memory``: ``auto`` keeps the
decoded set in memory when it is estimated to fit within ``data.memory_fraction`` of host RAM,
and of GPU memory on CUDA, where the in-memory path keeps it). This module only streams.

Interface for the trainer
-------------------------
::

    listing = list_image_folder(cfg.data)                        # lists the folders once
    in_memory, reason = choose_path(cfg.data, device, listing)   # log `reason` as is
    if not in_memory:
        splits = open_image_folder(cfg.data, num_workers=cfg.trainer.num_workers,
                                   listing=listing, memory_format=memory_format(...))
        # splits.train / splits.val (or None) / splits.test: StreamingSet; splits.classes

    # one epoch (order: torch.randperm(len(splits.train), generator=the trainer's generator))
    batches = splits.train.train_batches(batch_size, order, start=k, drop_last=True,
                                         aug_seed=epoch_aug_seed, device=device,
                                         shard=(rank, world) or None)
    for x, y in batches:            # x: float NCHW, normalised, on device; y: int64 on device
        ...
        progress_suffix = batches.describe()      # "loader wait 12%"
    batches.wait_s, batches.elapsed_s             # this epoch's wait and wall time (seconds)
    splits.train.wait.total_s                     # all iterations of that set so far

    splits.test.eval_batches(eval_batch_size, device, shard=None)   # file order
    splits.train.bn_pass_batches(batch_size, seed, iteration, device) # data.bn_pass_batches' rule
    splits.train.close()                          # ends the persistent worker processes

Properties the trainer can rely on:

- **The batches do not depend on the number of workers, nor on a resume.** Batch ``i`` of an
  epoch is ``order[i*B:(i+1)*B]``; the random crop and flip of the image at position ``p`` of
  the epoch come from a generator seeded by ``(aug_seed, p)`` alone. ``start=k`` yields batches
  ``k, k+1, ...`` of the same epoch, equal to those of an uninterrupted one. The trainer must
  derive ``aug_seed`` from its seed and the epoch (e.g. ``seed * 1_000_003 + epoch``) and
  checkpoint ``order`` (or the generator state that made it) as it does today.
- **Sharding**: with ``shard=(r, W)`` rank ``r`` takes the ``r``-th contiguous ``B/W`` images of
  every global batch (``B`` divisible by ``W``); the ranks' slices concatenated are the global
  batch. A last partial batch (``drop_last=False``) is split into ``W`` near-equal contiguous
  parts, and dropped by every rank when it has fewer than ``W`` images (each rank must step the
  same number of times). ``eval_batches(shard=(r, W))`` covers the ``r``-th contiguous slice of
  the set.
- **Transforms**: :mod:`swa_research.transforms`, the one definition the in-memory path uses
  too (evaluation: shorter side resized, centre crop; ``crop_flip`` seeded per image by
  ``(aug_seed, position)``; ``random_resized_crop`` of the full image). Workers decode to uint8
  and collate uint8 batches; the float conversion and normalisation run on the device
  (``Preprocess.to_float``): a quarter of the host memory and PCIe traffic of float batches.
- **Loader wait**: the time the consumer spent blocked waiting for the next uint8 batch. With
  ``num_workers=0`` the decoding runs in the consumer, so all of it counts as wait.
- **Workers**: ``num_workers`` processes (``trainer.num_workers``) for training passes,
  persistent across epochs (one DataLoader per set whose batch plan is replaced before each
  iteration); an evaluation pass, or an iteration started while another of the same set is
  unfinished (a BN pass inside an epoch, say), gets worker processes of its own that end with it,
  ``prefetch_factor`` batches each in flight, pinned memory on CUDA. The file list is a numpy
  byte-string array (no per-file Python objects), so forked workers do not copy it page by page
  through reference counting.

GPU decoding (``torchvision.io.decode_jpeg(device="cuda")``) is not used: it needs the files'
bytes in the main process (the workers would only read files), the random crop then runs on
the GPU per image, and it frees host CPUs only where they are the bottleneck; no GPU was
available to measure whether it pays, so the CPU workers stay the one path.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from swa_research.config import DataConfig, UserError
from swa_research.data.folders import (
    FolderListing,
    _list_folder,
    list_image_folder,
    resolve_image_size,
)
from swa_research.data.memory import DataSplits, Preprocess, split_train_val, to_device_async
from swa_research.data.transforms import ImageTransform, decode_image, image_seeds

log = logging.getLogger(__name__)

__all__ = [
    "BatchIterator",
    "FolderListing",
    "LoaderWait",
    "StreamingSet",
    "choose_path",
    "estimate_decoded_bytes",
    "host_memory_bytes",
    "in_memory_mode",
    "list_image_folder",
    "open_image_folder",
]

# Data sets the streaming path reads: image folders (ImageNet is one, with a val/ split).
FOLDER_SETS = ("imagefolder", "imagenet")


class _FileTable:
    """File paths as one numpy byte-string array under a root: no Python object per file."""

    def __init__(self, root: str, relative: np.ndarray) -> None:
        self.root = root
        self.relative = relative

    @classmethod
    def of(cls, files: Sequence[Path | str]) -> _FileTable:
        paths = [os.fspath(f) for f in files]
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        rel = [os.path.relpath(p, root).encode() for p in paths]
        return cls(root, np.array(rel, dtype=np.bytes_))

    def __len__(self) -> int:
        return len(self.relative)

    def __getitem__(self, i: int) -> str:
        return os.path.join(self.root, self.relative[i].decode())

    def subset(self, index: np.ndarray) -> _FileTable:
        return _FileTable(self.root, self.relative[index])


class _Images(Dataset[Tensor]):
    """Item ``(file index, seed)``: that file decoded and transformed; seed -1: evaluation."""

    def __init__(self, files: _FileTable, transform: ImageTransform) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        img = decode_image(self.files[index])
        if seed < 0:
            return self.transform.eval(img)
        return self.transform.train(img, seed)


def _stack(batch: list[Tensor]) -> Tensor:
    return torch.stack(batch)


# ---------------------------------------------------------------------------------------------
# Batch plans and iteration


@dataclass
class _Plan:
    """The batches of one iteration: per batch, the file indices and per-image seeds."""

    index: list[Tensor]
    seeds: list[Tensor]


class _PlanSampler:
    """A batch sampler whose plan is replaced before each iteration of the loader, so that one
    DataLoader (and its persistent workers) serves every epoch."""

    def __init__(self, plan: _Plan | None = None) -> None:
        self.plan = plan or _Plan([], [])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx, seeds in zip(self.plan.index, self.plan.seeds, strict=True):
            yield list(zip(idx.tolist(), seeds.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.plan.index)


@dataclass
class LoaderWait:
    """How long the consumer waited for batches of a set: in total, and in its last (or
    current) iteration."""

    total_s: float = 0.0
    last_s: float = 0.0
    last_elapsed_s: float = 0.0

    @property
    def last_fraction(self) -> float:
        return self.last_s / self.last_elapsed_s if self.last_elapsed_s > 0 else 0.0


def worker_message(e: BaseException) -> str:
    """The one line a DataLoader worker raised: the loader re-raises a worker's exception with
    "Caught UserError in DataLoader worker process N" and the worker's traceback as its
    message; the last line of that traceback is "swa_research.errors.UserError: <the line>"."""
    text = str(e)
    if "in DataLoader worker process" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and name.endswith("UserError") else last


class BatchIterator(Iterator[tuple[Tensor, Tensor]]):
    """The batches of one iteration as (float NCHW on device, int64 labels on device); it
    measures the time the consumer waits for each batch."""

    def __init__(self, owner: StreamingSet, plan: _Plan, device: torch.device) -> None:
        self._owner = owner
        self._plan = plan
        self._device = device
        self._next = 0
        self.wait_s = 0.0
        self._started = time.perf_counter()
        live = owner._live() if owner._live is not None else None
        self._it = owner._iterate(plan, device, live)
        owner._live = weakref.ref(self)
        owner.wait.last_s = 0.0
        owner.wait.last_elapsed_s = 0.0

    def __len__(self) -> int:
        return len(self._plan.index) - self._next

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started

    @property
    def wait_fraction(self) -> float:
        """Loader wait over the wall time since this iteration began."""
        elapsed = self.elapsed_s
        return self.wait_s / elapsed if elapsed > 0 else 0.0

    def describe(self) -> str:
        return f"loader wait {100 * self.wait_fraction:.0f}%"

    def __next__(self) -> tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        try:
            images = next(self._it)
        except StopIteration:
            self._note(time.perf_counter() - t0)
            raise
        except UserError as e:
            raise UserError(worker_message(e)) from None
        self._note(time.perf_counter() - t0)
        idx = self._plan.index[self._next]
        self._next += 1
        x = images.to(self._device, non_blocking=self._device.type == "cuda")
        x = self._owner._preprocess(self._device).to_float(x)
        y = to_device_async(self._owner.labels[idx], self._device)
        return x, y

    def _note(self, waited: float) -> None:
        self.wait_s += waited
        w = self._owner.wait
        w.total_s += waited
        w.last_s = self.wait_s
        w.last_elapsed_s = self.elapsed_s


# ---------------------------------------------------------------------------------------------
# The set


class StreamingSet:
    """An image-folder split: its file list and labels only; images are decoded per batch.

    ``labels`` is an int64 CPU tensor, ``classes`` the class names (of the whole data set),
    ``image_size`` the side of the square crops a batch holds."""

    def __init__(self, files: Sequence[Path | str] | _FileTable, labels: Tensor | Sequence[int],
                 classes: list[str], *, image_size: int, resize_size: int | None = None,
                 augment: str = "random_resized_crop",
                 crop_scale: tuple[float, float] = (0.08, 1.0), normalize: bool = True,
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), num_workers: int = 2,
                 prefetch_factor: int = 2,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.files = files if isinstance(files, _FileTable) else _FileTable.of(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if self.labels.shape != (len(self.files),):
            raise ValueError("labels must have one entry per file")
        self.classes = list(classes)
        self.transform = ImageTransform(image_size=int(image_size), resize_size=resize_size,
                                         augment=augment,
                                         scale=(float(crop_scale[0]), float(crop_scale[1])))
        self.normalize = normalize
        self.mean = list(mean)
        self.std = list(std)
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.memory_format = memory_format
        self.wait = LoaderWait()
        self._sampler = _PlanSampler()
        self._loader: DataLoader[Tensor] | None = None
        self._loader_pins = False
        self._preprocessors: dict[torch.device, Preprocess] = {}
        self._live: weakref.ref[BatchIterator] | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, split_dir: Path | str, classes: list[str] | None = None,
                    **options: object) -> StreamingSet:
        """``split_dir/<class>/<image>`` files (``data._list_folder``'s rules); ``classes``
        fixes the class order (the training split's), else the folders' sorted names."""
        files, labels, classes = _list_folder(Path(split_dir), classes)
        return cls(files, labels, classes, **options)  # type: ignore[arg-type]

    def _options(self) -> dict[str, object]:
        return dict(image_size=self.transform.image_size, resize_size=self.transform.resize_size,
                    augment=self.transform.augment, crop_scale=self.transform.scale,
                    normalize=self.normalize, mean=self.mean, std=self.std,
                    num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                    memory_format=self.memory_format)

    def subset(self, index: Tensor) -> StreamingSet:
        """The images at ``index`` (a seeded validation split, as ``ImageSet.subset``)."""
        index = torch.as_tensor(index, dtype=torch.int64).cpu()
        return StreamingSet(self.files.subset(index.numpy()), self.labels[index], self.classes,
                            **self._options())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    def path(self, i: int) -> str:
        return self.files[i]

    # -- batches ------------------------------------------------------------------------------

    def train_batches(self, batch_size: int, order: Tensor, start: int = 0,
                      drop_last: bool = True, aug_seed: int = 0,
                      device: torch.device | str = "cpu",
                      shard: tuple[int, int] | None = None,
                      whole_batches: bool = False) -> BatchIterator:
        """One epoch in the global ``order`` (a permutation of ``range(len(self))``), from
        batch ``start``, augmented; see the module docstring for sharding and seeding. With
        ``whole_batches`` rank r takes the whole batches r, r + W, ... instead (the BN pass of
        an average: its all-reduce is exact for whole batches)."""
        n = len(self)
        order = torch.as_tensor(order, dtype=torch.int64).cpu()
        if order.shape != (n,):
            raise ValueError(f"order must hold {n} indices, one per image (got "
                             f"{tuple(order.shape)})")
        rank, world = _check_shard(shard)
        if whole_batches:
            rank, world, turn = 0, 1, (rank, world)
        else:
            turn = (0, 1)
        if batch_size < 1 or batch_size % world:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the "
                             f"world size {world}")
        index, seeds = [], []
        for i in range(max(0, start), -(-n // batch_size)):
            lo, hi = i * batch_size, min((i + 1) * batch_size, n)
            if hi - lo < batch_size:
                if drop_last or hi - lo < world:
                    break
                parts = torch.arange(lo, hi).tensor_split(world)
                positions = parts[rank]
            else:
                per = batch_size // world
                positions = torch.arange(lo + rank * per, lo + (rank + 1) * per)
            if i % turn[1] != turn[0]:
                continue
            index.append(order[positions])
            seeds.append(image_seeds(aug_seed, positions))
        return BatchIterator(self, _Plan(index, seeds), torch.device(device))

    def eval_batches(self, batch_size: int, device: torch.device | str = "cpu",
                     shard: tuple[int, int] | None = None) -> BatchIterator:
        """The set (or the ``shard``'s contiguous slice of it) in file order, resized and
        centre-cropped."""
        rank, world = _check_shard(shard)
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be positive")
        positions = torch.arange(len(self)).tensor_split(world)[rank]
        index = list(positions.split(batch_size))
        seeds = [torch.full_like(i, -1) for i in index]
        return BatchIterator(self, _Plan(index, seeds), torch.device(device))

    def bn_pass_batches(self, batch_size: int, seed: int, iteration: int,
                        device: torch.device | str = "cpu",
                        shard: tuple[int, int] | None = None) -> BatchIterator:
        """The training batches of an average's BN pass after ``iteration``: the whole set with
        the training augmentation, in the order and with the seeds of a generator of its own
        (``data.bn_pass_batches``' rule), so that the training order is not disturbed."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
        order = torch.randperm(len(self), generator=gen)
        aug_seed = torch.randint(0, 2**62, (1,), generator=gen).tolist()[0]
        return self.train_batches(batch_size, order, drop_last=False, aug_seed=aug_seed,
                                  device=device, shard=shard, whole_batches=True)

    def close(self) -> None:
        """End the persistent worker processes (they also end with the set)."""
        self._loader = None

    # -- internals ----------------------------------------------------------------------------

    def _preprocess(self, device: torch.device) -> Preprocess:
        if device not in self._preprocessors:
            self._preprocessors[device] = Preprocess(self.normalize, self.mean, self.std, device,
                                                     memory_format=self.memory_format)
        return self._preprocessors[device]

    def _iterate(self, plan: _Plan, device: torch.device,
                 live: BatchIterator | None) -> Iterator[Tensor]:
        if self.num_workers == 0:
            return self._iterate_here(plan)
        pin = device.type == "cuda"
        evaluation = all(bool((seeds < 0).all()) for seeds in plan.seeds)
        if evaluation or (live is not None and len(live) > 0):
            # An evaluation pass (every few epochs: its workers need not idle in between, and a
            # run has a validation and a test set besides the training set), or another
            # iteration of this set still going (a BN pass inside an epoch, say): workers of
            # its own, ended with the pass, instead of the persistent training workers.
            return iter(self._new_loader(_PlanSampler(plan), pin, persistent=False))
        if self._loader is None or self._loader_pins != pin:
            self._loader = self._new_loader(self._sampler, pin, persistent=True)
            self._loader_pins = pin
        # The plan is read when the loader's iterator starts (and resets) the sampler.
        self._sampler.plan = plan
        return iter(self._loader)

    def _new_loader(self, sampler: _PlanSampler, pin: bool, persistent: bool
                    ) -> DataLoader[Tensor]:
        # A generator of its own: a DataLoader draws its workers' base seed from the global
        # RNG otherwise, which would move the training's dropout stream with the number of
        # workers (the transforms are seeded per image and need no worker seed).
        return DataLoader(_Images(self.files, self.transform), batch_sampler=sampler,
                          num_workers=self.num_workers, collate_fn=_stack, pin_memory=pin,
                          prefetch_factor=self.prefetch_factor, persistent_workers=persistent,
                          generator=torch.Generator().manual_seed(0))

    def _iterate_here(self, plan: _Plan) -> Iterator[Tensor]:
        images = _Images(self.files, self.transform)
        for batch in _PlanSampler(plan):
            yield _stack([images[item] for item in batch])


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    rank, world = (int(v) for v in shard)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard={shard}: expected (rank, world) with 0 <= rank < world")
    return rank, world


# ---------------------------------------------------------------------------------------------
# Splits from the config


def set_options(cfg: DataConfig, num_workers: int, listing: FolderListing,
                memory_format: torch.memory_format = torch.contiguous_format
                ) -> dict[str, object]:
    """StreamingSet's keyword arguments from the data config (an unset ``data.image_size``
    inferred from the listing as the in-memory path infers it)."""
    return dict(image_size=resolve_image_size(cfg, listing),
                resize_size=getattr(cfg, "resize_size", None), augment=cfg.augment,
                crop_scale=tuple(getattr(cfg, "crop_scale", (0.08, 1.0))),
                normalize=cfg.normalize, mean=cfg.mean, std=cfg.std, num_workers=num_workers,
                prefetch_factor=getattr(cfg, "prefetch_factor", 2), memory_format=memory_format)


def open_image_folder(cfg: DataConfig, num_workers: int,
                      listing: FolderListing | None = None,
                      memory_format: torch.memory_format = torch.contiguous_format
                      ) -> DataSplits:
    """The streamed train / validation / test sets, with the validation split drawn with
    ``data.split_seed`` (the same images as the in-memory path's split)."""
    listing = listing or list_image_folder(cfg)
    options = set_options(cfg, num_workers, listing, memory_format)
    full = StreamingSet(*listing.train, listing.classes, **options)  # type: ignore[arg-type]
    test = StreamingSet(*listing.test, listing.classes, **options)  # type: ignore[arg-type]
    train, val = split_train_val(full, cfg.val_fraction,  # type: ignore[arg-type]
                                 cfg.split_seed)
    if len(train) == 0:
        raise UserError("the training set is empty after the validation split")
    return DataSplits(train, val, test, listing.classes, streamed=True)


# ---------------------------------------------------------------------------------------------
# Which path


def in_memory_mode(cfg: DataConfig) -> str:
    """``data.in_memory`` as auto | true | false (Hydra's ``true`` arrives as "True")."""
    value = str(getattr(cfg, "in_memory", "auto")).strip().lower()
    if value not in ("auto", "true", "false"):
        raise UserError(f"data.in_memory={getattr(cfg, 'in_memory', None)!r}: expected auto, "
                        "true or false")
    return value


def host_memory_bytes() -> int:
    """Physical RAM, or the cgroup's memory limit when lower (containers, SLURM jobs)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def gpu_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def estimate_decoded_bytes(files: Sequence[Path | str], image_size: int | None,
                           sample: int = 64, seed: int = 0) -> int:
    """uint8 bytes of ``files`` decoded as the in-memory path decodes them: 3 x image_size^2
    each when it resizes (``data.image_size``), else the mean size of a seeded sample of the
    files' headers (PIL reads no pixels for it) times their number."""
    n = len(files)
    if n == 0:
        return 0
    if image_size:
        return n * 3 * image_size * image_size
    from PIL import Image

    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].tolist()
    pixels = []
    for i in pick:
        try:
            with Image.open(files[i]) as im:
                pixels.append(im.size[0] * im.size[1])
        except Exception as e:  # noqa: BLE001 - the decode reports it with its path
            raise UserError(f"cannot read image {files[i]}: {type(e).__name__}: {e}") from e
    return int(round(3 * n * sum(pixels) / len(pixels)))


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def choose_path(cfg: DataConfig, device: torch.device | str = "cpu",
                listing: FolderListing | None = None, *, decoded_bytes: int | None = None,
                ram_bytes: int | None = None, gpu_bytes: int | None = None
                ) -> tuple[bool, str]:
    """(in memory?, the reason, one line for the log). ``data.in_memory=auto``: in memory when
    the decoded train + test images (``decoded_bytes``, else estimated from ``listing`` or a
    fresh listing) fit within ``data.memory_fraction`` of host RAM (``ram_bytes``, else
    :func:`host_memory_bytes`) and, on CUDA, of the GPU's memory (the in-memory path keeps
    the set there); otherwise streaming. A streamed set needs ``data.image_size``."""
    device = torch.device(device)
    mode = in_memory_mode(cfg)
    if cfg.name not in FOLDER_SETS:
        return True, f"data: in memory ({cfg.name} is not an image folder)"
    if mode == "true":
        return True, "data: in memory (data.in_memory=true)"
    if mode == "false":
        return False, "data: streaming from disk (data.in_memory=false)"
    if cfg.augment == "random_resized_crop":
        return False, ("data: streaming from disk (data.augment=random_resized_crop crops each "
                       "image while decoding)")
    fraction = float(getattr(cfg, "memory_fraction", 0.5))
    if decoded_bytes is None:
        listing = listing or list_image_folder(cfg)
        decoded_bytes = (estimate_decoded_bytes(listing.train[0], cfg.image_size)
                         + estimate_decoded_bytes(listing.test[0], cfg.image_size))
    ram = ram_bytes if ram_bytes is not None else host_memory_bytes()
    limits = [(ram, "RAM")]
    gpu = gpu_bytes if gpu_bytes is not None else gpu_memory_bytes(device)
    if device.type == "cuda" and gpu is not None:
        limits.append((gpu, "GPU memory"))
    for total, what in limits:
        if decoded_bytes > fraction * total:
            return False, (f"data: streaming from disk (estimated {_gb(decoded_bytes)} decoded > "
                           f"{100 * fraction:.0f}% of {_gb(total)} {what})")
    within = " and ".join(f"{_gb(t)} {w}" for t, w in limits)
    return True, (f"data: in memory (estimated {_gb(decoded_bytes)} decoded <= "
                  f"{100 * fraction:.0f}% of {within})")

