"""Any classification model of ``torchvision.models`` by name: ``model=torchvision
model.arch=resnet50 model.weights=IMAGENET1K_V2``.

``model.weights`` is None (a fresh init for ``num_classes``), a local file (a state dict saved
with ``torch.save``, or a checkpoint dict holding one under ``"state_dict"``) or a torchvision
weights name (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``), downloaded
by torchvision into its cache. When the weights have another number of classes than the data,
the last ``nn.Linear`` (``fc``, ``classifier[-1]``, ``heads.head``, ...) is replaced by a fresh
one for ``num_classes``.

On the meta device (the registry's check of a config before any data is loaded) nothing is
read or downloaded: the arch and the weights' name or file are checked only.
"""

from __future__ import annotations

import difflib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from swa_research.versions import import_torchvision

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

# torchvision is imported where it is used: importing the model registry (every command line)
# stays free of its import time.

# Suffixes that make a weights value a file path even when the file does not exist.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# Prefixes a saved state dict may carry: DistributedDataParallel's and torch.compile's.
_PREFIXES = ("module.", "_orig_mod.")


def classification_models() -> list[str]:
    """The names ``model.arch`` accepts."""
    torchvision = import_torchvision()

    return torchvision.models.list_models(module=torchvision.models)


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _check_arch(arch: str) -> None:
    names = classification_models()
    if arch in names:
        return
    near = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ValueError(f"model.arch={arch!r}: not a torchvision classification model{hint} "
                     f"(torchvision.models.list_models(module=torchvision.models) names all "
                     f"{len(names)})")


def _is_file_path(weights: str) -> bool:
    return (Path(weights).expanduser().exists() or "/" in weights or "\\" in weights
            or weights.lower().endswith(_FILE_SUFFIXES))


def _torchvision_weights(arch: str, name: str) -> WeightsEnum:
    """The weights enum member ``name`` (``IMAGENET1K_V1`` or ``ResNet50_Weights.IMAGENET1K_V1``)
    of ``arch``; offline."""
    torchvision = import_torchvision()

    enum = torchvision.models.get_model_weights(arch)
    choices = [*enum.__members__]
    member = name.rpartition(".")[2]
    if "." in name and name.partition(".")[0] != enum.__name__:
        raise ValueError(f"model.weights={name!r}: not weights of model.arch={arch} (its "
                         f"weights are {enum.__name__}.{{{', '.join(choices)}}})")
    if member not in enum.__members__:
        near = difflib.get_close_matches(member, choices, n=1, cutoff=0.5)
        raise ValueError(f"model.weights={name!r}: neither a file nor weights of "
                         f"model.arch={arch} (expected one of {', '.join(choices)}"
                         + (f"; did you mean {near[0]}?)" if near else ")"))
    return enum[member]


def _head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The classifier: the last ``nn.Linear`` of ``model`` (resnet ``fc``, densenet
    ``classifier``, vgg/efficientnet/mobilenet/convnext ``classifier[-1]``, vit
    ``heads.head``, swin ``head``); None when there is none (squeezenet's conv head)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    head = _head(model)
    if head is None:
        raise ValueError(f"model.arch={arch}: its classifier is not a final nn.Linear, so its "
                         f"head cannot be replaced for {num_classes} classes; use weights with "
                         f"{num_classes} classes or model.weights=null")
    name, old = head
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, leaf, new)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses what is not tensors and data
        raise ValueError(f"model.weights={path}: not a file of tensors that can be loaded "
                         "safely (torch.load weights_only refused it: a damaged file, or one "
                         "holding Python objects, which are never run)") from e
    except Exception as e:  # noqa: BLE001 - a bad file of any kind is the user's input
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"model.weights={path}: cannot be read as a state dict "
                         f"({type(e).__name__}: {first})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.weights={path}: not a state dict (tensors by name) nor a "
                         f"checkpoint dict with one under 'state_dict'")
    out = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _load_file(model: nn.Module, arch: str, path: Path, num_classes: int) -> None:
    state = _read_state_dict(path)
    head = _head(model)
    if head is not None and f"{head[0]}.weight" in state:
        file_classes = state[f"{head[0]}.weight"].shape[0]
        if file_classes != num_classes:
            _replace_head(model, arch, file_classes)  # load as saved, then a fresh head
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        hint = "" if head is not None else (
            f"; its classifier is not a final nn.Linear, so its head cannot be replaced for "
            f"{num_classes} classes")
        raise ValueError(f"model.weights={path}: does not fit model.arch={arch}{hint} "
                         f"({detail[:300]}{'...' if len(detail) > 300 else ''})") from e
    if head is not None and _head(model)[1].out_features != num_classes:  # type: ignore[index]
        _replace_head(model, arch, num_classes)


def _vit_size(arch: str, model_kwargs: dict[str, Any], image_size: int,
              weights: WeightsEnum | None) -> None:
    """ViT's position embeddings fix its input size: the weights' size, or ``image_size``
    (a multiple of the patch size) when trained from scratch."""
    if not arch.startswith("vit_"):
        return
    patch = int(arch.rsplit("_", 1)[1])
    if weights is not None:
        size = int(weights.meta["min_size"][0])
        if image_size != size and not _on_meta():
            raise ValueError(f"data.image_size={image_size}: model.arch={arch} with "
                             f"model.weights={weights} needs {size}x{size} images; set "
                             f"data.image_size={size}")
        return
    if image_size % patch and _on_meta():
        return  # the registry's check builds with a stand-in size: the real one comes later
    if image_size % patch:
        raise ValueError(f"data.image_size={image_size}: model.arch={arch} needs a multiple "
                         f"of its patch size {patch} (224 for its pretrained weights)")
    model_kwargs["image_size"] = image_size


def _get_model(arch: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model``; on the meta device RegNet's block widths (computed
    with tensors, then read back) are computed on the CPU, the network itself on meta."""
    torchvision = import_torchvision()

    if not (_on_meta() and arch.startswith("regnet_")):
        return torchvision.models.get_model(arch, **kwargs)
    from torchvision.models.regnet import BlockParams

    original = BlockParams.__dict__["from_init_params"]

    def on_cpu(cls: type, *args: Any, **kw: Any) -> Any:
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kw)

    BlockParams.from_init_params = classmethod(on_cpu)  # type: ignore[method-assign,assignment]
    try:
        return torchvision.models.get_model(arch, **kwargs)
    finally:
        BlockParams.from_init_params = original  # type: ignore[method-assign]


def torchvision_model(num_classes: int, image_size: int = 32, *, arch: str = "resnet18",
                      weights: str | None = None) -> nn.Module:
    """A classification model of ``torchvision.models`` by name (``model.arch``), from scratch
    or from ``model.weights`` (a local file or a torchvision weights name), its head replaced
    when the weights have another number of classes than ``num_classes``."""
    _check_arch(arch)
    if weights is not None and not weights.strip():
        raise ValueError("model.weights='': expected a file path, a torchvision weights name "
                         "or null")
    extra: dict[str, Any] = {}
    if arch in ("googlenet", "inception_v3"):
        extra["init_weights"] = True  # torchvision's init, without its FutureWarning
    if weights is None or _is_file_path(weights):
        if arch in ("googlenet", "inception_v3"):
            extra["aux_logits"] = False  # a plain logits tensor in training mode too
        _vit_size(arch, extra, image_size, None)
        path = None
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ValueError(f"model.weights={weights}: no such file")
        model = _get_model(arch, weights=None, num_classes=num_classes, **extra)
        if path is not None and not _on_meta():
            _load_file(model, arch, path, num_classes)
        return model

    tv_weights = _torchvision_weights(arch, weights)
    _vit_size(arch, extra, image_size, tv_weights)
    classes = len(tv_weights.meta["categories"])
    if _on_meta():  # the name is known: nothing to read for a check of the config
        model = _get_model(arch, weights=None, num_classes=classes)
    else:
        try:
            model = _get_model(arch, weights=tv_weights)
        except (OSError, RuntimeError) as e:
            first = " ".join(str(e).split())[:200]
            raise ValueError(
                f"model.weights={weights}: could not get {tv_weights} from {tv_weights.url} "
                f"({type(e).__name__}: {first}); without network, save those weights to a "
                f"file and pass model.weights=PATH") from e
    if classes != num_classes:
        _replace_head(model, arch, num_classes)
    return model
