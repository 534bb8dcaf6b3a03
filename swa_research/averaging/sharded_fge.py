"""FGE of a model sharded with FSDP2: each rank keeps its shards of every collected member.

A member is the model's parameters at a collection point, cloned as DTensors with their
placements (1/N of a copy on each of N ranks; a sharded model has no BN, so its buffers are
fixed and not kept). The ensemble predicts as :class:`~.fge.FGE` does, the mean of the members'
softmax probabilities, each member's weights swapped into the model for its pass (the model's
own put back bit for bit after). ``fge.pt`` holds the members whole, gathered one tensor at a
time; a sharded checkpoint writes each rank's shards of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import has_batch_norm
from swa_research.averaging.fge import FGE
from swa_research.averaging.sharded import (
    _local,
    in_layout,
    kept_weights,
    reshard,
    whole_tensor,
)
from swa_research.averaging.swag import available_bytes


class ShardedFGE(FGE):
    """FGE (``swa.also=[fge]``, ``schedule=fge``) of a ``fully_shard``'ed model."""

    sharded = True

    def __init__(self, model: nn.Module, *, max_models: int = 20,
                 available: int | None = None) -> None:
        if has_batch_norm(model):
            raise ValueError("a model with batch norm cannot be averaged sharded: FSDP does not "
                             "shard its statistics (use DDP for BN models)")
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
            raise ValueError(f"max_models={max_models!r}: FGE keeps at least 1 model")
        self.max_models = max_models
        self.model = model
        local = sum(_local(p).numel() * p.element_size() for p in model.parameters())
        device = next(model.parameters()).device
        free = available_bytes(device) if available is None else available
        if self.max_models * local > free:
            raise ValueError(f"max_models={self.max_models}: FGE keeps up to "
                            f"{self.max_models} copies of this rank's shards, "
                            f"{self.max_models * local / 2**30:,.1f} GiB on {device}, "
                            f"{free / 2**30:,.1f} GiB are free; lower max_models")
        self.members: list[dict[str, Tensor]] = []
        self.collected = 0
        self._sums: dict[str, tuple[int, Tensor, int]] = {}

    @property
    def module(self) -> nn.Module:
        raise ValueError("a sharded average has no network of its own (FSDP cannot copy a "
                         "sharded model): its members are evaluated through the model, and "
                         "full_state_dict() gathers the latest")

    def _show(self, member: dict[str, Tensor]) -> None:
        pass  # no network of its own

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if len(self.members) == self.max_models:
            self.members.pop(0)
            self._sums.clear()
        reshard(model)
        self.members.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.collected += 1

    @torch.no_grad()
    def _member_probs(self, member: dict[str, Tensor], batches: Iterable[Tensor]) -> Tensor:
        model = self.model
        was_training = model.training
        with kept_weights(model):
            params = dict(model.named_parameters())
            torch._foreach_copy_([_local(params[n]) for n in member],
                                 [_local(t) for t in member.values()])
            model.eval()
            try:
                return torch.cat([torch.softmax(model(x).float(), dim=-1) for x in batches])
            finally:
                model.train(was_training)

    def _whole(self, member: dict[str, Tensor]) -> dict[str, Tensor]:
        """A member as the model's whole state dict on the CPU (every rank takes part)."""
        return {k: whole_tensor(v) for k, v in in_layout(self.model, member).items()}

    def sharded_state_dict(self) -> dict[str, Tensor]:
        """The latest member's state dict with DTensors (nothing gathered)."""
        return in_layout(self.model, self.members[-1])

    def full_state_dict(self) -> dict[str, Tensor]:
        """The latest member, whole: what fge.pt's state_dict holds."""
        return self._whole(self.members[-1])

    def export(self) -> dict[str, Any]:
        return {"members": [self._whole(m) for m in self.members]}

    def nbytes(self) -> int:
        return sum(_local(t).numel() * t.element_size() for m in self.members
                   for t in m.values())

    def whole_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.members for t in m.values())

    # -- sharded checkpoints ---------------------------------------------------------------
    def tensors(self, ring: int | None = None) -> dict[str, Any]:
        """The members' DTensors (``ring``: the number to make ready for a load)."""
        if ring is not None:
            self.members = [{n: p.detach().clone() for n, p in self.model.named_parameters()}
                            for _ in range(int(ring))]
        return {"ring": {str(i): m for i, m in enumerate(self.members)}}

    def meta(self) -> dict[str, Any]:
        return {"collected": self.collected, "ring": len(self.members),
                "identity": self.identity()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.check_state(meta)
        self.collected = int(meta["collected"])
        self._sums.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors(), **self.meta()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_meta(state)
        mine = self.tensors(int(state["ring"]))["ring"]
        for i, member in mine.items():
            for n, t in member.items():
                t.copy_(state["tensors"]["ring"][i][n])
