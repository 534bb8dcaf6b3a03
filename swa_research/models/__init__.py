"""The model registry: a name (``model=NAME``) -> a builder with plain arguments.

A builder is ``builder(num_classes, image_size, *, option=default, ...)``: its keyword-only
arguments are the model's options on the command line (``model.OPTION=...``), their defaults
the defaults, their annotations (bool, int, float, str) the types. A family's options stay its
own: ``model.batch_norm`` is refused for a model whose builder does not take it. A builder
raises ValueError for a bad option value, naming it.

Adding a model is one file with its builder and one line in :data:`MODELS` (or a call of
:func:`register_model`); ``model=NAME`` then works without a yaml file.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swa_research.errors import UserError
from swa_research.models import gpt, preresnet, timm_models, tv, vgg, wrn


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]
    # The input size must be a multiple of this (the network's total downsampling).
    image_multiple: int = 1
    # What it models: classification (images -> class logits) or lm (tokens -> next-token
    # logits, task=lm).
    task: str = "classification"


MODELS: dict[str, ModelEntry] = {
    "simplified": ModelEntry(vgg.simplified, image_multiple=8),
    "vgg11": ModelEntry(vgg.vgg11, image_multiple=32),
    "vgg13": ModelEntry(vgg.vgg13, image_multiple=32),
    "vgg16": ModelEntry(vgg.vgg16, image_multiple=32),
    "vgg19": ModelEntry(vgg.vgg19, image_multiple=32),
    "preresnet110": ModelEntry(preresnet.preresnet110, image_multiple=4),
    "preresnet164": ModelEntry(preresnet.preresnet164, image_multiple=4),
    "wrn28x10": ModelEntry(wrn.wrn28x10, image_multiple=4),
    "torchvision": ModelEntry(tv.torchvision_model),
    "timm": ModelEntry(timm_models.timm_model),
    "gpt": ModelEntry(gpt.gpt, task="lm"),
}


# Options of every model, handled outside its builder: sync_bn converts its BatchNorm layers to
# SyncBatchNorm for training under DDP (batch statistics over the global batch).
COMMON_OPTIONS: dict[str, bool] = {"sync_bn": False}


def register_model(name: str, build: Callable[..., nn.Module], image_multiple: int = 1,
                   task: str = "classification") -> None:
    """Add a model under ``name`` (from a plugin, a notebook or a test) for ``task``."""
    MODELS[name] = ModelEntry(build, image_multiple, task)


def model_task(model: dict[str, Any]) -> str | None:
    """The task a model config's model is for (its registry entry's); None for an unknown
    name (refused where the model is resolved)."""
    entry = MODELS.get(model.get("name"))  # type: ignore[arg-type]
    return None if entry is None else entry.task


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The options of a registered model: its builder's keyword-only arguments."""
    sig = inspect.signature(MODELS[name].build)
    return {p.name: p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}


_TYPES: dict[Any, type] = {bool: bool, int: int, float: float, str: str,
                           "bool": bool, "int": int, "float": float, "str": str}


def _typed(key: str, value: Any, param: inspect.Parameter) -> Any:
    annotation = param.annotation
    if isinstance(annotation, str):  # "str | None": a str, or None (null)
        annotation = annotation.removesuffix(" | None")
    want = _TYPES.get(annotation)
    if want is None or value is None:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and not isinstance(value, bool) or not isinstance(value, want):
        raise UserError(f"model.{key}={value!r}: expected a {want.__name__}")
    return value


def resolve_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """``{"name": ..., options}`` completed with the builder's defaults, each option checked
    for its name and type, and its value by building the model on the meta device (no
    memory, no compute). Raises UserError naming the key."""
    name = model.get("name")
    if name not in MODELS:
        raise UserError(f"model={name}: no such model; expected one of {', '.join(MODELS)}")
    params = model_options(name)
    out: dict[str, Any] = {"name": name}
    for key, value in model.items():
        if key == "name":
            continue
        if key in COMMON_OPTIONS:
            if not isinstance(value, type(COMMON_OPTIONS[key])):
                raise UserError(f"model.{key}={value!r}: expected a "
                                f"{type(COMMON_OPTIONS[key]).__name__}")
            out[key] = value
            continue
        if key not in params:
            near = difflib.get_close_matches(key, list(params), n=1, cutoff=0.5)
            raise UserError(
                f"model.{key}: not an option of model {name} (its options: "
                f"{', '.join(params) or 'none'})" + (f"; did you mean model.{near[0]}?"
                                                     if near else ""))
        out[key] = _typed(key, value, params[key])
    for key, default in COMMON_OPTIONS.items():
        out.setdefault(key, default)
    for key, p in params.items():
        if key not in out:
            if p.default is inspect.Parameter.empty:
                raise UserError(f"model.{key} has no value: set it on the command line "
                                f"(model.{key}=...)")
            out[key] = p.default
    entry = MODELS[name]
    try:
        with torch.device("meta"), initialization_skipped():
            entry.build(2, entry.image_multiple * max(1, 32 // entry.image_multiple),
                        **builder_options(out))
    except ValueError as e:
        raise UserError(str(e)) from e
    return out


def build_model(model: dict[str, Any], num_classes: int, image_size: int = 32) -> nn.Module:
    """The model ``model`` (a resolved model config) names, for ``num_classes`` classes and
    square inputs of ``image_size``."""
    name = model["name"]
    if name not in MODELS:
        raise UserError(f"model={name}: no such model; expected one of {', '.join(MODELS)}")
    entry = MODELS[name]
    if image_size % entry.image_multiple:
        raise UserError(f"model {name} needs an image size that is a multiple of "
                        f"{entry.image_multiple}, got {image_size} (set data.image_size)")
    return entry.build(num_classes, image_size, **builder_options(model))


def builder_options(model: dict[str, Any]) -> dict[str, Any]:
    """A model config's options that its builder takes (not its name, not the common ones)."""
    return {k: v for k, v in model.items() if k != "name" and k not in COMMON_OPTIONS}


@contextlib.contextmanager
def initialization_skipped() -> Iterator[None]:
    """``torch.nn.init``'s functions as no-ops, for a model built on the meta device only to
    check its options: a random init on meta runs through PyTorch's Python references, which
    import torch._dynamo (160 MiB of resident memory for every run, a language model's too)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def mismatch_detail(error: BaseException) -> str:
    """The line of a ``load_state_dict`` error that says what does not fit (its last)."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """``model`` with ``state`` loaded; a one-line UserError ``<where>: does not fit the model:
    <what>`` when the names or shapes differ."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{where}: does not fit the model: {mismatch_detail(e)}") from None
    return model
