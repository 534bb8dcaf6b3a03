"""The checks of single config groups that :func:`swa_research.config.validate` runs (the
averaging options, the data set's paths and streaming keys): each a UserError naming the key.
Typed loosely (``Any``): the config's dataclasses import these, not the other way round."""

from __future__ import annotations

import math
from typing import Any

from swa_research.errors import UserError


def check_positive(value: float, key: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{key}={value}: must be a positive number")


def validate_swa(sw: Any) -> None:
    """The averaging methods' own options (SWAG's buffer, scales, samples, device); also used by
    the library's ``make_average``. UserError naming the key."""
    if sw.max_models < 2:
        # The low-rank part divides by sqrt(max_models - 1) (swa_gaussian's SWAG.sample_fullrank).
        raise UserError(f"swa.max_models={sw.max_models}: must be at least 2")
    for key in ("swag_scale", "swag_diag_scale"):
        value = getattr(sw, key)
        if not (math.isfinite(value) and 0 <= value <= 100):
            raise UserError(f"swa.{key}={value}: must be a number in [0, 100] (the sample "
                            "variance's factor; swa_gaussian uses 0.5 for SWAG, 1.0 for "
                            "SWAG-Diagonal)")
    if sw.samples < 1:
        raise UserError(f"swa.samples={sw.samples}: must be at least 1")
    if sw.swag_eval_every < 0:
        raise UserError(f"swa.swag_eval_every={sw.swag_eval_every}: must be >= 0 "
                        "(0: only at the final evaluation)")
    if not (sw.swag_device in ("auto", "cpu", "cuda") or sw.swag_device.startswith("cuda:")):
        raise UserError(f"swa.swag_device={sw.swag_device!r}: expected auto, cpu, cuda or cuda:N")


def validate_data_paths(d: Any) -> None:
    """data.in_memory and the streaming keys (swa_research.data.streaming); UserError naming
    the key."""
    mode = str(d.in_memory).strip().lower()  # Hydra's true/false arrive as "True"/"False"
    if mode not in ("auto", "true", "false"):
        raise UserError(f"data.in_memory={d.in_memory!r}: expected auto, true or false")
    folder = d.name in ("imagefolder", "imagenet")
    if mode == "false" and not folder:
        raise UserError(f"data.in_memory=false: only image folders stream from disk "
                        f"(data.name={d.name} is loaded into memory)")
    if d.augment == "random_resized_crop" and not folder:
        raise UserError(f"data.augment=random_resized_crop: needs an image folder streamed from "
                        f"disk (data.name={d.name})")
    if d.augment == "random_resized_crop" and mode == "true":
        raise UserError("data.augment=random_resized_crop: crops each image while decoding, "
                        "so it needs data.in_memory=auto or false")
    if not (math.isfinite(d.memory_fraction) and 0 < d.memory_fraction <= 1):
        raise UserError(f"data.memory_fraction={d.memory_fraction}: must be in (0, 1]")
    if d.resize_size is not None:
        check_positive(d.resize_size, "data.resize_size")
        if d.image_size and d.resize_size < d.image_size:
            raise UserError(f"data.resize_size={d.resize_size}: smaller than "
                            f"data.image_size={d.image_size} (the centre crop would pad)")
    cs = d.crop_scale
    if len(cs) != 2 or not 0 < cs[0] <= cs[1] <= 1:
        raise UserError(f"data.crop_scale={list(cs)}: expected [min, max] with "
                        "0 < min <= max <= 1")
    if d.prefetch_factor < 1:
        raise UserError(f"data.prefetch_factor={d.prefetch_factor}: must be at least 1")
    split = d.test_split
    if not split or split == "train" or "/" in split or split.startswith("."):
        raise UserError(f"data.test_split={split!r}: must name a folder next to train/ "
                        "(test, val)")
