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


# The averaging core's option for each swa.* key (swa_research.averaging: a method's options are
# its constructor's keyword arguments); the scale is swag_scale's or swag_diag_scale's.
SWA_OPTIONS = {"bn_update": "bn_update", "decay": "decay", "ema_warmup": "ema_warmup",
               "ema_buffers": "ema_buffers", "lawa_k": "lawa_k", "sigma_rel": "sigma_rel",
               "max_models": "max_models", "samples": "samples", "swag_device": "device",
               "swag_eval_every": "eval_every", "offload": "offload"}


def swa_key_message(text: str, scale_key: str = "swag_scale") -> str:
    """A core method's one-line error (``decay=1.5: ...``) in the config's key
    (``swa.decay=1.5: ...``); another message as it is."""
    arg, eq, rest = text.partition("=")
    keys = {v: k for k, v in SWA_OPTIONS.items()} | {"scale": scale_key}
    if not eq or arg not in keys:
        return text
    key = f"swa.{keys[arg]}"
    return f"{key}={rest}".replace(f"lower {arg}", f"lower {key}").replace(f"({arg}=",
                                                                            f"({key}=")


def validate_swa(sw: Any) -> None:
    """SWAG's options (its buffer, scales, samples, device), checked by the averaging core
    (:func:`swa_research.averaging.swag.check_swag_options`) whatever the method, so that a
    bad key is said before training; UserError naming the key."""
    from swa_research.averaging.swag import check_swag_options

    for key in ("swag_scale", "swag_diag_scale"):
        try:
            check_swag_options(max_models=sw.max_models, scale=getattr(sw, key),
                               samples=sw.samples, device=sw.swag_device,
                               eval_every=sw.swag_eval_every)
        except ValueError as e:
            raise UserError(swa_key_message(str(e), key)) from None


def check_posthoc_ema(t: Any) -> None:
    """trainer.posthoc_ema and posthoc_ema_every: two or more distinct widths in EDM2's range,
    saved every N >= 1 steps."""
    from swa_research.averaging.power_ema import MAX_SIGMA_REL

    widths = list(t.posthoc_ema or [])
    if not widths:
        return
    if len(set(widths)) < 2 or any(not 0 < float(s) < MAX_SIGMA_REL for s in widths):
        raise UserError(f"trainer.posthoc_ema={widths}: two or more distinct relative widths "
                        f"in (0, {MAX_SIGMA_REL:.4f}), e.g. [0.05,0.10] (EDM2's pair): the "
                        "reconstruction fits a width out of several")
    if t.posthoc_ema_every < 1:
        raise UserError(f"trainer.posthoc_ema_every={t.posthoc_ema_every}: set the steps between "
                        "saves of the post-hoc EMA profiles (e.g. 500), at least 1")


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
