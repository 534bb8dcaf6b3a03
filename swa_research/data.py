"""Data sets as uint8 NCHW tensors in memory (on the training device), a seeded validation
split, and batch iterators whose shuffling, crops, flips and normalisation are tensor ops.

Image folders too big for memory are streamed from disk instead (:mod:`swa_research.streaming`,
``data.in_memory``): :func:`build_data` picks the path, and the batch functions here
(:func:`train_batches`, :func:`bn_pass_batches`, :func:`eval_batches`) hand a streamed set
(a :class:`~swa_research.streaming.StreamingSet`) to its own methods, so that the trainer, the
evaluation and the averages use one set of functions for both. Both paths decode and augment
with :mod:`swa_research.transforms`, so the path never changes a result."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swa_research.config import DataConfig, UserError
from swa_research.fileio import atomic_torch_save
from swa_research.locks import file_lock, lock_path
from swa_research.transforms import (
    ImageTransform,
    crop_flip_params,
    decode_image,
    image_seeds,
    infer_image_size,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CACHE_VERSION = 3  # bump when decoding changes (3: transforms.ImageTransform.eval)


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


# ---------------------------------------------------------------------------------------------
# Loading


def _cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str]]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    label = "CIFAR-10" if cfg.name == "cifar10" else "CIFAR-100"
    root = Path(cfg.root).expanduser()
    folder = root / cls.base_folder
    try:
        # Several jobs may start at once: one downloads and verifies, the others wait.
        with file_lock(lock_path(root if cfg.download else root.parent, cfg.name),
                       f"preparing {label} in {root}"):
            sets = [cls(str(root), train=train, download=cfg.download) for train in (True, False)]
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ...
        how = ("the download failed" if cfg.download else "data.download=false")
        raise UserError(
            f"{label} not found or corrupt in {folder} and {how} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); set data.root to the folder that "
            f"holds {cls.base_folder}/ (e.g. data.root=/datasets/cifar)") from e
    out = []
    for ds in sets:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64)))
    return out[0], out[1], list(sets[0].classes)


def _list_folder(split_dir: Path, classes: list[str] | None) -> tuple[list[Path], list[int],
                                                                     list[str]]:
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not
                   d.name.startswith("."))
    if classes is None:
        classes = found
    else:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        if missing or extra:
            raise UserError(
                f"{split_dir}: class folders differ from train/ (missing: "
                f"{', '.join(missing) or 'none'}; not in train/: {', '.join(extra) or 'none'})")
    files: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        for f in sorted((split_dir / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(f)
                labels.append(idx)
    if not files:
        raise UserError(f"{split_dir}: no images found (expected {split_dir}/<class>/*.jpg)")
    with_images = sorted({classes[i] for i in labels})
    if len(with_images) < 2:
        raise UserError(f"{split_dir}: images of one class only ({with_images[0]}); a "
                        "classifier needs at least two class folders with images")
    return files, labels, classes


def _decode(path: Path, transform: ImageTransform) -> Tensor:
    """One image file -> uint8 [3, S, S] as evaluation sees it (``ImageTransform.eval``)."""
    return transform.eval(decode_image(path))


def _cache_key(files: list[Path], labels: list[int], transform: ImageTransform,
               root: Path) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{transform.image_size}|{transform.resize_size}"
                     .encode())
    for f, y in zip(files, labels, strict=True):
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{y}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_dirs(root: Path) -> list[Path]:
    """Where the decoded images of an image folder are cached, in order: ``root/.swa_cache``,
    then (for a data set on read-only storage) a folder keyed by the root's path in
    ``$SWA_CACHE_DIR``, else ``$XDG_CACHE_HOME/swa_research``, else
    ``~/.cache/swa_research``."""
    base = os.environ.get("SWA_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swa_research"
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / ".swa_cache", Path(base).expanduser() / f"{root.name}-{key}"]


def _load_folder_split(root: Path, split: str, files: list[Path], labels: list[int],
                       cfg: DataConfig, transform: ImageTransform, num_workers: int) -> ImageSet:
    split_dir = root / split
    if not cfg.cache:
        return _decode_split(files, labels, split_dir, transform, num_workers)
    key = _cache_key(files, labels, transform, root)
    paths = [d / f"{split}-{key}.pt" for d in cache_dirs(root)]
    # Jobs that start together decode once: the first builds the cache, the others wait for it.
    with file_lock(lock_path(root, "swa_cache"), f"decoding {split_dir}"):
        return _cached_split(paths, files, labels, split_dir, transform, num_workers)


def _cached_split(paths: list[Path], files: list[Path], labels: list[int], split_dir: Path,
                  transform: ImageTransform, num_workers: int) -> ImageSet:
    """The split from the first readable cache file in ``paths``; else decoded and saved to the
    first of them that can be written."""
    for path in paths:
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                return ImageSet(blob["images"], blob["labels"])
            except Exception as e:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable cache %s (%s); decoding again", path, e)
    result = _decode_split(files, labels, split_dir, transform, num_workers)
    failures = []
    for path in paths:
        try:
            atomic_torch_save({"images": result.images, "labels": result.labels}, path)
        except OSError as e:
            failures.append(f"{path.parent}: {e.strerror or e}")
            continue
        if failures:
            log.info("cached the decoded images in %s (%s)", path, "; ".join(failures))
        return result
    log.warning("could not write the decode cache (%s); the next run decodes again",
                "; ".join(failures))
    return result


def _decode_split(files: list[Path], labels: list[int], split_dir: Path,
                  transform: ImageTransform, num_workers: int) -> ImageSet:
    log.info("decoding %d images from %s", len(files), split_dir)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        images = list(pool.map(lambda p: _decode(p, transform), files))
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def test_split_of(cfg: DataConfig) -> str:
    """The held-out split's folder of an image folder (``data.test_split``; ImageNet: val)."""
    return cfg.test_split or ("val" if cfg.name == "imagenet" else "test")


@dataclass
class FolderListing:
    """The files of an image folder's splits, listed once (listing ImageNet stats 1.3 M
    files) and shared by the choice of path, the in-memory loader and the streamed sets."""

    root: Path
    train: tuple[list[Path], list[int]]
    test: tuple[list[Path], list[int]]
    classes: list[str]
    test_split: str = "test"


def list_image_folder(cfg: DataConfig) -> FolderListing:
    """``data.root/train/<class>/*`` and ``data.root/<test split>/<class>/*`` (the test split
    is ``data.test_split``: ``val`` for ImageNet)."""
    root = Path(cfg.root).expanduser()
    split = test_split_of(cfg)
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root}: folder does not exist")
    for name in ("train", split):
        if not (root / name).is_dir():
            raise UserError(f"data.root={cfg.root}: no {name}/ folder (expected "
                            f"{name}/<class>/<image> files)")
    train_files, train_labels, classes = _list_folder(root / "train", None)
    test_files, test_labels, _ = _list_folder(root / split, classes)
    return FolderListing(root, (train_files, train_labels), (test_files, test_labels), classes,
                         split)


def resolve_image_size(cfg: DataConfig, listing: FolderListing) -> int:
    """``data.image_size``, or when unset the side of the first training image (both paths
    infer it this way; :func:`swa_research.transforms.infer_image_size`)."""
    if cfg.image_size:
        return int(cfg.image_size)
    size = infer_image_size(listing.train[0][0])
    log.info("data.image_size not set: %d, the side of the first training image", size)
    return size


def eval_transform(cfg: DataConfig, listing: FolderListing) -> ImageTransform:
    """What the in-memory path decodes every image of a folder to: the evaluation transform."""
    return ImageTransform(image_size=resolve_image_size(cfg, listing),
                          resize_size=cfg.resize_size)


def _imagefolder(cfg: DataConfig, num_workers: int, listing: FolderListing | None = None
                 ) -> tuple[ImageSet, ImageSet, list[str]]:
    listing = listing or list_image_folder(cfg)
    root, classes = listing.root, listing.classes
    transform = eval_transform(cfg, listing)
    train = _load_folder_split(root, "train", *listing.train, cfg, transform, num_workers)
    test = _load_folder_split(root, listing.test_split, *listing.test, cfg, transform,
                              num_workers)
    return train, test, classes


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


def load_datasets(cfg: DataConfig, num_workers: int = 0,
                  listing: FolderListing | None = None
                  ) -> tuple[ImageSet, ImageSet, list[str]]:
    """The full training set, the test set and the class names, on the CPU (an image folder
    from ``listing`` when it is already listed)."""
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    if cfg.name in ("imagefolder", "imagenet"):
        return _imagefolder(cfg, num_workers, listing)
    if cfg.name == "synthetic":
        size = cfg.image_size or 32
        train = synthetic_images(cfg.train_size, cfg.num_classes, size, seed=0)
        test = synthetic_images(cfg.test_size, cfg.num_classes, size, seed=1)
        return train, test, [f"class{i}" for i in range(cfg.num_classes)]
    raise UserError(f"data.name={cfg.name!r}: expected cifar10, cifar100, imagefolder or synthetic")


def split_train_val(full: ImageSet, val_fraction: float, seed: int
                    ) -> tuple[ImageSet, ImageSet | None]:
    """A seeded split: the first floor(val_fraction * N) of a permutation become validation."""
    # Round first: 0.29 * 100 is 28.999999999999996 in floating point, and 29 is meant.
    n_val = int(round(val_fraction * len(full), 6))
    if n_val == 0:
        return full, None
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    return full.subset(perm[n_val:]), full.subset(perm[:n_val])


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
        from swa_research import streaming

        listing = list_image_folder(cfg)  # once, for the choice and either path
        in_memory, reason = streaming.choose_path(cfg, device, listing)
        log.info("%s", reason)
        if not in_memory:
            s = streaming.open_image_folder(cfg, seed, num_workers, listing=listing,
                                            memory_format=memory_format)
            return DataSplits(s.train, s.val, s.test, s.classes, streamed=True)
    train_full, test, classes = load_datasets(cfg, num_workers, listing)
    if train_full.images.shape[-1] != train_full.images.shape[-2]:
        raise UserError(f"images are {tuple(train_full.images.shape[-2:])}: square images "
                        "are expected; set data.image_size")
    train, val = split_train_val(train_full, cfg.val_fraction, seed)
    if len(train) == 0:
        raise UserError("the training set is empty after the validation split")
    return DataSplits(train.to(device), None if val is None else val.to(device),
                      test.to(device), classes)


# ---------------------------------------------------------------------------------------------
# Batches


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
