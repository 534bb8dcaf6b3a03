"""Which keys of a composed config act in a run (:func:`unused_keys`): what W&B records and
what ``--cfg job`` shows first. Nothing is removed from the run's record."""

from __future__ import annotations

from typing import Any

from swa_research.config import flatten_dict

_FOLDER_KEYS = ("in_memory", "memory_fraction", "test_split", "resize_size", "crop_scale",
                "prefetch_factor", "cache", "image_size")
_SYNTHETIC_KEYS = ("num_classes", "train_size", "test_size", "image_size")
_TEXT_KEYS = ("tokenizer", "pattern", "test_fraction", "windows_per_epoch", "eval_tokens")
_SWAG_KEYS = ("max_models", "swag_scale", "samples", "swag_device", "swag_eval_every")


def unused_keys(config: dict[str, Any]) -> list[str]:
    """The keys of a plain nested config (``config_dict_of``) that do not act in this run: the
    image-folder options of a CIFAR run, SWAG's options without SWAG, EMA's without EMA, the
    options of the schedules and optimizers not chosen. What W&B records and ``--cfg job``
    shows first are the others; nothing is removed from the run's record."""
    data, swa = config.get("data") or {}, config.get("swa") or {}
    sched, opt = config.get("schedule") or {}, config.get("optimizer") or {}
    name = data.get("name")
    data_keys = {"imagefolder": _FOLDER_KEYS, "imagenet": _FOLDER_KEYS,
                 "synthetic": _SYNTHETIC_KEYS, "text": _TEXT_KEYS}.get(name, ())
    unused = [f"data.{k}" for k in (*_FOLDER_KEYS, *_SYNTHETIC_KEYS, *_TEXT_KEYS, "download")
              if k in data and k not in data_keys
              and not (k == "download" and name in ("cifar10", "cifar100"))]
    if name == "text":  # tokens: no image transforms
        unused += [f"data.{k}" for k in ("augment", "normalize", "subset")]
    if not data.get("normalize") or name == "text":
        unused += ["data.mean", "data.std"]
    methods = set() if swa.get("method") == "none" else {swa.get("method"),
                                                          *also_methods(swa.get("also"))}
    if swa.get("method") == "none":
        unused += [f"swa.{k}" for k in swa if k != "method"]
    else:
        if not methods & {"swag", "swag_diag"}:
            unused += [f"swa.{k}" for k in (*_SWAG_KEYS, "swag_diag_scale") if k in swa]
        else:
            if "swag" not in methods:
                unused += ["swa.swag_scale", "swa.max_models"]
            if "swag_diag" not in methods:
                unused.append("swa.swag_diag_scale")
        if "ema" not in methods:
            unused += [k for k in ("swa.decay", "swa.ema_warmup") if k.split(".")[1] in swa]
        if "lawa" not in methods:
            unused.append("swa.lawa_k")
    s_name = sched.get("name")
    if s_name != "cyclical":
        unused.append("schedule.cycle")
    if s_name not in ("warmup_cosine", "warmup_constant", "wsd"):
        unused.append("schedule.warmup")
    if s_name != "wsd":
        unused += ["schedule.cooldown", "schedule.cooldown_shape"]
    if s_name not in ("decay_then_constant", "fge"):
        unused += [f"schedule.{k}" for k in ("step_unit", "decay_start", "decay_end",
                                             "final_ratio")]
    if s_name != "fge":
        unused += ["schedule.fge_cycle", "schedule.fge_lr_high"]
    if opt.get("name") == "sgd":
        unused.append("optimizer.betas")
    else:
        unused += ["optimizer.momentum", "optimizer.nesterov"]
    if opt.get("name") != "adamw_schedulefree":
        unused += ["optimizer.weight_lr_power", "optimizer.r"]
    present = flatten_dict(config)
    return [k for k in dict.fromkeys(unused) if k in present]


def also_methods(also: Any) -> list[str]:
    """The methods of ``swa.also``'s entries (a method's name, or a named average's mapping
    whose ``method`` defaults to its ``name``), from a plain or an OmegaConf config."""
    return [str(e.get("method", e.get("name"))) if hasattr(e, "get") else str(e)
            for e in also or []]
