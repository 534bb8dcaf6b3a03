"""Memory per rank of a GPT trained with FSDP2 and its averages, computed from the model's shapes.

    python scripts/fsdp_memory.py                       # the table of docs/distributed.md
    python scripts/fsdp_memory.py --ranks 8,16 --averages 3 --offload
    python scripts/fsdp_memory.py --run RUN_DIR         # a run's measured bytes beside these

Each row is one model shape on N ranks under ``trainer.strategy=fsdp``: the fp32 weights, the
fp32 gradients and AdamW's two fp32 moments, each 1/N of the whole per rank, every average
(``swa``, ``ema``, ``lawa``: 4 bytes a parameter, LAWA's ring k more) 1/N, and the working
copy FSDP all-gathers for the block being computed (bf16 on CUDA; with prefetching two blocks
at once). ``--offload`` moves the averages to host memory (``swa.offload=cpu``). Activations
are left out: they depend on the micro-batch, the sequence length and activation
checkpointing, not on the averages. The DDP column is one rank holding everything whole.

The parameters are counted on PyTorch's meta device from this project's GPT
(``swa_research.models``), so the shapes are the ones a run builds. ``--run`` reads a run's
metrics.json (``train.average_bytes``, what each rank measured of its averages) and prints the
computed share beside it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30

# name -> (n_layer, n_head, n_embd, block_size, vocab): GPT-2's released shapes (vocabulary
# padded to 50,304 as nanoGPT), a 1.3B (GPT-3 XL's shape) and a 7B (LLaMA-7B's width and
# depth as a GPT with a 4x MLP).
SHAPES = {
    "gpt2-small": (12, 12, 768, 1024, 50304),
    "gpt2-medium": (24, 16, 1024, 1024, 50304),
    "gpt2-xl": (48, 25, 1600, 1024, 50304),
    "1.3B": (24, 32, 2048, 2048, 50304),
    "7B": (32, 32, 4096, 2048, 50304),
}


@dataclass(frozen=True)
class Shape:
    name: str
    parameters: int  # all of them (the tied embedding once)
    block: int  # one transformer block's


def count(name: str) -> Shape:
    from swa_research.models import build_model, resolve_model_config

    n_layer, n_head, n_embd, block_size, vocab = SHAPES[name]
    cfg = resolve_model_config({"name": "gpt", "n_layer": n_layer, "n_head": n_head,
                                "n_embd": n_embd, "block_size": block_size, "dropout": 0.0,
                                "bias": False})
    with torch.device("meta"):
        model = build_model(cfg, vocab)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.h[0].parameters())
    return Shape(name, total, block)


def per_rank(shape: Shape, ranks: int, averages: int, lawa_k: int, offload: bool
             ) -> dict[str, float]:
    """Bytes on each GPU (and in host memory for offloaded averages), by part."""
    p = shape.parameters
    average = 4 * p / ranks * (averages + lawa_k)
    return {
        "weights": 4 * p / ranks,
        "gradients": 4 * p / ranks,
        "adamw": 8 * p / ranks,
        "averages": 0.0 if offload else average,
        "gathered": 2 * 2 * shape.block,  # bf16, this block and the prefetched next
        "host": average if offload else 0.0,
    }


def table(shapes: list[Shape], ranks: list[int], averages: int, lawa_k: int, offload: bool
          ) -> str:
    head = ("| model | parameters | ranks | weights | gradients | AdamW | averages"
            f"{' (host)' if offload else ''} | gathered block | GPU total | DDP total |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for shape in shapes:
        ddp = sum(v for k, v in per_rank(shape, 1, averages, lawa_k, False).items()
                  if k not in ("gathered", "host"))
        for n in ranks:
            r = per_rank(shape, n, averages, lawa_k, offload)
            gpu = sum(v for k, v in r.items() if k != "host")
            avg = r["host"] if offload else r["averages"]
            lines.append(
                f"| {shape.name} | {shape.parameters / 1e9:.2f}B | {n} | "
                f"{r['weights'] / GiB:.2f} | {r['gradients'] / GiB:.2f} | "
                f"{r['adamw'] / GiB:.2f} | {avg / GiB:.2f} | {r['gathered'] / GiB:.2f} | "
                f"{gpu / GiB:.2f} | {ddp / GiB:.1f} |")
    return "\n".join(lines)


def measured(run_dir: Path) -> str:
    """A run's measured bytes per rank of each average against the whole."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        sizes = metrics["train"]["average_bytes"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {run_dir}/metrics.json holds no train.average_bytes ({e})"
                         ) from None
    out = [f"{run_dir}: each average's bytes on one rank against the whole"]
    for name, s in sizes.items():
        share = s["this_rank"] / s["whole"] if s["whole"] else float("nan")
        out.append(f"  {name}: {s['this_rank']:,} of {s['whole']:,} bytes ({share:.3f} of "
                   "the whole)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--ranks", default="8,64", help="the numbers of ranks, comma-separated")
    ap.add_argument("--averages", type=int, default=2,
                    help="averages of one copy each (SWA, EMA, ...); default 2")
    ap.add_argument("--lawa-k", type=int, default=0,
                    help="LAWA's ring: k more copies (0: no LAWA)")
    ap.add_argument("--offload", action="store_true", help="the averages in host memory")
    ap.add_argument("--run", type=Path, help="a run dir: its measured bytes per rank")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in SHAPES]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    try:
        ranks = [int(n) for n in args.ranks.split(",") if n]
    except ValueError:
        ap.error(f"--ranks={args.ranks}: expected integers, e.g. 8,64")
    if not ranks or min(ranks) < 1 or args.averages < 0 or args.lawa_k < 0:
        ap.error("--ranks must be positive, --averages and --lawa-k not negative")
    print(f"GiB per rank under trainer.strategy=fsdp, {args.averages} averages"
          + (f" + LAWA's ring of {args.lawa_k}" if args.lawa_k else "")
          + (", offloaded to host memory" if args.offload else "")
          + "; activations not included\n")
    print(table([count(m) for m in names], ranks, args.averages, args.lawa_k, args.offload))
    if args.run is not None:
        print()
        print(measured(args.run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
