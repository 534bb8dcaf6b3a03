"""The cost of an average beside a sharded model (``scripts/benchmark.py --strategy fsdp`` runs
this): a GPT trained by this project's trainer under ``trainer.strategy=fsdp`` and, for the
comparison, ``ddp``, on N processes (torchrun, started by this script), with the time of a
step and of one update of an average of the model, and the average's bytes on each rank.

    python scripts/benchmark.py --strategy fsdp                    # CPU: 2 ranks, lm/char_cpu
    python scripts/benchmark.py --strategy fsdp --device cuda --ranks 8 --shape gpt2 --json f.json

Each strategy is one torchrun of N ranks: the trainer built from ``experiment=lm/char_cpu``
with the shape asked (``scripts/lm_benchmark.py``'s shapes, random token ids), ``--warmup``
untimed epochs of ``--steps`` steps then ``--rounds`` timed ones (the table: medians), then
``--avg-calls`` updates of a ``--method`` average (``make_average`` on the trained model:
sharded under FSDP, whole under DDP) queued back to back with one sync. Columns (``--json``
writes them under "rows"):
  strategy, ranks, shape, precision, global_batch (windows), tokens_per_s, ms_per_step
  avg_update_ms       one update of the average on rank 0 (the slowest rank's in the JSON)
  avg_overhead_pct    avg_update_ms / ms_per_step * 100: what averaging every step costs
  avg_mb_per_rank     the average's memory on one rank
  avg_share           that over the whole average's: 1/N under FSDP, 1 under DDP
The goal (issue: averages of a sharded model): an update below 2% of a step for GPT-2 small
on GPUs, and 1/N of the memory per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_benchmark import SHAPES, build_lm_trainer, epoch_seconds  # noqa: E402
from timing import cpu_model, emit, machine, time_queued  # noqa: E402

from swa_research.errors import UserError  # noqa: E402
from swa_research.fileio import atomic_write_text  # noqa: E402

COLUMNS = ["strategy", "ranks", "shape", "precision", "global_batch", "tokens_per_s",
           "ms_per_step", "avg_update_ms", "avg_overhead_pct", "avg_mb_per_rank", "avg_share"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes (torchrun) per strategy")
    p.add_argument("--strategies", default="fsdp,ddp", help="comma-separated: fsdp, ddp")
    p.add_argument("--device", default="cpu", help="cpu | cuda (each rank its local GPU)")
    p.add_argument("--shape", default=None,
                   help=f"one of {', '.join(SHAPES)} (default: char on a CPU, gpt2 on GPUs)")
    p.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on GPUs)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="global windows per step (default: 8 a rank on a CPU, 12 on GPUs)")
    p.add_argument("--method", default="ema", help="the average timed: ema, swa or lawa")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs; the table: medians")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--avg-calls", type=int, default=10, help="average updates timed")
    p.add_argument("--json", default=None, help="write the table and the setup to this file")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-strategy", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One rank of one torchrun: train, time, gather every rank's figures on rank 0."""
    import torch.distributed as dist

    from swa_research import distributed

    world = distributed.setup()
    alone = distributed.group_of_one() if not world.distributed else contextlib.nullcontext()
    with alone:
        figures = measure(args, world)
        every: list[Any] = [figures]
        if world.distributed:
            every = [None] * world.size
            dist.all_gather_object(every, figures)
    if world.is_main:
        atomic_write_text(args.worker_out, json.dumps(every) + "\n")
    distributed.teardown()


def measure(args: argparse.Namespace, world: Any) -> dict[str, float]:
    """This rank's step time, one update's time and the average's bytes."""
    from swa_research.averaging import make_average

    cuda = args.device == "cuda"
    device = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        trainer = build_lm_trainer(
            Path(folder), args.shape, args.precision, device, args.batch_size, args.steps,
            args.warmup + args.rounds,
            ["model.dropout=0.0", f"trainer.strategy={args.worker_strategy}"])
        seconds = epoch_seconds(trainer, device, args.warmup, args.rounds)
        model = trainer.model
        average = make_average(args.method, model, decay=0.999)
        update_s = time_queued(lambda: average.update(model), device, args.avg_calls)
        mine = average.nbytes()
        whole = average.whole_nbytes() if hasattr(average, "whole_nbytes") else mine
        trainer.data.close()
    return {"step_s": statistics.median(seconds) / args.steps, "update_s": update_s,
            "bytes": mine, "whole": whole}


def run_strategy(args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    """One torchrun of ``args.ranks`` workers under ``strategy``; rank 0's figures as a row."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures.json"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        if args.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.ranks), str(Path(__file__).resolve()),
               "--device", args.device, "--method", args.method, "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup),
               "--avg-calls", str(args.avg_calls), "--shape", args.shape,
               "--precision", args.precision,
               "--batch-size", str(args.batch_size),
               "--worker-out", str(out), "--worker-strategy", strategy]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise UserError(f"the {strategy} run on {args.ranks} ranks failed:\n{tail}")
        ranks = json.loads(out.read_text())
    first = ranks[0]
    step_ms = 1000 * first["step_s"]
    block = SHAPES[args.shape][3]
    return {"strategy": strategy, "ranks": args.ranks, "shape": args.shape,
            "precision": args.precision, "global_batch": args.batch_size,
            "tokens_per_s": round(args.batch_size * block / first["step_s"], 1),
            "ms_per_step": round(step_ms, 3),
            "avg_update_ms": round(1000 * first["update_s"], 4),
            "avg_overhead_pct": round(100 * first["update_s"] / first["step_s"], 3),
            "avg_mb_per_rank": round(first["bytes"] / 2**20, 3),
            "avg_share": round(first["bytes"] / first["whole"], 4),
            "avg_update_ms_slowest": round(1000 * max(r["update_s"] for r in ranks), 4),
            "avg_bytes_ranks": [r["bytes"] for r in ranks]}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    lines += [" | ".join(str(r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    args.shape = args.shape or ("gpt2" if cuda else "char")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.shape not in SHAPES:
        raise UserError(f"--shape {args.shape}: expected one of {', '.join(SHAPES)}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: expected cpu or cuda")
    args.batch_size = args.batch_size or (12 if cuda else 8) * args.ranks
    if args.worker_out:
        worker(args)
        return {}
    strategies = [s for s in args.strategies.split(",") if s]
    if not strategies or any(s not in ("fsdp", "ddp") for s in strategies):
        raise UserError(f"--strategies {args.strategies}: expected fsdp and/or ddp")
    if args.ranks < 1 or (args.ranks == 1 and "ddp" in strategies):
        raise UserError(f"--ranks {args.ranks}: DDP needs at least 2 processes (FSDP runs on "
                        "1: --strategies fsdp)")
    if cuda and torch.cuda.device_count() < args.ranks:
        raise UserError(f"--ranks {args.ranks} on CUDA: {torch.cuda.device_count()} GPU(s) "
                        "visible")
    rows = [run_strategy(args, s) for s in strategies]
    name = torch.cuda.get_device_name(0) if cuda else cpu_model()
    result = {"machine": machine(args.device, name),
              "setup": {"ranks": args.ranks, "steps": args.steps, "rounds": args.rounds,
                        "warmup": args.warmup, "method": args.method,
                        "avg_calls": args.avg_calls},
              "columns": COLUMNS, "rows": rows}
    return emit(result, f"{name} ({args.device}), {args.ranks} ranks, median of {args.rounds} "
                f"epochs of {args.steps} steps; one {args.method} update of the whole model",
                format_table(rows), args.json)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"fsdp_benchmark.py: {e}")
