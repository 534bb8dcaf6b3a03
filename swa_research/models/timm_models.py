"""Any image model of ``timm`` by name: ``model=timm model.arch=convnext_atto`` (the ``[timm]``
extra).

``model.weights``: null (timm's init for the data's classes), ``pretrained`` (timm's weights
for the arch, or for its tag: ``model.arch=resnet50.a1_in1k``; timm downloads them from the
Hugging Face Hub into its cache, so a first use needs the network: offline, one line says to
pass a file) or a local file of them (``.safetensors``, ``.pth``, ``.bin``). timm fits
pretrained weights to the data's classes itself: the classifier is dropped and made afresh when
the numbers differ. ``model.img_size`` (0: the data's size) goes to the models that take one
(ViTs and the like); ``model.drop_rate`` and ``model.drop_path_rate`` are timm's.

On the meta device (the check of a config before any data is loaded) nothing is read or
downloaded: the arch, its options and the weights' file are checked.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError("model=timm needs the timm package: pip install 'swa_research[timm]' "
                         "(or pip install timm)") from None
    return timm


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _check_arch(timm: Any, arch: str) -> None:
    name = timm.models.split_model_name_tag(arch)[0]
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise ValueError(f"model.arch={arch}: not a timm model" + (
            f"; did you mean {', '.join(near)}?" if near else
            " (timm.list_models() names them)"))


def timm_model(num_classes: int, image_size: int = 32, *, arch: str = "resnet18",
               weights: str | None = None, img_size: int = 0, drop_rate: float = 0.0,
               drop_path_rate: float = 0.0) -> nn.Module:
    """``timm.create_model(arch)`` for ``num_classes`` classes, from scratch or from
    ``weights`` (``pretrained`` or a file)."""
    timm = _timm()
    _check_arch(timm, arch)
    if weights is not None and not weights.strip():
        raise ValueError("model.weights='': expected pretrained, a file path or null")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate,
                              "drop_path_rate": drop_path_rate}
    path = None
    if weights not in (None, "pretrained"):
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise ValueError(f"model.weights={weights}: neither 'pretrained' nor a file")
    if _on_meta():
        return _on_meta_model(timm, arch, kwargs, img_size or image_size)
    if weights is not None:
        kwargs["pretrained"] = True
        if path is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return _create(timm, arch, kwargs, img_size or image_size)
    except (OSError, RuntimeError) as e:
        if weights is None:
            raise
        first = " ".join(str(e).split())[:160]
        source = str(path) if path is not None else "the Hugging Face Hub (offline?)"
        raise ValueError(f"model.weights={weights}: could not load timm's weights of {arch} "
                         f"from {source} ({type(e).__name__}: {first}); without network, save "
                         "them to a file and pass model.weights=PATH") from None


def _create(timm: Any, arch: str, kwargs: dict[str, Any], img_size: int) -> nn.Module:
    """The model, given ``img_size`` when its class takes one (a ViT's position embeddings);
    the others (CNNs) do not and get none."""
    try:
        return timm.create_model(arch, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(arch, **kwargs)


def _on_meta_model(timm: Any, arch: str, kwargs: dict[str, Any], img_size: int) -> nn.Module:
    """The model on meta for the config's check; a model whose construction reads tensors
    (timm's stochastic-depth rates) is checked by its arch and options only."""
    try:
        return _create(timm, arch, kwargs, img_size)
    except (RuntimeError, NotImplementedError):
        return nn.Identity()
