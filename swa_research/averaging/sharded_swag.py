"""SWAG and SWAG-Diagonal of a model sharded with FSDP2, moment by moment on each rank's shards.

The moments are elementwise, so each rank keeps the mean, the mean of squares and the ring of
deviations of its own slice of every parameter (the local shards, flattened and concatenated
in ``parameters()`` order) and updates them with :class:`~.swag.SWAG`'s own arithmetic: no
collective per update, 1/N of the memory. A sample draws what one process draws for the same
seed: z1 parameter by parameter, each rank keeping its slice of every parameter's draw (so each
rank draws every parameter's numbers, one parameter at a time), then the same z2 over the
stored deviations on every rank, and D^T z2 is elementwise in P. The Bayesian model average
runs each sample through the model (its shards swapped for the sample's, the model's own put
back bit for bit after), every rank over the whole sets.

For ``torch.distributed.checkpoint`` the moments and each stored deviation are also seen as
DTensors with the parameters' placements (views of the same memory), so a checkpoint is
written rank by rank and loads on another number of ranks. FSDP2 shards dimension 0
(``Shard(0)``), the only placement taken here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import has_batch_norm
from swa_research.averaging.sharded import (
    _local,
    in_layout,
    kept_weights,
    reshard,
    whole_tensor,
)
from swa_research.averaging.swag import (
    SWAG,
    check_memory,
    check_swag_options,
    resolve_swag_device,
)


def _slice_of(p: Tensor) -> tuple[int, int]:
    """The flat range [start, stop) of parameter ``p`` (a DTensor sharded on dimension 0)
    that this rank holds, in the whole parameter's flat layout."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements):
        raise ValueError(f"a sharded SWAG takes parameters sharded on dimension 0 (FSDP2's "
                         f"Shard(0)), not {p.placements}")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                          p.placements)
    row = math.prod(p.shape[1:])
    return offset[0] * row if shape[0] else 0, (offset[0] + shape[0]) * row if shape[0] else 0


class ShardedSWAG(SWAG):
    """SWAG (``method="swag"``) or SWAG-Diagonal (``swag_diag``) of a ``fully_shard``'ed
    model; see the module docstring."""

    sharded = True

    def __init__(self, model: nn.Module, method: str = "swag", *, max_models: int = 20,
                 scale: float | None = None, samples: int = 30, device: str = "auto",
                 eval_every: int = 0, bn_update: bool = True) -> None:
        if has_batch_norm(model):
            raise ValueError("a model with batch norm cannot be averaged sharded: FSDP does not "
                             "shard its statistics (use DDP for BN models)")
        if method not in ("swag", "swag_diag"):
            raise ValueError(f"method={method!r}: a ShardedSWAG is swag or swag_diag")
        check_swag_options(max_models=max_models, scale=scale, samples=samples, device=device,
                           eval_every=eval_every)
        self.method = method
        self.low_rank = method == "swag"
        self.model = model
        params = list(model.parameters())
        self.device = resolve_swag_device(device, model)
        self.scale = float(scale if scale is not None else 0.5 if self.low_rank else 1.0)
        self.samples, self.max_models = int(samples), int(max_models)
        self.eval_every = int(eval_every)
        self.bn_update = False  # a sharded model has no BN (refused by FSDP's side)
        self.sizes = [p.numel() for p in params]  # whole: the draws are of whole parameters
        self.slices = [_slice_of(p) for p in params]
        self.local_sizes = [_local(p).numel() for p in params]
        if [b - a for a, b in self.slices] != self.local_sizes:
            raise ValueError("a sharded SWAG: the local shards are not the dimension-0 slices "
                             "the placements describe")
        self.numel = sum(self.local_sizes)
        self.whole_numel = sum(self.sizes)
        check_memory(self.method, self.numel, self.max_models if self.low_rank else 0,
                     self.device)
        self.count, self.position, self.filled = 0, 0, 0
        self.mean = torch.zeros(self.numel, device=self.device)
        self.sq_mean = torch.zeros(self.numel, device=self.device)
        self.buffer = (torch.zeros(self.max_models, self.numel, device=self.device)
                       if self.low_rank else None)

    # -- what differs from one process's SWAG ----------------------------------------------
    @property
    def module(self) -> nn.Module:
        raise ValueError("a sharded average has no network of its own (FSDP cannot copy a "
                         "sharded model): evaluate it with `with average.swapped(): ...`, "
                         "save it with full_state_dict() or state_dict()")

    def _params(self, model: nn.Module) -> list[Tensor]:
        reshard(model)  # the sharded parameters registered, not the unsharded ones
        params = list(model.parameters())
        if [p.numel() for p in params] != self.sizes:
            raise ValueError("update: the model's parameters are not the ones this average was "
                             "made of")
        return params

    def _flat(self, model: nn.Module) -> Tensor:
        return torch.cat([_local(p).detach().reshape(-1).to(self.device, torch.float32)
                          for p in self._params(model)])

    def _keep_mean(self, model: nn.Module) -> None:
        pass  # no network of its own: the mean is swapped into the model when evaluated

    def _z1(self, generator: torch.Generator) -> Tensor:
        """Each parameter's whole draw, of which this rank keeps its slice (one parameter's
        draw in memory at a time)."""
        return torch.cat([torch.randn(n, generator=generator, device=self.device)[a:b]
                          for n, (a, b) in zip(self.sizes, self.slices, strict=True)])

    def _network(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def _put(self, flat: Tensor) -> None:
        params = self._params(self.model)
        pieces = torch.split(flat, self.local_sizes)
        for p, piece in zip(params, pieces, strict=True):
            local = _local(p)
            local.copy_(piece.view_as(local))

    def bma(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        with kept_weights(self.model):
            return super().bma(*args, **kwargs)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """The model holding the mean for the block; its own weights come back after."""
        if model is not None and model is not self.model:
            raise ValueError("a sharded SWAG swaps into the model it was made of")
        with kept_weights(self.model):
            self._put(self.mean)
            yield self.model

    def predict(self, x: Tensor) -> Tensor:
        with self.swapped() as model:
            return model(x)

    def nbytes(self) -> int:
        rows = 0 if self.buffer is None else self.max_models
        return (2 + rows) * self.numel * 4

    def whole_nbytes(self) -> int:
        rows = 0 if self.buffer is None else self.max_models
        return (2 + rows) * self.whole_numel * 4

    # -- whole files and sharded checkpoints -----------------------------------------------
    def _dtensors(self, flat: Tensor) -> dict[str, Tensor]:
        """``flat`` (the moments' layout) as DTensors by parameter name, with the parameters'
        placements: views of the same memory."""
        from torch.distributed.tensor import DTensor

        out = {}
        pieces = torch.split(flat, self.local_sizes)
        for (name, p), piece in zip(self.model.named_parameters(), pieces, strict=True):
            local = piece.view(_local(p).shape)
            out[name] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
        return out

    def _whole(self, flat: Tensor) -> Tensor:
        """``flat`` gathered whole (one parameter at a time; every rank takes part)."""
        return torch.cat([whole_tensor(t).reshape(-1) for t in self._dtensors(flat).values()])

    def full_state_dict(self) -> dict[str, Tensor]:
        """The mean network's whole state dict on the CPU (what swag.pt's state_dict holds),
        gathered one tensor at a time."""
        return {k: whole_tensor(v) for k, v in self.sharded_state_dict().items()}

    def sharded_state_dict(self) -> dict[str, Tensor]:
        """The mean network's state dict with DTensors (nothing gathered)."""
        return in_layout(self.model, self._dtensors(self.mean))

    def deviations(self) -> Tensor:
        if self.buffer is None:
            return torch.zeros(0, self.numel, device=self.device)
        rows = self.buffer[:self.filled]
        return torch.roll(rows, -self.position, dims=0) if self.filled else rows

    def export(self) -> dict[str, Any]:
        """swag.pt's posterior, whole (gathered parameter by parameter, row by row)."""
        rows = self.deviations()
        whole_rows = (torch.stack([self._whole(r) for r in rows]) if len(rows)
                      else torch.zeros(0, self.whole_numel))
        return {"swag": {"mean": self._whole(self.mean), "sq_mean": self._whole(self.sq_mean),
                         "deviations": whole_rows, "max_models": self.max_models,
                         "scale": self.scale, "var_clamp": 1e-30,
                         "low_rank": self.buffer is not None}}

    def tensors(self, ring: int | None = None) -> dict[str, Any]:
        """The moments and the stored deviations (buffer rows, in buffer order) as DTensors:
        what a sharded checkpoint writes rank by rank and loads into (``ring``: the rows the
        checkpoint holds)."""
        rows = self.filled if ring is None else int(ring)
        out: dict[str, Any] = {"mean": self._dtensors(self.mean),
                               "sq_mean": self._dtensors(self.sq_mean), "ring": {}}
        if self.buffer is not None:
            out["ring"] = {str(i): self._dtensors(self.buffer[i]) for i in range(rows)}
        return out

    def meta(self) -> dict[str, Any]:
        return {"count": self.count, "position": self.position, "filled": self.filled,
                "ring": self.filled if self.buffer is not None else 0,
                "max_models": self.max_models, "identity": self.identity()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.check_state(meta)
        if int(meta["max_models"]) != self.max_models:
            raise ValueError(f"{self.method}: the checkpoint's deviation buffer (max_models="
                             f"{meta['max_models']}) does not fit this run's "
                             f"(swa.max_models={self.max_models})")
        self.count, self.position = int(meta["count"]), int(meta["position"])
        self.filled = int(meta["filled"])

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors(), **self.meta()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_meta(state)
        mine = self.tensors(self.filled)
        saved = state["tensors"]
        for part in ("mean", "sq_mean"):
            for n, t in mine[part].items():
                t.copy_(saved[part][n])
        for i, row in mine["ring"].items():
            for n, t in row.items():
                t.copy_(saved["ring"][i][n])
