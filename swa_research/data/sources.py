"""Where a data set comes from: CIFAR-10/100 in torchvision's on-disk format (downloaded when
allowed), an image folder, or a generated learnable set."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from swa_research.config import DataConfig, UserError
from swa_research.data.folders import FolderListing, _imagefolder
from swa_research.data.memory import ImageSet, synthetic_images
from swa_research.locks import file_lock, lock_path
from swa_research.versions import import_torchvision

log = logging.getLogger(__name__)


def _cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str]]:
    torchvision = import_torchvision()

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

