"""Rank coordination of a run behind one small object: :class:`Ranks`.

Under DDP the ranks must agree on when to stop (a preemption signal reaches one rank), add up
what each saw of an epoch, hold identical weights at every evaluation and take part in every
checkpoint. In one process every method is a no-op or returns its input, so the loop reads the
same with and without DDP. The collectives themselves are :mod:`swa_research.distributed`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.sharded import is_sharded
from swa_research.data import Shard
from swa_research.distributed import (
    all_reduce_sum_,
    average_buffers_,
    barrier,
    check_identical,
    gather_objects,
    world,
)

log = logging.getLogger(__name__)



class Ranks:
    """This process's place among the run's ranks and what they do together."""

    def __init__(self, device: torch.device) -> None:
        self.world = world()
        self.device = device

    @property
    def distributed(self) -> bool:
        return self.world.distributed

    @property
    def is_main(self) -> bool:
        """Rank 0: it writes the run's files and logs."""
        return self.world.is_main

    @property
    def shard(self) -> Shard | None:
        """This rank's slice of every global batch; None in one process."""
        return (self.world.rank, self.world.size) if self.distributed else None

    def _f64(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def loss_and_stop(self, loss: Tensor, signalled: bool) -> tuple[float, bool]:
        """The step's loss (under DDP its mean over the ranks) and whether any rank got a
        preemption signal: one host read, and under DDP one all-reduce that the ranks make at
        the same step, so that all of them stop there."""
        if not self.distributed:
            return loss.detach().item(), False
        pair = torch.cat([loss.detach().double().reshape(1), self._f64([float(signalled)])])
        all_reduce_sum_([pair])
        mean, flags = pair.tolist()
        return mean / self.world.size, flags > 0

    def stop_agreed(self, signalled: bool) -> bool:
        """Whether this rank or any other got a preemption signal (between epochs)."""
        if not self.distributed:
            return signalled
        flag = self._f64([float(signalled)])
        all_reduce_sum_([flag])
        return flag.item() > 0

    def epoch_sums(self, sums: Tensor, seen: int) -> tuple[Tensor, int]:
        """An epoch's metric sums and sample count over all ranks."""
        if not self.distributed:
            return sums, seen
        total = torch.cat([sums.double(), self._f64([float(seen)])])
        all_reduce_sum_([total])
        return total[:-1], round(total[-1].item())

    def before_eval(self, model: nn.Module, averages: Mapping[str, Any], where: str) -> None:
        """Under DDP, before an evaluation: the BN running statistics of the model and of each
        average's network averaged over the ranks (each rank's are of its shard), then the
        weights and every average compared across the ranks by checksum: they must be
        identical, and an error says so if not."""
        if not self.distributed or is_sharded(model):
            return  # under FSDP each rank holds other shards: no BN, nothing to compare
        for module in networks_of(model, averages).values():
            average_buffers_(module)
        check_identical({"the SGD model": list(model.state_dict().values()),
                         **{f"the average {name}": tensors_of(a.state_dict())
                            for name, a in averages.items()}}, where)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (under DDP, a collective); None in one process."""
        return gather_objects(obj) if self.distributed else None

    def barrier(self) -> None:
        barrier()

    def own(self, per_rank: list[Any] | None) -> Any:
        """This rank's entry of what :meth:`gather` collected in a run on as many ranks; None
        when there is none (one process, or another number of ranks)."""
        if per_rank is None or not self.distributed:
            return None
        if len(per_rank) != self.world.size:
            return None
        return per_rank[self.world.rank]


def networks_of(model: nn.Module, averages: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The model and each average's network, by a key (the buffers that differ across ranks
    live in these)."""
    return {"model": model, **{f"average:{name}": a.module for name, a in averages.items()
                                if not getattr(a, "sharded", False)}}


def buffers_of(networks: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """The floating-point buffers (BN running statistics) of each network, on the CPU: what
    differs between the ranks besides their random state."""
    return {key: {n: b.detach().cpu().clone() for n, b in m.named_buffers()
                  if b.is_floating_point()} for key, m in networks.items()}


@torch.no_grad()
def load_buffers(networks: Mapping[str, nn.Module], saved: Mapping[str, Mapping[str, Tensor]]
                 ) -> None:
    for key, module in networks.items():
        mine = saved.get(key, {})
        for n, b in module.named_buffers():
            if n in mine:
                b.copy_(mine[n])


def tensors_of(state: Any) -> list[Tensor]:
    """The tensors of a nested state dict, in a fixed order."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors_of(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in tensors_of(item)]
    return []
