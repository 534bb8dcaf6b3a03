"""The one definition of an image folder's transforms, for every path that reads one.

The in-memory loader (:mod:`swa_research.data`: decoded once, augmented per batch on the
device) and the streaming loader (:mod:`swa_research.streaming`: decoded per batch in worker
processes) both call these functions, so that ``data.in_memory`` (and ``auto``'s choice, which
depends on the machine's memory) never changes a result:

- **Evaluation, and what the in-memory path stores**: :meth:`ImageTransform.eval`, the shorter
  side resized to ``resize_size`` (antialiased bilinear; None: ``image_size``), then a centre
  crop of ``image_size`` x ``image_size``. An image of that size already is left untouched.
- **crop_flip**: the evaluation image, zero-padded by ``pad``, a random ``image_size`` crop and
  a horizontal flip with probability 1/2. The draws of the image at position ``p`` of an epoch
  are a pure function of ``(aug_seed, p)`` (:func:`crop_flip_params`, counter-based), so a batch
  of them is computed at once on the in-memory path and one at a time in a worker, with the
  same values, whatever the batch, the worker count, the rank or a mid-epoch resume.
- **random_resized_crop**: torchvision v2's ``RandomResizedCrop`` and ``RandomHorizontalFlip``
  of the full decoded image, seeded per image by the same ``(aug_seed, p)``; it needs the
  full-size image, so only the streaming path does it.
- ``data.image_size`` left unset is the side of the first training image (it must be square):
  :func:`infer_image_size`, for both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from swa_research.errors import UserError

__all__ = ["ImageTransform", "crop_flip_params", "decode_image", "image_seeds",
           "infer_image_size", "random_resized_crop_params"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def image_seeds(aug_seed: int, positions: Tensor) -> Tensor:
    """The seeds (int64 >= 0) of the random transforms of the images at ``positions`` of an
    epoch: splitmix64 of (aug_seed, position), so that nearby pairs give unrelated seeds."""
    with np.errstate(over="ignore"):
        x = positions.cpu().numpy().astype(np.uint64)
        x = x + np.uint64((aug_seed * _GOLDEN + 0x632BE59BD9B4E5B) & _MASK64)
        x = _mix64(x) & np.uint64((1 << 63) - 1)
    return torch.from_numpy(x.astype(np.int64))


def crop_flip_params(seeds: Tensor, pad: int) -> Tensor:
    """The pad-``pad`` crop offsets and flips of images with these ``seeds`` (from
    :func:`image_seeds`): int64 [3, n] rows (dy, dx, flip), each in [0, 2 pad] or {0, 1}, three
    independent splitmix64 words per seed (the modulo's bias is below 1e-17)."""
    x = seeds.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        words = [_mix64(x + np.uint64((k * _GOLDEN) & _MASK64)) for k in (1, 2, 3)]
    span = np.uint64(2 * pad + 1)
    rows = [words[0] % span, words[1] % span, words[2] >> np.uint64(63)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], generator: torch.Generator
                               ) -> tuple[int, int, int, int]:
    """(top, left, height, width): torchvision v2 ``RandomResizedCrop.make_params``, drawing
    from ``generator`` in the same order (so the same draws as under ``torch.manual_seed``)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1],
                                                     generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = width / height  # fallback: the central crop, as torchvision's
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_image(path: Path | str) -> Tensor:
    """One image file -> uint8 [3, H, W] (RGB), at the file's size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    w, h = rgb.size
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1).contiguous()


def infer_image_size(first: Path | str) -> int:
    """``data.image_size`` left unset: the side of ``first`` (the first training image, read
    from its header), which must be square."""
    from PIL import Image

    try:
        with Image.open(first) as im:
            w, h = im.size
    except Exception as e:
        raise UserError(f"cannot read image {first}: {type(e).__name__}: {e}") from e
    if w != h:
        raise UserError(f"data.image_size is not set and the first training image {first} is "
                        f"{w}x{h}, not square; set data.image_size (e.g. data.image_size=224)")
    return int(w)


@dataclass(frozen=True)
class ImageTransform:
    """uint8 [3, H, W] image -> uint8 [3, image_size, image_size]; picklable (workers)."""

    image_size: int
    resize_size: int | None = None  # shorter side before the centre crop; None: image_size
    augment: str = "none"  # none | crop_flip | random_resized_crop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    pad: int = 4

    def eval(self, img: Tensor) -> Tensor:
        """Shorter side to ``resize_size``, centre crop ``image_size``: what evaluation sees and
        what the in-memory path keeps."""
        from torchvision.transforms.v2 import functional as F

        size = self.resize_size or self.image_size
        if min(img.shape[-2:]) != size:
            img = F.resize(img, [size], antialias=True)
        if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
            img = F.center_crop(img, [self.image_size, self.image_size])
        return img.contiguous()

    def train(self, img: Tensor, seed: int) -> Tensor:
        """The training augmentation of one decoded image, seeded by its :func:`image_seeds`."""
        from torchvision.transforms.v2 import functional as F

        if self.augment == "random_resized_crop":
            generator = torch.Generator().manual_seed(seed)
            top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1],
                                                         self.scale, self.ratio, generator)
            img = F.resized_crop(img, top, left, h, w, [self.image_size, self.image_size],
                                 antialias=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                img = F.horizontal_flip(img)
            return img.contiguous()
        img = self.eval(img)
        if self.augment == "crop_flip":
            dy, dx, flip = crop_flip_params(torch.tensor([seed]), self.pad)[:, 0].tolist()
            p, s = self.pad, self.image_size
            img = F.pad(img, [p, p, p, p])[:, dy:dy + s, dx:dx + s]
            if flip:
                img = F.horizontal_flip(img)
        elif self.augment != "none":
            raise ValueError(f"unknown augmentation {self.augment!r}")
        return img.contiguous()
