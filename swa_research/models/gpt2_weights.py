"""OpenAI's GPT-2 weights for :class:`swa_research.models.gpt.GPT` (``model.weights=gpt2``), as
nanoGPT's ``GPT.from_pretrained``: the shape is the release's (12/24/36/48 layers, 768 to 1,600
wide, 1,024 positions, biases, GELU in its tanh form as GPT-2's ``gelu_new``), Hugging Face's
``Conv1D`` matrices transposed into ``nn.Linear``'s layout, the head tied to the token embedding.

``model.weights`` is a release (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``: the
``model.safetensors`` of ``openai-community/<name>`` on the Hugging Face Hub, taken from the
local Hugging Face cache, or downloaded there by ``huggingface_hub`` when it is installed and
the machine is online), a folder that ``transformers``' ``save_pretrained`` wrote (its
``config.json`` gives the shape) or one ``.safetensors`` / ``.bin`` file. Offline without the
file: one line saying where to put it. On the meta device (the check of a config) nothing is
read: the release's shape is known by name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# name -> (n_layer, n_head, n_embd): OpenAI's four releases (nanoGPT's config_args).
RELEASES: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
VOCAB, POSITIONS = 50257, 1024
HEADS_BY_WIDTH = {n_embd: n_head for _, n_head, n_embd in RELEASES.values()}
# Hugging Face's Conv1D keeps these as [in, out]: nn.Linear's transpose.
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
              "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _where(weights: str) -> str:
    return f"model.weights={weights}"


def _cached_release(name: str) -> Path | None:
    """The release's model.safetensors in the local Hugging Face cache, if there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    for repo in (f"openai-community/{name}", name):
        if try_to_load_from_cache is not None:
            found = try_to_load_from_cache(repo, "model.safetensors")
            if isinstance(found, str):
                return Path(found)
        else:  # the cache's layout, read by hand
            import os
            home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
            hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
            snaps = sorted((hub / f"models--{repo.replace('/', '--')}" / "snapshots")
                           .glob("*/model.safetensors"))
            if snaps:
                return snaps[-1]
    return None


def release_file(name: str) -> Path:
    """The release's weight file: the local cache, else a download into it."""
    found = _cached_release(name)
    if found is not None:
        return found
    hint = (f"{_where(name)}: OpenAI's GPT-2 weights are not in the Hugging Face cache and "
            f"could not be downloaded (%s); put model.safetensors of "
            f"https://huggingface.co/openai-community/{name} into a folder and give it as "
            "model.weights=FOLDER")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(hint % "huggingface_hub is not installed: pip install "
                                "huggingface_hub") from None
    try:
        return Path(hf_hub_download(f"openai-community/{name}", "model.safetensors"))
    except Exception as e:  # offline, no such file, refused: one line
        raise ValueError(hint % type(e).__name__) from None


def _read(path: Path, weights: str) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError(f"{_where(weights)}: reading a .safetensors file needs the "
                         "safetensors package: pip install safetensors") from None
    except Exception as e:
        raise ValueError(f"{_where(weights)}: {path} is not a weight file that can be read "
                         f"({type(e).__name__})") from None


def resolve(weights: str) -> tuple[Path | None, tuple[int, int, int] | None]:
    """(the weight file or None for a release not read yet, the shape if known by name)."""
    if weights in RELEASES:
        return None, RELEASES[weights]
    path = Path(weights).expanduser()
    if path.is_dir():
        files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not files:
            raise ValueError(f"{_where(weights)}: the folder holds neither of "
                             f"{', '.join(WEIGHT_FILES)}")
        config = path / "config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            return files[0], (int(c["n_layer"]), int(c["n_head"]), int(c["n_embd"]))
        return files[0], None
    if path.is_file():
        return path, None
    raise ValueError(f"{_where(weights)}: neither a GPT-2 release ({', '.join(RELEASES)}) nor "
                     "a file or folder of weights")


def hf_state(weights: str, n_head: int) -> tuple[dict[str, Tensor], tuple[int, int, int]]:
    """The weights in Hugging Face's names (without ``transformer.``) and the shape
    (n_layer, n_head, n_embd)."""
    path, shape = resolve(weights)
    if path is None:
        path = release_file(weights)
    raw = _read(path, weights)
    state = {k.removeprefix("transformer."): v for k, v in raw.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(f"{_where(weights)}: not GPT-2 weights (no wte.weight / wpe.weight)")
    if shape is None:
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
        width = state["wte.weight"].shape[1]
        shape = (layers, HEADS_BY_WIDTH.get(width, n_head), width)
    return state, shape


def to_gpt_state(state: dict[str, Tensor], n_layer: int, block_size: int
                 ) -> dict[str, Tensor]:
    """Hugging Face's GPT-2 tensors in :class:`GPT`'s names and layout: Conv1D matrices
    transposed, the attention masks dropped, the head tied to wte, the position embeddings
    cropped to ``block_size`` (nanoGPT's ``crop_block_size``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers; the head is wte (tied)
        out[key] = value.t().contiguous() if key.endswith(TRANSPOSED) else value
    out["wpe.weight"] = out["wpe.weight"][:block_size].contiguous()
    out["lm_head.weight"] = out["wte.weight"]
    expected = {f"h.{i}." for i in range(n_layer)}
    if not all(any(k.startswith(p) for k in out) for p in expected):
        raise ValueError(f"the weights hold fewer than {n_layer} layers")
    return out


def load_into(model: torch.nn.Module, state: dict[str, Tensor], weights: str) -> None:
    """``state`` (in GPT's names) into ``model``; one line when it does not fit."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{_where(weights)}: does not fit the GPT: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")


def describe(weights: str, shape: tuple[int, int, int], block_size: int) -> None:
    n_layer, n_head, n_embd = shape
    log.info("%s: GPT-2 weights, %d layers, %d heads, %d wide, %d positions of %d, GELU (tanh)"
             "; model.n_layer, n_head, n_embd and bias are the weights'", _where(weights),
             n_layer, n_head, n_embd, block_size, POSITIONS)
