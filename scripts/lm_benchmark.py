"""Language-model training throughput and model FLOPs utilization (``scripts/benchmark.py
--task lm`` runs this): ``Trainer.train_epoch`` of a GPT that ``swa_research.training.build``
makes from ``experiment=lm/char_cpu`` with the shape asked, on a token file of random ids.

    python scripts/benchmark.py --task lm                          # CPU: lm/char_cpu's GPT
    python scripts/benchmark.py --task lm --device cuda --shape gpt2 --precision bf16 --compile

Each chunk is one epoch of ``--steps`` optimizer steps of ``--batch-size`` windows of the
shape's block (``--grad-accum`` micro-batches each); the first ``--warmup`` chunks are untimed
(compilation); the table gives medians over ``--rounds`` chunks. Columns (``--json`` writes
them under "rows"):
  shape, precision, compile, batch (windows), block, grad_accum, tokens_per_step
  tokens_per_s        median over the rounds (the windows' reading from the token file included)
  ms_per_step         1000 * tokens_per_step / tokens_per_s
  tflops              the model's FLOPs (6 N + 12 L T d per token, nanoGPT's count) per second
  mfu_pct             tflops over the device's datasheet peak (``--peak-tflops``, or the known
                      GPU's dense bf16 peak: swa_research.training.speed; null on a CPU)
  pct_of_matmul_peak  tflops over the best of timed square matmuls here at the row's precision
  ema_update_ms       one EMA update of the whole model (queued back to back, one sync): what
                      averaging every step adds
  peak_gpu_mb         torch.cuda.max_memory_allocated over the row (null on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import cpu_model, emit, machine, matmul_peak_tflops, sync, time_queued  # noqa: E402

from swa_research.averaging import make_average  # noqa: E402
from swa_research.data.text import write_ids  # noqa: E402
from swa_research.errors import UserError  # noqa: E402
from swa_research.training.build import (  # noqa: E402
    build_trainer,
    config_dict_of,
    load_config,
    resolve_device,
)
from swa_research.training.speed import peak_tflops  # noqa: E402
from swa_research.training.step import AUTOCAST_DTYPES  # noqa: E402

# name: (n_layer, n_head, n_embd, block_size, vocabulary)
SHAPES = {
    "tiny": (2, 2, 64, 64, 256),
    "char": (4, 4, 128, 64, 444),          # lm/char_cpu on the Python sources' 444 characters
    "shakespeare": (6, 6, 384, 256, 65),   # lm/shakespeare_char
    "gpt2": (12, 12, 768, 1024, 50257),    # lm/gpt2_owt (GPT-2 small, 50,304 logits)
}
COLUMNS = ["shape", "precision", "compile", "batch", "block", "grad_accum", "tokens_per_step",
           "tokens_per_s", "ms_per_step", "tflops", "mfu_pct", "pct_of_matmul_peak",
           "ema_update_ms", "peak_gpu_mb"]


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from swa_research.conf import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="swa_research.conf", version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def token_file(folder: Path, vocab: int, n: int) -> Path:
    """``n`` random ids below ``vocab`` as a prepared token file (speed does not depend on the
    text)."""
    path = folder / f"random{vocab}.tokens"
    rng = np.random.default_rng(0)
    chunks = (rng.integers(0, vocab, size=min(1 << 22, n - i)) for i in range(0, n, 1 << 22))
    write_ids(chunks, "byte" if vocab <= 256 else "gpt2", vocab, path, {"random": n})
    return path


def build_lm_trainer(folder: Path, shape: str, precision: str, device: torch.device,
                     batch_size: int, steps: int, epochs: int, extra: list[str]) -> Any:
    """The trainer ``swa_research.training.build`` makes from ``experiment=lm/char_cpu`` with
    the shape asked, on a file of random token ids, epochs of ``steps`` steps of
    ``batch_size`` windows, no average; ``extra``: further overrides."""
    n_layer, n_head, n_embd, block, vocab = SHAPES[shape]
    tokens = token_file(folder, vocab, max(1 << 20, 4 * batch_size * (block + 1)))
    overrides = [
        "experiment=lm/char_cpu", f"data.root={tokens}",
        f"data.tokenizer={'byte' if vocab <= 256 else 'gpt2'}",
        f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}",
        f"model.block_size={block}", f"model.vocab_multiple={64 if shape == 'gpt2' else 1}",
        f"data.windows_per_epoch={steps * batch_size}",
        "data.val_fraction=0.01", "data.test_fraction=0.01", "swa.method=none", "swa.also=[]",
        f"trainer.batch_size={batch_size}", f"trainer.device={device}",
        f"trainer.precision={precision}", f"trainer.epochs={epochs}", "trainer.max_steps=0",
        "trainer.eval_every_steps=0", "trainer.checkpoint_every_steps=0", "trainer.progress=none",
        "logger.backend=none", *extra]
    config = load_config(compose(overrides))
    run_dir = folder / f"{shape}-{precision}"
    run_dir.mkdir()
    return build_trainer(config, config_dict_of(config), run_dir, device)


def epoch_seconds(trainer: Any, device: torch.device, warmup: int, rounds: int
                  ) -> list[float]:
    """The seconds of each of ``rounds`` epochs after ``warmup`` untimed ones."""
    seconds = []
    for epoch in range(1, warmup + rounds + 1):
        sync(device)
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)  # ends by reading its sums: the device has finished
        if epoch > warmup:
            seconds.append(time.perf_counter() - t0)
    return seconds


def measure(args: argparse.Namespace, shape: str, precision: str, device: torch.device,
            folder: Path, matmul_peaks: dict[str, float]) -> dict[str, Any]:
    block = SHAPES[shape][3]
    trainer = build_lm_trainer(
        folder, shape, precision, device, args.batch_size, args.steps,
        args.warmup + args.rounds,
        [f"trainer.grad_accum={args.grad_accum}", f"trainer.compile={args.compile is not None}",
         f"trainer.compile_mode={args.compile or 'default'}"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step = args.batch_size * block
    rates = [args.steps * per_step / t
             for t in epoch_seconds(trainer, device, args.warmup, args.rounds)]
    rate = statistics.median(rates)
    flops = trainer.model.flops_per_token() * rate / 1e12
    ema = make_average("ema", trainer.model, decay=0.999)
    ema_s = time_queued(lambda: ema.update(trainer.model), device, args.avg_calls)
    peak = peak_tflops(device, args.peak_tflops)
    matmul = matmul_peaks.get(precision)
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    trainer.data.close()
    return {"shape": shape, "precision": precision, "compile": args.compile,
            "batch": args.batch_size, "block": block, "grad_accum": args.grad_accum,
            "tokens_per_step": per_step, "tokens_per_s": round(rate, 1),
            "ms_per_step": round(1000 * per_step / rate, 3), "tflops": round(flops, 4),
            "mfu_pct": None if not peak else round(100 * flops / peak, 2),
            "pct_of_matmul_peak": None if not matmul else round(100 * flops / matmul, 1),
            "ema_update_ms": round(1000 * ema_s, 3),
            "peak_gpu_mb": None if gpu is None else round(gpu, 1),
            "tokens_per_s_rounds": [round(r, 1) for r in rates],
            "parameters": sum(p.numel() for p in trainer.model.parameters())}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else
                                       f"{r[c]:,}" if isinstance(r[c], (int, float))
                                       and not isinstance(r[c], bool) else str(r[c])
                                       for c in COLUMNS) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--shape", default=None,
                   help=f"comma-separated, of {', '.join(SHAPES)} (default: char on a CPU, "
                        "gpt2 on a GPU)")
    p.add_argument("--precision", default=None, help="comma-separated: fp32, bf16, fp16 "
                   "(default: fp32 on a CPU, bf16 on a GPU)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="windows per step (default: 16 on a CPU, 12 on a GPU)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per chunk")
    p.add_argument("--rounds", type=int, default=3, help="timed chunks; the table: medians")
    p.add_argument("--warmup", type=int, default=1, help="untimed chunks first")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the model (optionally a mode: reduce-overhead, ...)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak for mfu_pct (0: the known GPU's datasheet)")
    p.add_argument("--avg-calls", type=int, default=10, help="EMA updates timed")
    p.add_argument("--matmul-size", type=int, default=0)
    p.add_argument("--json", default=None, help="write the table and the setup to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device, "--device ")
    cuda = device.type == "cuda"
    shapes = (args.shape or ("gpt2" if cuda else "char")).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise UserError(f"--shape {','.join(unknown)}: expected some of {', '.join(SHAPES)}")
    precisions = (args.precision or ("bf16" if cuda else "fp32")).split(",")
    args.batch_size = args.batch_size or (12 if cuda else 16)
    n = args.matmul_size or (4096 if cuda else 1024)
    matmul = {p: matmul_peak_tflops(device, AUTOCAST_DTYPES[p] or torch.float32, n)
              for p in precisions}
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(args, s, p, device, Path(folder), matmul)
                for s in shapes for p in precisions]
    name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    result = {"machine": machine(str(device), name, torch_threads=torch.get_num_threads()),
              "setup": {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                        "peak_tflops": peak_tflops(device, args.peak_tflops)},
              "matmul_peak_tflops": {k: round(v, 4) for k, v in matmul.items()},
              "columns": COLUMNS, "rows": rows}
    return emit(result, f"{name} ({device}), median of {args.rounds} chunks of {args.steps} steps",
                format_table(rows), args.json)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"lm_benchmark.py: {e}")
