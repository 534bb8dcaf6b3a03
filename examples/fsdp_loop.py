"""EMA, SWA and LAWA of a model sharded with FSDP2, in your own torchrun loop, with
swa_research's averaging library only. Each rank averages its own shard of every parameter: no
collective per update, 1/N of an average's memory on each of N ranks. On two CPU processes:

    torchrun --standalone --nproc-per-node 2 examples/fsdp_loop.py

``--no-shard`` runs the same loop unsharded (one process), ``--out FILE`` saves the final
weights (SGD and each average, gathered one tensor at a time) and each rank's average bytes.
On GPUs the same loop runs with NCCL; pass ``mp_policy=MixedPrecisionPolicy(param_dtype=
torch.bfloat16, reduce_dtype=torch.float32)`` to ``fully_shard`` for bf16 compute.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from swa_research.averaging import make_average, make_plan, predict


class Block(nn.Module):
    """A pre-norm MLP block: the unit that is sharded (a transformer block in a real model)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def make_model(width: int = 32, depth: int = 3, classes: int = 5) -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(16, width), *[Block(width) for _ in range(depth)],
                         nn.LayerNorm(width), nn.Linear(width, classes))


def batches(steps: int, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches, the same on every rank (each trains on its slice of each)."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 16, generator=g) * 2
    out = []
    for _ in range(steps):
        y = torch.randint(0, 5, (size,), generator=g)
        out.append((centres[y] + torch.randn(size, 16, generator=g), y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-shard", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sharded = not args.no_shard
    if sharded:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model = make_model()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model[1:-2]:
            fully_shard(block)  # each block its own unit, as torchtitan shards a transformer
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # Built after fully_shard: each average is sharded exactly as the model.
    averages = {"ema": make_average("ema", model, decay=0.9),
                "swa": make_average("swa", model),
                "lawa": make_average("lawa", model, lawa_k=4)}
    plan = make_plan(start=0.5, freq=2, unit="iter", epochs=1, iters_per_epoch=args.steps)
    data = batches(args.steps)
    for step, (x, y) in enumerate(data, start=1):
        lo, hi = len(x) * rank // world, len(x) * (rank + 1) // world
        loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # FSDP reduce-scatters the gradients: their mean over the ranks
        opt.step()
        if plan.due_after_iter(step):
            for average in averages.values():
                average.update(model)  # local shards only: no communication
    # Evaluation through the model (a sharded average is swapped into its shards for it).
    test_x, test_y = batches(1, 512)[0]
    for name, net in (("sgd", model), *averages.items()):
        logits, _ = predict(net, [(test_x, test_y)])
        acc = (logits.argmax(1) == test_y).float().mean().item()
        if rank == 0:
            print(f"{name:5s} test accuracy {100 * acc:.2f}%  loss "
                  f"{F.cross_entropy(logits, test_y).item():.4f}", flush=True)
    mine = {n: a.nbytes() for n, a in averages.items()}  # this rank's bytes of each average
    if args.out:
        weights = {"sgd": {n: (p.full_tensor() if sharded else p).detach().cpu()
                           for n, p in model.named_parameters()}}
        for n, a in averages.items():
            weights[n] = a.full_state_dict() if sharded else {
                k: v.detach().cpu() for k, v in a.module.named_parameters()}
        if rank == 0:
            torch.save({"weights": weights, "world": world}, args.out)
        torch.save(mine, f"{args.out}.rank{rank}.bytes")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0 and os.environ.get("LOCAL_RANK") is not None:
        print(f"average bytes on rank 0 of {world}: {mine}", flush=True)


if __name__ == "__main__":
    main()
