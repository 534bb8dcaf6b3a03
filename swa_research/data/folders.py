"""Image folders (``root/train/<class>/<image>``, ``root/<test split>/<class>/<image>``):
listed once, each image decoded to what evaluation sees (:mod:`swa_research.data.transforms`)
and cached on disk so that the next run starts at once."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from swa_research.config import DataConfig, UserError
from swa_research.data.memory import ImageSet
from swa_research.data.transforms import ImageTransform, decode_image, infer_image_size
from swa_research.fileio import atomic_torch_save, user_cache_dir
from swa_research.locks import file_lock, lock_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CACHE_VERSION = 3  # bump when decoding changes (3: transforms.ImageTransform.eval)


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
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / ".swa_cache", user_cache_dir() / f"{root.name}-{key}"]


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

