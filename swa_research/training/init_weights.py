"""``trainer.init_weights``: the weights a run starts from, checked against the model and,
for a language model, against the run's vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from swa_research.errors import UserError
from swa_research.fileio import read_weights
from swa_research.models import load_state

log = logging.getLogger(__name__)


def load_init_weights(model: torch.nn.Module, path: str, tokenizer: Any = None) -> None:
    """``trainer.init_weights``: the weights a run starts from (a run's weight file, whose
    ``state_dict`` is taken, or a state dict); a one-line UserError when they cannot be read or
    do not fit the model, or (a language model: ``tokenizer``, the run's) when the file's
    recorded vocabulary is not the run's."""
    where = f"trainer.init_weights={path}"
    try:
        saved = read_weights(Path(path).expanduser())  # a .pt file or a sharded .dcp folder
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except Exception as e:
        raise UserError(f"{where}: not a weights file that can be loaded "
                        f"({type(e).__name__})") from None
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"{where}: holds no state dict (tensors by name)")
    if tokenizer is not None:
        check_vocabulary(saved.get("tokenizer") if isinstance(saved, dict) else None,
                         tokenizer, where)
    load_state(model, state, where)


def check_vocabulary(saved: Any, tokenizer: Any, where: str) -> None:
    """Weights trained on one vocabulary do not start a run on another: the same tokenizer,
    size and (char) characters, else a one-line UserError; a file that records none (a state
    dict, or written before weight files recorded it) is said once."""
    if not isinstance(saved, dict):
        log.warning("%s records no tokenizer (a bare state dict, or written before weight files "
                    "recorded theirs): that it was trained on this run's %s vocabulary of %d "
                    "cannot be checked", where, tokenizer.name, tokenizer.vocab_size)
        return
    mine = {"name": tokenizer.name, "vocab_size": int(tokenizer.vocab_size),
            "chars": tokenizer.chars}
    if saved.get("name") != mine["name"] or saved.get("vocab_size") != mine["vocab_size"]:
        raise UserError(f"{where}: trained on {saved.get('name')} tokens (vocabulary "
                        f"{saved.get('vocab_size')}), this run's are {mine['name']} (vocabulary "
                        f"{mine['vocab_size']}): its embeddings would mean other tokens")
    if saved.get("chars", "") != mine["chars"]:
        diff = sum(a != b for a, b in zip(saved.get("chars", ""), mine["chars"], strict=False))
        raise UserError(f"{where}: trained on another character set of the same size "
                        f"({diff} of {mine['vocab_size']} ids stand for other characters than in "
                        "this run's text): its embeddings would mean other characters")
