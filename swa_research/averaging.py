"""Weight averaging: when to average, the average itself, and the BN update of the average."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from swa_research.config import ScheduleConfig, SwaConfig


@dataclass(frozen=True)
class AveragingPlan:
    """When the average is updated.

    unit iter (torchcontrib's SWA, the seed): after the n-th step (n counted from 1) when
      n > start and n % freq == 0. The lr phase starts at iteration ``start``.
    unit epoch (timgaripov/swa): after the E-th epoch (E counted from 1) when E >= start and
      (E - start) % freq == 0. The lr phase (the schedule's horizon) is ``start`` epochs.
    cyclical schedule: at the end of every cycle after the start, whatever the unit.
    """

    method: str  # swa | ema | none
    unit: str
    start: int  # resolved to iterations (unit iter) or epochs (unit epoch)
    freq: int
    iters_per_epoch: int
    epochs: int
    cycle: int | None = None  # set for the cyclical schedule

    @classmethod
    def from_config(cls, swa: SwaConfig, schedule: ScheduleConfig, epochs: int,
                    iters_per_epoch: int) -> AveragingPlan:
        budget = epochs if swa.unit == "epoch" else epochs * iters_per_epoch
        start = int(round(swa.start * budget)) if swa.start < 1.0 else int(round(swa.start))
        return cls(method=swa.method, unit=swa.unit, start=start, freq=swa.freq,
                   iters_per_epoch=iters_per_epoch, epochs=epochs,
                   cycle=schedule.cycle if schedule.name == "cyclical" else None)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def start_iter(self) -> int | None:
        """First iteration of the averaging phase, for the lr schedule; None when off."""
        if not self.enabled:
            return None
        return self.start * self.iters_per_epoch if self.unit == "epoch" else self.start

    @property
    def lr_switch_iter(self) -> int | None:
        """Where the constant schedule switches to swa.lr: so that the first average is taken
        after steps at swa.lr in either unit. unit iter: iteration ``start`` (the first average
        follows a step n > start). unit epoch: the first iteration of epoch ``start`` (counted
        from 1), whose end gives the first average, as in the paper's code, where the averaged
        epochs are trained at the SWA lr."""
        if not self.enabled:
            return None
        if self.unit == "epoch" and self.cycle is None:
            return max(0, self.start - 1) * self.iters_per_epoch
        return self.start_iter

    def due_after_iter(self, n: int) -> bool:
        if not self.enabled:
            return False
        if self.cycle is not None:
            origin = self.start_iter or 0
            return n > origin and (n - origin) % self.cycle == 0
        return self.unit == "iter" and n > self.start and n % self.freq == 0

    def due_after_epoch(self, epoch: int) -> bool:
        if not self.enabled or self.cycle is not None or self.unit != "epoch":
            return False
        return epoch >= self.start and (epoch - self.start) % self.freq == 0

    def update_points(self) -> list[int]:
        """When the average is updated: the iterations (unit iter, cyclical) or epochs (unit
        epoch) after which it is, in order."""
        points = []
        for e in range(1, self.epochs + 1):
            if self.cycle is not None or self.unit == "iter":
                lo, hi = (e - 1) * self.iters_per_epoch + 1, e * self.iters_per_epoch
                points.extend(n for n in range(lo, hi + 1) if self.due_after_iter(n))
            if self.due_after_epoch(e):
                points.append(e)
        return points

    def count_updates(self) -> int:
        return len(self.update_points())


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


Slots = list[tuple[dict[str, Any], str]]


def tensor_slots(module: nn.Module) -> tuple[Slots, Slots]:
    """Where each parameter and each buffer of the module lives, in ``parameters()`` and
    ``buffers()`` order: (the owning module's ``_parameters`` or ``_buffers`` dict, key).

    Reading the tensors through these is a list comprehension, where ``parameters()`` walks the
    module tree (about 0.3 ms for VGG16-BN per call, measured: as much host time as a GPU
    spends on a whole small-batch step), and it still sees a tensor that was replaced since
    (``module.to()`` replaces buffers). Adding or removing submodules needs new slots."""
    def slots(named: Iterable[tuple[str, Tensor]], kind: str) -> Slots:
        out = []
        for name, _ in named:
            owner, _, leaf = name.rpartition(".")
            out.append((getattr(module.get_submodule(owner), kind), leaf))
        return out
    return (slots(module.named_parameters(), "_parameters"),
            slots(module.named_buffers(), "_buffers"))


def _pairs(mine: Slots, theirs: Slots) -> list[tuple[list[Tensor], list[Tensor]]]:
    """The tensors of two slot lists, paired and grouped by device and dtype (the
    multi-tensor ops take one group per call)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for (mine_dict, mine_key), (their_dict, their_key) in zip(mine, theirs, strict=True):
        a, b = mine_dict[mine_key], their_dict[their_key]
        pair = groups.setdefault((a.device, a.dtype), ([], []))
        pair[0].append(a)
        pair[1].append(b if b.device == a.device else b.to(a.device))
    return list(groups.values())


class HostCountAveragedModel(AveragedModel):
    """AveragedModel whose update never reads a tensor on the host.

    ``AveragedModel.update_parameters`` tests its ``n_averaged`` tensor with ``bool()`` and
    ``>`` and copies it to the parameters' device: on a GPU each update waits for the queued
    work (a blocking copy from pageable memory when the counter is on the CPU, where
    AveragedModel creates it; host reads when it is on the GPU). Here the count is a Python int;
    the ``n_averaged`` buffer is still written (a fill, queued like any kernel) so that state
    dicts keep upstream's layout, and it is read back once after a state dict is loaded. The
    arithmetic is upstream's multi-tensor (foreach) SWA or EMA function, one call per device and
    dtype.
    """

    def __init__(self, model: nn.Module,
                 multi_avg_fn: Callable[[list[Tensor], list[Tensor], Any], None] | None = None
                 ) -> None:
        super().__init__(model, multi_avg_fn=multi_avg_fn, use_buffers=False)
        self._count: int | None = 0
        # Slots of the average and of the last source model (held weakly), built once.
        self._own_slots: tuple[Slots, Slots] | None = None
        self._source: tuple[weakref.ref[nn.Module], tuple[Slots, Slots]] | None = None

    @property
    def count(self) -> int:
        if self._count is None:  # a state dict was loaded: one read, never in the step loop
            self._count = int(self.n_averaged)
        return self._count

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None

    def __getstate__(self) -> dict[str, Any]:
        # Slots are rebuilt after a copy or unpickling: a copy's would name the original's
        # tensors (and a weak reference cannot be pickled).
        return {**self.__dict__, "_own_slots": None, "_source": None}

    def _slots(self, model: nn.Module) -> tuple[tuple[Slots, Slots], tuple[Slots, Slots]]:
        if self._own_slots is None:
            self._own_slots = tensor_slots(self.module)
        if self._source is None or self._source[0]() is not model:
            self._source = (weakref.ref(model), tensor_slots(model))
        return self._own_slots, self._source[1]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        # The tensors come from slots built once (walking the module tree at every update
        # costs more host time than the arithmetic); no detach(): under no_grad the in-place
        # multi-tensor ops may write parameters.
        n = self.count
        (my_params, my_buffers), (their_params, their_buffers) = self._slots(model)
        average = self.multi_avg_fn or get_swa_multi_avg_fn()
        for mine_list, theirs_list in _pairs(my_params, their_params):
            if n == 0:
                torch._foreach_copy_(mine_list, theirs_list)
            else:
                average(mine_list, theirs_list, n)
        # use_buffers=False: the buffers (BN statistics) follow the model's, one multi-tensor
        # copy per device and dtype.
        for mine_list, theirs_list in _pairs(my_buffers, their_buffers):
            torch._foreach_copy_(mine_list, theirs_list)
        self._count = n + 1
        self.n_averaged.fill_(n + 1)


class Averager:
    """An equal (SWA) or exponential (EMA) average of a model's weights.

    Built on torch.optim.swa_utils.AveragedModel. BN buffers are copied from the model at each
    update (use_buffers=False) and recomputed with :func:`bn_update` before the average is
    evaluated.
    """

    def __init__(self, model: nn.Module, method: str, decay: float = 0.999,
                 bn_update: bool = True) -> None:
        if method not in ("swa", "ema"):
            raise ValueError(f"averaging method must be 'swa' or 'ema', got {method!r}")
        multi_avg_fn = get_ema_multi_avg_fn(decay) if method == "ema" else None
        self.averaged = HostCountAveragedModel(model, multi_avg_fn=multi_avg_fn)
        self.method = method
        self.bn_update = bn_update and has_batch_norm(model)
        self._bn_stale = False

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        return self.averaged.count

    def state_dict(self) -> dict[str, object]:
        """The average (with its n_averaged) and whether its BN statistics are stale."""
        return {"averaged": self.averaged.state_dict(), "bn_stale": self._bn_stale}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.averaged.load_state_dict(state["averaged"])  # type: ignore[arg-type]
        self._bn_stale = bool(state["bn_stale"])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self._bn_stale = True

    def prepare_for_eval(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Recompute the average's BN statistics if its weights changed; True if it ran."""
        if not (self.bn_update and self._bn_stale and self.n_averaged > 0):
            return False
        bn_update(batches, self.module)
        self._bn_stale = False
        return True


@torch.no_grad()
def bn_update(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> None:
    """BN statistics recomputed over one pass of ``batches``, each batch weighted by its size.

    As the SWA paper's ``bn_update`` (timgaripov/swa utils.py): the running statistics are reset
    and every BN layer's momentum is set to b / (n + b) before a batch of b samples, n seen
    before it, so the result is the sample-weighted mean of the batch statistics (a short last
    batch counts for what it holds; torch's ``update_bn`` weights batches equally). The sizes
    are known on the host: no device sync per batch. Momentum and train/eval mode are restored.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = {m: m.momentum for m in layers}
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        # inference_mode is allowed: the pass only updates the BN buffers in place.
        with torch.inference_mode():
            for x, _ in batches:
                b = x.shape[0]
                for m in layers:
                    m.momentum = b / (seen + b)
                model(x)
                seen += b
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
