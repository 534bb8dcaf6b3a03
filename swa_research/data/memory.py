"""Data sets as uint8 NCHW tensors in memory (on the training device), a seeded validation
split, and batch iterators whose shuffling, crops, flips and normalisation are tensor ops.

A streamed set (:class:`~swa_research.data.streaming.StreamingSet`) is handed to its own
methods by the batch functions here (:func:`train_batches`, :func:`bn_pass_batches`,
:func:`eval_batches`), so that the trainer, the evaluation and the averages use one set of
functions for both paths; both decode and augment with :mod:`swa_research.data.transforms`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swa_research.data.transforms import crop_flip_params, image_seeds


@dataclass
class ImageSet:
    """Images as uint8 [N, C, H, W] and labels as int64 [N], on one device."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape [N, C, H, W]")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor) -> ImageSet:
        index = index.to(self.images.device)
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass
class DataSplits:
    """The train, validation (None without a split) and test sets: in memory
    (:class:`ImageSet`) or streamed from disk (``streaming.StreamingSet``)."""

    train: Any
    val: Any
    test: Any
    classes: list[str]
    streamed: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.image_size)

    def close(self) -> None:
        """End a streamed set's worker processes (nothing to do in memory)."""
        for part in (self.train, self.val, self.test):
            if part is not None and hasattr(part, "close"):
                part.close()


def synthetic_images(n: int, num_classes: int, image_size: int = 32, seed: int = 0,
                     noise: float = 48.0) -> ImageSet:
    """A learnable data set: each class is a smooth random prototype image, each sample that
    prototype plus Gaussian noise, clipped to uint8. ``seed`` picks the samples; the
    prototypes are the same for every seed, so train and test share their classes."""
    coarse = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(17))
    g = torch.Generator().manual_seed(10_007 * seed + 18)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                           align_corners=False) * 200 + 28
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = protos[labels] + noise * torch.randn(n, 3, image_size, image_size, generator=g)
    return ImageSet(images.clamp(0, 255).round().to(torch.uint8), labels.to(torch.int64))



def split_train_val(full: ImageSet, val_fraction: float, seed: int
                    ) -> tuple[ImageSet, ImageSet | None]:
    """A seeded split: the first floor(val_fraction * N) of a permutation become validation."""
    # Round first: 0.29 * 100 is 28.999999999999996 in floating point, and 29 is meant.
    n_val = int(round(val_fraction * len(full), 6))
    if n_val == 0:
        return full, None
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    return full.subset(perm[n_val:]), full.subset(perm[:n_val])



def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor to ``device`` without a host-device sync: a plain ``.to("cuda")``
    from pageable memory waits for the GPU's queue to drain, a pinned non-blocking copy does not
    (the caching host allocator keeps the pinned buffer until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Preprocess:
    """uint8 batch -> float batch: optional pad-4 crop and flip, scale to [0, 1], normalise."""

    def __init__(self, normalize: bool, mean: list[float], std: list[float], device: torch.device,
                 augment: str = "none", pad: int = 4,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.augment = augment
        self.pad = pad
        self.memory_format = memory_format
        self.device = torch.device(device)
        self.scale: Tensor | None = None
        self.shift: Tensor | None = None
        if normalize:
            m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
            s = torch.tensor(std, device=device).view(1, -1, 1, 1)
            # x/255 then (x - m)/s folded into one multiply-add.
            self.scale = 1.0 / (255.0 * s)
            self.shift = -m / s

    def to_float(self, x: Tensor) -> Tensor:
        """One kernel from the uint8 batch to floats, in the layout of the uint8 batch (so the
        layout change runs on a quarter of the bytes): the multiply-add, or without
        normalisation a division by 255, which is exactly ``ToTensor``'s."""
        x = x.contiguous(memory_format=self.memory_format)
        if self.scale is None or self.shift is None:
            return x.div(255.0)
        return torch.addcmul(self.shift, x, self.scale)

    def params(self, seeds: Tensor) -> Tensor | None:
        """The crop offsets and flips of the images with these per-image ``seeds``
        (``transforms.image_seeds``), [3, n] (dy, dx, flip) on the CPU: the same values the
        streaming path draws for each image (``transforms.crop_flip_params``); None without
        augmentation."""
        if self.augment != "crop_flip":
            return None
        return crop_flip_params(seeds, self.pad)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """The crops and flips ``params`` (from :meth:`draw`) applied to a uint8 batch."""
        n, c, h, w = x.shape
        p = self.pad
        # One copy to the device for all three.
        dy, dx, flip = to_device_async(params, x.device)
        flip = flip.bool()
        padded = F.pad(x, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]
        cols = cols.view(n, 1, 1, w)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        return padded[batch, chans, rows, cols]

    def train(self, x: Tensor, seeds: Tensor) -> Tensor:
        params = self.params(seeds)
        return self.to_float(x if params is None else self.apply(x, params))


Shard = tuple[int, int]  # (rank, world size)


def train_batches(data: ImageSet, batch_size: int, generator: torch.Generator,
                  preprocess: Preprocess, drop_last: bool = True, order: Tensor | None = None,
                  start: int = 0, shard: Shard | None = None, whole_batches: bool = False,
                  aug_seed: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled, augmented batches; the order comes from ``generator`` unless
    given. ``start`` skips that many batches (resuming an epoch).

    With ``shard=(rank, world)`` (DDP) every rank walks the same global batches and draws the
    same random numbers; it takes the ``rank``-th slice of each global batch (``batch_size`` is
    the global batch), or with ``whole_batches`` every ``world``-th whole batch from the
    ``rank``-th on. Either way the ranks together see exactly what one process sees.

    Each image's augmentation is seeded by ``aug_seed`` (drawn from ``generator`` after the
    order when not given) and its position in the epoch (:mod:`swa_research.transforms`): a
    streamed set does it in its workers, image by image, an in-memory one for the whole batch
    at once, with the same values."""
    n = len(data)
    if order is None:
        order = torch.randperm(n, generator=generator)
    if aug_seed is None:
        aug_seed = torch.randint(0, 2**62, (1,), generator=generator).tolist()[0]
    if not isinstance(data, ImageSet):
        return data.train_batches(batch_size, order, start=start, drop_last=drop_last,
                                  aug_seed=aug_seed, device=preprocess.device, shard=shard,
                                  whole_batches=whole_batches)
    return _tensor_batches(data, batch_size, aug_seed, preprocess, drop_last, order, start,
                           shard, whole_batches)


def _tensor_batches(data: ImageSet, batch_size: int, aug_seed: int, preprocess: Preprocess,
                    drop_last: bool, order: Tensor, start: int, shard: Shard | None,
                    whole_batches: bool) -> Iterator[tuple[Tensor, Tensor]]:
    n = len(data)
    order = order.to(data.images.device)
    rank, world = shard or (0, 1)
    stop = n - n % batch_size if drop_last else n
    for k, i in enumerate(range(start * batch_size, stop, batch_size), start=start):
        positions = torch.arange(i, min(i + batch_size, n))
        if world > 1:
            if whole_batches:
                if k % world != rank:
                    continue
            else:
                lo = positions.shape[0] * rank // world
                hi = positions.shape[0] * (rank + 1) // world
                positions = positions[lo:hi]
        idx = order[positions.to(order.device)]
        params = preprocess.params(image_seeds(aug_seed, positions))
        x = data.images[idx]
        yield preprocess.to_float(x if params is None else preprocess.apply(x, params)), \
            data.labels[idx]


def bn_pass_batches(data: ImageSet, batch_size: int, seed: int, iteration: int,
                    preprocess: Preprocess, shard: Shard | None = None
                    ) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of an average's BN pass after ``iteration``: the whole set, with
    the training augmentation, in an order from a generator of its own (seeded by the run's
    seed and the iteration), so that the training order is not disturbed and the trainer, the
    flatness analysis and post-hoc averages see the same batches. Under DDP (``shard``) each
    rank takes whole batches of that one pass in turn; the BN update sums over the ranks."""
    if not isinstance(data, ImageSet):
        return data.bn_pass_batches(batch_size, seed, iteration, device=preprocess.device,
                                    shard=shard)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return train_batches(data, batch_size, gen, preprocess, drop_last=False, shard=shard,
                         whole_batches=True)


def eval_batches(data: Any, batch_size: int, preprocess: Preprocess,
                 shard: Shard | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The set in its order, without augmentation; with ``shard=(rank, world)`` the
    ``rank``-th contiguous slice of it (DDP's sharded evaluation)."""
    if not isinstance(data, ImageSet):
        return data.eval_batches(batch_size, device=preprocess.device, shard=shard)
    return _tensor_eval_batches(data, batch_size, preprocess, shard)


def _tensor_eval_batches(data: ImageSet, batch_size: int, preprocess: Preprocess,
                         shard: Shard | None) -> Iterator[tuple[Tensor, Tensor]]:
    rank, world = shard or (0, 1)
    n = len(data)
    lo, hi = n * rank // world, n * (rank + 1) // world
    for i in range(lo, hi, batch_size):
        j = min(i + batch_size, hi)
        yield preprocess.to_float(data.images[i:j]), data.labels[i:j]
