"""Text from a language-model run: ``python -m swa_research.sample RUN_DIR [--weights swa]
[--prompt TEXT] [--tokens 200] [--temperature 0.8] [--top-k 200] [--samples 1] [--seed 0]``.

As nanoGPT's ``sample.py``: the run's model with the SGD weights (``--weights sgd``, its
``sgd_final.pt``) or an average's (``--weights NAME``, its ``NAME.pt``), the prompt encoded with
the run's tokenizer (recorded in the weight file; for a file written before that, read from the
run's token file), then ``--tokens`` tokens drawn one at a time from the softmax of the last
position's logits divided by ``--temperature``, among the ``--top-k`` likeliest
(``--temperature 0``: the likeliest, no draw). ``--seed`` makes it repeatable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.errors import UserError
from swa_research.fileio import read_weights, weights_location


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor, tokens: int, *, temperature: float, top_k: int,
             vocab: int, block: int, generator: torch.Generator) -> Tensor:
    """``ids`` [B, T] continued by ``tokens`` tokens (nanoGPT's ``GPT.generate``): the context
    cropped to the last ``block``; ids at or beyond ``vocab`` (a padded vocabulary's) never
    drawn."""
    model.eval()
    for _ in range(tokens):
        logits = model(ids[:, -block:])[:, -1, :].float()
        logits[:, vocab:] = -float("inf")
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, vocab)).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def tokenizer_of(saved: dict[str, Any], config: Any) -> Any:
    """The run's tokenizer: recorded in the weight file, else the run's token file's."""
    from swa_research.data.text import Tokenizer, gpt2_tokenizer, load_tokens

    record = saved.get("tokenizer")
    if isinstance(record, dict):
        if record.get("name") == "gpt2":
            return gpt2_tokenizer()
        return Tokenizer(str(record["name"]), int(record["vocab_size"]),
                         str(record.get("chars", "")))
    d = config.data
    _, tok = load_tokens(d.root, d.tokenizer, d.pattern)
    return tok


def encode(tok: Any, prompt: str) -> list[int]:
    if tok.name == "char":
        missing = sorted({c for c in prompt if c not in tok.chars})
        if missing:
            raise UserError(f"--prompt: {''.join(missing)!r} not in the run's vocabulary of "
                            f"{tok.vocab_size} characters")
    return [int(i) for i in tok.encode(prompt)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.sample",
        description="Text from a language-model run's SGD weights or one of its averages.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--weights", default="sgd", help="sgd, or an average's name (swa, ...)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    try:
        print(sample(args), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def sample(args: argparse.Namespace) -> str:
    from swa_research.models import build_model, load_state
    from swa_research.training.build import load_run_config, resolve_device

    if args.tokens < 1 or args.samples < 1 or args.top_k < 0 or not args.temperature >= 0:
        raise UserError("--tokens and --samples must be at least 1, --top-k >= 0 (0: all) and "
                        "--temperature >= 0 (0: the likeliest token)")
    config = load_run_config(args.run_dir)
    if config.task.name != "lm":
        raise UserError(f"{args.run_dir} trained task={config.task.name}: sampling is for "
                        "language models (task=lm)")
    name = "sgd_final.pt" if args.weights == "sgd" else f"{args.weights}.pt"
    path = weights_location(args.run_dir / name) or args.run_dir / name
    if not path.exists():
        kept = sorted(p.stem for p in args.run_dir.glob("*.pt") if p.stem not in
                      ("checkpoint", "checkpoint.prev", "sgd_final", "sgd_best_val"))
        raise UserError(f"--weights {args.weights}: {path} not found; this run kept sgd"
                        + "".join(f", {k}" for k in kept))
    try:
        saved = read_weights(path)
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__})") from None
    tok = tokenizer_of(saved, config)
    device = resolve_device(args.device, "--device ")
    model = build_model(config.model, tok.vocab_size, 32)
    load_state(model, saved["state_dict"], str(path))
    model.to(device)
    ids = torch.tensor([encode(tok, args.prompt)] * args.samples, dtype=torch.int64,
                       device=device)
    if ids.shape[1] == 0:
        raise UserError("--prompt: empty after encoding; give at least one character")
    out = generate(model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                   vocab=tok.vocab_size, block=int(config.model["block_size"]),
                   generator=torch.Generator().manual_seed(args.seed))
    return "\n---------------\n".join(tok.decode(row.tolist()) for row in out)
