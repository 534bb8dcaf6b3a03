"""Averages of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Averaging is elementwise, so each rank averages its own shard of every parameter: the average
is held as DTensors with the parameters' own placements (``p.detach().clone()`` of a sharded
parameter is a local copy), updated with the same multi-tensor functions as the unsharded
averages on the local shards, with no collective per update and 1/N of the memory on each of
N ranks. ``torch.distributed.checkpoint`` saves such a state with each rank writing its shards,
and :meth:`ShardedAverage.full_state_dict` gathers the whole weights one tensor at a time.

FSDP2 cannot deepcopy a sharded module, so a sharded average has no network of its own: it is
evaluated through the model, ``with average.swapped(): ...`` putting its weights into the
model's shards for the block (the model resharded first) and the model's own back after, bit
for bit. The library's ``predict`` and ``update_bn`` do that themselves.

Methods: ``swa`` (equal), ``ema`` (with timm's warm-up), ``lawa`` (the ring of the latest k
points, sharded); SWAG and SWAG-Diagonal in :mod:`.sharded_swag`. BN is refused: FSDP does
not shard buffers, and a sharded model with batch norm is not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_swa_multi_avg_fn

from swa_research.averaging.base import Average, has_batch_norm

WEIGHT_METHODS = ("swa", "ema", "lawa", "power_ema")  # ShardedAverage's; SWAG's: .sharded_swag
SHARDED_METHODS = (*WEIGHT_METHODS, "swag", "swag_diag", "fge")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (a model passed through ``fully_shard``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # fully_shard needs a process group; DTensor's import is not paid
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def whole_tensor(t: Tensor) -> Tensor:
    """A tensor whole on the CPU: a sharded one (a DTensor) gathered from every rank (each
    rank must call it), any other as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def reshard(model: nn.Module) -> None:
    """Every FSDP module of ``model`` back to its sharded parameters (after a forward with
    ``reshard_after_forward=False`` the unsharded ones would hide a swap)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def kept_weights(model: nn.Module) -> Iterator[None]:
    """``model``'s own weights (its local shards) put back bit for bit after the block, which
    may write others into them; resharded before and after (after a forward an FSDP module
    may hold its unsharded parameters, registered in place of the sharded ones)."""
    reshard(model)
    with torch.no_grad():
        kept = [_local(p).detach().clone() for p in model.parameters()]
    try:
        yield
    finally:
        reshard(model)
        with torch.no_grad():
            torch._foreach_copy_([_local(p) for p in model.parameters()], kept)


def in_layout(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model``'s state dict with its parameters replaced by ``weights`` (by parameter name;
    a tied weight under each of its names), its buffers as they are."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {key: weights[names[id(v)]] if id(v) in names else v
            for key, v in model.state_dict(keep_vars=True).items()}


def copy_into_model(average: Any) -> None:
    """The model a sharded average was made of keeps the average's weights (its mean, for
    SWAG): what a callback's ``copy_at_end`` does."""
    with average.swapped() as model:
        held = [_local(p).detach().clone() for p in model.parameters()]
    reshard(model)
    with torch.no_grad():
        torch._foreach_copy_([_local(p) for p in model.parameters()], held)


class ShardedAverage(Average):
    """An average of a ``fully_shard``'ed model's parameters, shard by shard (see the module
    docstring). ``kind``: ``swa``, ``ema`` (``decay``, ``warmup``) or ``lawa`` (``k``)."""

    sharded = True

    def __init__(self, model: nn.Module, kind: str, *, decay: float = 0.999,
                 warmup: bool = False, k: int = 5, offload: bool = False,
                 sigma_rel: float = 0.10) -> None:
        from swa_research.averaging.ema import ema_multi_avg_fn

        if kind not in WEIGHT_METHODS:
            raise ValueError(f"method={kind!r}: a ShardedAverage is one of "
                             f"{', '.join(WEIGHT_METHODS)}")
        if has_batch_norm(model):
            raise ValueError("a model with batch norm cannot be averaged sharded: FSDP does not "
                             "shard its statistics (use DDP for BN models)")
        self.method, self.model = kind, model
        self.decay, self.warmup, self.k = float(decay), bool(warmup), int(k)
        # offload: the average (and LAWA's ring) in host memory, pinned where there is a GPU;
        # each update copies this rank's shards into a pinned buffer without waiting, and the
        # arithmetic on the host happens at the next update or read (:meth:`_flush`).
        self.offload = bool(offload)
        self.weights: dict[str, Tensor] = {n: self._held(p) for n, p in
                                           model.named_parameters()}
        self._staged: list[Tensor] | None = None  # the point copied, not yet averaged in
        self._event: Any = None  # the staged copy's completion (CUDA), else None
        self._buffer: list[Tensor] | None = None
        from swa_research.averaging.power_ema import power_multi_avg_fn, sigma_rel_to_gamma

        self.sigma_rel = float(sigma_rel)
        self.fn: Callable[..., None] = (
            ema_multi_avg_fn(decay, warmup) if kind == "ema"
            else power_multi_avg_fn(sigma_rel_to_gamma(sigma_rel)) if kind == "power_ema"
            else get_swa_multi_avg_fn())
        self.ring: list[list[Tensor]] = []  # lawa: the latest k points, sharded as the weights
        self.count = 0

    # -- what an Average is -----------------------------------------------------------------
    @property
    def n_averaged(self) -> int:
        """The points in the average (LAWA: in its ring, at most k), as the unsharded ones."""
        if self.method != "lawa":
            return self.count
        return min(self.k, len(self.ring) + (self._staged is not None))  # (one staged)

    @property
    def module(self) -> nn.Module:
        raise ValueError("a sharded average has no network of its own (FSDP cannot copy a "
                         "sharded model): evaluate it with `with average.swapped(): ...`, "
                         "save it with full_state_dict() or state_dict()")

    def _held(self, p: Tensor) -> Tensor:
        """A copy of parameter ``p`` where the average keeps it: beside ``p``, or (offload) in
        host memory, as a DTensor of ``p``'s placements."""
        if not self.offload:
            return p.detach().clone()
        from torch.distributed.tensor import DTensor

        local = _local(p).detach().to("cpu", copy=True)
        if torch.cuda.is_available():
            local = local.pin_memory()
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def _locals(self) -> list[Tensor]:
        self._flush()
        return [_local(w) for w in self.weights.values()]

    @torch.no_grad()
    def _flush(self) -> None:
        """The staged point averaged in (offload): after its copy has completed."""
        if self._staged is None:
            return
        if self._event is not None:
            self._event.synchronize()
        staged, self._staged, self._event = self._staged, None, None
        with torch.inference_mode(False):  # a read inside an evaluation: normal tensors
            self._average_in(staged, self.count - 1)

    def _model_locals(self, model: nn.Module) -> list[Tensor]:
        reshard(model)  # the sharded parameters registered, not the unsharded ones
        params = dict(model.named_parameters())
        if params.keys() != self.weights.keys():
            raise ValueError("update: the model's parameters are not the ones this average was "
                             "made of")
        return [_local(params[n]).detach() for n in self.weights]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        theirs = self._model_locals(model)
        if not self.offload:
            self._average_in(theirs, self.count)
            self.count += 1
            return
        self._flush()  # the previous point, whose copy has long completed
        if self._buffer is None:  # one pinned buffer, reused
            self._buffer = [torch.empty_like(_local(w), pin_memory=torch.cuda.is_available())
                            for w in self.weights.values()]
        staging = self._buffer
        torch._foreach_copy_(staging, theirs, non_blocking=True)
        if theirs and theirs[0].is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._staged = staging
        self.count += 1

    def _average_in(self, theirs: list[Tensor], count: int) -> None:
        """The point ``theirs`` (local shards) into the average, which holds ``count``."""
        mine = [_local(w) for w in self.weights.values()]
        if self.method == "lawa":
            if len(self.ring) == self.k:  # reuse the oldest point's storage
                self.ring.append(self.ring.pop(0))
            else:
                self.ring.append([w.detach().clone() for w in self.weights.values()])
            torch._foreach_copy_([_local(t) for t in self.ring[-1]], theirs)
            torch._foreach_copy_(mine, [_local(t) for t in self.ring[0]])
            for point in self.ring[1:]:
                torch._foreach_add_(mine, [_local(t) for t in point])
            torch._foreach_div_(mine, float(len(self.ring)))
        elif count == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            self.fn(mine, theirs, count)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """The model (by default the one the average was made of) holding the average's
        weights for the block; its own come back after, bit for bit."""
        model = self.model if model is None else model
        with kept_weights(model):
            with torch.no_grad():  # (offload: from host memory)
                torch._foreach_copy_([_local(p) for p in model.parameters()], self._locals())
            yield model

    def predict(self, x: Tensor) -> Tensor:
        with self.swapped() as model:
            return model(x)

    def nbytes(self) -> int:
        """This rank's memory of the average: its shards (and LAWA's ring of them)."""
        local = sum(t.numel() * t.element_size() for t in self._locals())
        return local * (1 + len(self.ring))

    def whole_nbytes(self) -> int:
        """The bytes the average would take unsharded (every rank's shards together)."""
        whole = sum(w.numel() * w.element_size() for w in self.weights.values())
        return whole * (1 + len(self.ring))

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole averaged network's state dict on the CPU, in the model's layout (tied
        weights under each of their names, the model's buffers: no BN, so they are fixed),
        gathered one tensor at a time (every rank takes part)."""
        return {k: whole_tensor(v) for k, v in self.sharded_state_dict().items()}

    def sharded_state_dict(self) -> dict[str, Tensor]:
        """The averaged network's state dict in the model's layout, its parameters the
        average's DTensors (nothing gathered): what ``torch.distributed.checkpoint`` writes
        rank by rank."""
        self._flush()
        return in_layout(self.model, self.weights)

    # -- settings and state ----------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        if self.offload:
            return {**self._settings(), "offload": "cpu"}
        return self._settings()

    def _settings(self) -> dict[str, Any]:
        if self.method == "power_ema":
            return {"sigma_rel": self.sigma_rel}
        if self.method == "ema":
            return {"decay": self.decay, "ema_warmup": self.warmup}
        return {"k": self.k, "updates": self.count} if self.method == "lawa" else {}

    def state_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings().items() if k not in ("updates", "offload")}

    def state_dict(self) -> dict[str, Any]:
        """:meth:`tensors` (DTensors: ``torch.distributed.checkpoint`` writes each rank's
        shards and can load them on another number of ranks) and :meth:`meta`."""
        return {"tensors": self.tensors(), **self.meta()}

    def tensors(self, ring: int | None = None) -> dict[str, Any]:
        """The average's DTensors by name (weights, LAWA's ring points): what a sharded
        checkpoint writes rank by rank, and, with ``ring`` points made ready, what it loads
        into."""
        self._flush()
        if ring is not None:
            self.ring = [[w.detach().clone() for w in self.weights.values()]
                         for _ in range(ring)]
        names = list(self.weights)
        return {"weights": self.weights,
                "ring": {str(i): dict(zip(names, point, strict=True))
                         for i, point in enumerate(self.ring)}}

    def meta(self) -> dict[str, Any]:
        """What :meth:`tensors` does not hold: the count, the ring's length, the identity."""
        return {"count": self.count, "ring": len(self.ring), "identity": self.identity()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.check_state(meta)
        self._staged = self._event = None  # a point staged before the load is not kept
        self.count = int(meta["count"])

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._staged = self._event = None  # a point staged before the load is not kept
        saved = state["tensors"]
        if set(saved["weights"]) != set(self.weights):
            raise ValueError("the state's weights are not this model's parameters")
        mine = self.tensors(int(state["ring"]))  # the ring's points made ready
        pairs = [(mine["weights"], saved["weights"]),
                 *((mine["ring"][i], saved["ring"][i]) for i in mine["ring"])]
        for ours, theirs in pairs:
            for n, t in ours.items():
                t.copy_(theirs[n])
        self.count = int(state["count"])
