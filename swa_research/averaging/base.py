"""What an average of a model's weights is to the rest of the project, the weight average that
SWA and EMA share, and the BN update of an average."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class EvalSet:
    """A whole set handed to an average that predicts sets itself (:meth:`Average.
    collect_probs`): ``inputs()`` a fresh pass over its model inputs in order, ``size`` their
    count, ``labels`` (optional) for a progress line. The caller makes the batches: the
    framework from its data sets, a library user from theirs."""

    inputs: Callable[[], Iterable[Tensor]]
    size: int
    labels: Tensor | None = None


class Average(ABC):
    """One average kept during training and evaluated beside the SGD model.

    The trainer calls :meth:`update` when the averaging plan says so, :meth:`prepare_for_eval`
    before it evaluates (with training batches, for the BN statistics), then evaluates
    :meth:`predict` (in eval mode, through :attr:`module`'s mode); a run saves :attr:`module`'s
    weights and checkpoints :meth:`state_dict`.

    An average that is not one network (a posterior whose prediction is the mean over sampled
    networks, e.g. SWAG) overrides :meth:`collect_probs`: it then predicts whole sets itself,
    and the trainer scores the log of its probabilities as logits (loss, accuracy, NLL, ECE).
    :meth:`eval_due` lets such an average skip evaluations that would cost too much.
    """

    method: str = ""  # the registry name

    @abstractmethod
    def update(self, model: nn.Module) -> None:
        """Take the model's current weights into the average."""

    @property
    @abstractmethod
    def n_averaged(self) -> int:
        """How many times the average was updated; 0: there is nothing to evaluate yet."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The averaged network: its state dict is the saved weights, its train/eval mode the
        mode :meth:`predict` runs in."""

    def prepare_for_eval(self, batches: Batches) -> bool:
        """Get ready to be evaluated (e.g. recompute BN statistics); True if work was done."""
        return False

    def predict(self, x: Tensor) -> Tensor:
        """Logits for a batch of inputs."""
        return self.module(x)

    def eval_due(self, evaluation: int, final: bool) -> bool:
        """Whether the run's ``evaluation``-th evaluation (counted from 1; ``final``: the last
        one) evaluates this average; False leaves its columns empty there. Default: always."""
        return True

    def collect_probs(self, sets: dict[str, EvalSet], bn_batches: Callable[[], Batches],
                      seed: int) -> dict[str, Tensor] | None:
        """Class probabilities [N, C] of whole sets by name, for an average that predicts a set
        itself; ``bn_batches()`` gives a fresh pass over training batches each time it is
        called, ``seed`` makes the result reproducible. None (the default): the average is one
        network, prepared with :meth:`prepare_for_eval` and evaluated batch by batch through
        :meth:`predict`."""
        return None

    def export(self) -> dict[str, Any]:
        """What ``<name>.pt`` holds besides ``module``'s state dict (e.g. a posterior)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The method's own settings that its results depend on, recorded beside them in
        metrics.json (e.g. SWAG's sample scale). Default: none."""
        return {}

    def nbytes(self) -> int:
        """This process's memory of the average: its network's parameters and buffers (and a
        method's own state, where it overrides this)."""
        return sum(t.numel() * t.element_size()
                   for t in (*self.module.parameters(), *self.module.buffers()))

    def state_settings(self) -> dict[str, Any]:
        """The settings a saved state was formed with and cannot be continued without (an
        EMA's decay): :meth:`check_state` refuses a state saved with others. Default: none."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What :meth:`state_dict` records of the average besides its tensors, and what
        :meth:`check_state` compares: its method and :meth:`state_settings`."""
        return {"method": self.method, **self.state_settings()}

    def check_state(self, state: dict[str, Any]) -> None:
        """A ValueError, on one line, when ``state`` was saved by another method or with other
        :meth:`state_settings` (a state saved before states recorded them is not checked)."""
        saved = state.get("identity") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            return
        if saved.get("method") != self.method:
            raise ValueError(f"the state is of a {saved.get('method')} average and cannot be "
                             f"loaded into a {self.method} average")
        mine = self.identity()
        diffs = [f"{k}={saved[k]!r} (this average's: {mine[k]!r})" for k in mine
                 if k in saved and saved[k] != mine[k]]
        if diffs:
            raise ValueError(f"the {self.method} state was formed with {', '.join(diffs)}: "
                             "continuing it with other settings would mix two averages")

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class HostCountAveragedModel(AveragedModel):
    """``AveragedModel`` whose update never reads a tensor on the host.

    Upstream's ``update_parameters`` tests its ``n_averaged`` tensor with ``bool()`` and ``>``
    (pytorch#157705): on a GPU each update then waits for all queued work. Here the count is a
    Python int; the ``n_averaged`` buffer is still filled (a queued kernel), so state dicts keep
    upstream's layout, and read once when a state dict is loaded. The arithmetic is upstream's
    multi-tensor SWA or EMA function, one call per device and dtype; the buffers (BN statistics)
    are copied from the model (``use_buffers=False``) and recomputed before evaluation.
    """

    def __init__(self, model: nn.Module,
                 multi_avg_fn: Callable[[list[Tensor], list[Tensor], Any], None] | None = None,
                 average_buffers: bool = False) -> None:
        # None: the equal average (kept None, as upstream does, so that the module pickles).
        super().__init__(model, multi_avg_fn=multi_avg_fn, use_buffers=False)
        self.count = 0
        # average_buffers: floating-point buffers (BN running statistics) mixed in with the
        # same function as the parameters, integer ones copied (timm's ModelEmaV3).
        self.average_buffers = average_buffers

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.count = int(self.n_averaged)
        return result

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        for mine, theirs in _grouped(self.module.parameters(), model.parameters()):
            if self.count == 0:
                torch._foreach_copy_(mine, theirs)
            else:
                (self.multi_avg_fn or _SWA)(mine, theirs, self.count)
        for mine, theirs in _grouped(self.module.buffers(), model.buffers()):
            if self.average_buffers and self.count and mine[0].is_floating_point():
                (self.multi_avg_fn or _SWA)(mine, theirs, self.count)
            else:
                torch._foreach_copy_(mine, theirs)
        self.count += 1
        self.n_averaged.fill_(self.count)


_SWA = get_swa_multi_avg_fn()


def _grouped(mine: Iterable[Tensor], theirs: Iterable[Tensor]
             ) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Paired tensors grouped by device and dtype (a multi-tensor op takes one group)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for a, b in zip(mine, theirs, strict=True):
        pair = groups.setdefault((a.device, a.dtype), ([], []))
        pair[0].append(a)
        pair[1].append(b if b.device == a.device else b.to(a.device))
    return list(groups.values())


class WeightAverage(Average):
    """An average of the weights themselves, one network evaluated like the model: SWA and EMA
    differ only in the multi-tensor function that mixes a new point in (``multi_avg_fn``).

    The BN statistics of an averaged network are not the average of the model's: they are
    recomputed with :func:`bn_update` before the average is evaluated, once per change; with
    ``average_buffers`` (an EMA's ``ema_buffers="average"``) they are averaged like the
    weights instead, as timm's ``ModelEmaV3`` and Lightning's ``WeightAveraging`` do.
    """

    def __init__(self, model: nn.Module, multi_avg_fn: Callable[..., None] | None = None,
                 bn_update: bool = True, average_buffers: bool = False) -> None:
        self.averaged = HostCountAveragedModel(model, multi_avg_fn, average_buffers)
        # Averaged buffers are the average's statistics: not recomputed.
        self.bn_update = bn_update and has_batch_norm(model) and not average_buffers
        self._bn_stale = False

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        return self.averaged.count

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self._bn_stale = True

    def prepare_for_eval(self, batches: Batches) -> bool:
        if not (self.bn_update and self._bn_stale and self.n_averaged > 0):
            return False
        bn_update(batches, self.module)
        self._bn_stale = False
        return True

    def state_dict(self) -> dict[str, Any]:
        """The average (with its n_averaged) and whether its BN statistics are stale."""
        return {"averaged": self.averaged.state_dict(), "bn_stale": self._bn_stale,
                "identity": self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.averaged.load_state_dict(state["averaged"])
        self._bn_stale = bool(state["bn_stale"])


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def first_item(batch: Any) -> Tensor:
    """The model input of a batch: its first item (``(x, y)`` batches), or the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def bn_update(batches: Iterable[Any], model: nn.Module,
              input_fn: Callable[[Any], Tensor] = first_item) -> None:
    """BN statistics recomputed over one pass of ``batches``, each batch weighted by its size.

    As the SWA paper's ``bn_update`` (timgaripov/swa utils.py): the running statistics are reset
    and every BN layer's momentum is set to b / (n + b) before a batch of b samples, n seen
    before it, so the result is the sample-weighted mean of the batch statistics (a short last
    batch counts for what it holds; torch's ``update_bn`` weights batches equally). The sizes
    are known on the host: no device sync per batch. Momentum and train/eval mode are restored.
    ``input_fn`` gives a batch's model input (default: its first item, or the batch itself).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = {m: m.momentum for m in layers}
    was_training = model.training
    kept = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)
             if b is not None] for m in layers]
    for m in layers:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        # inference_mode is allowed: the pass only updates the BN buffers in place.
        with torch.inference_mode():
            for batch in batches:
                x = input_fn(batch)
                b = x.shape[0]
                for m in layers:
                    m.momentum = b / (seen + b)
                model(x)
                seen += b
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:  # an empty pass: the statistics it reset are put back, never left at 0/1
        for m, saved in zip(layers, kept, strict=True):
            live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                    if b is not None]
            for b, old in zip(live, saved, strict=True):
                b.copy_(old)
    # Under DDP each rank passed its share of the batches, and its statistics are its
    # sample-weighted means: weighted by each rank's sample count, their mean over the ranks is
    # what one process computes over all the batches.
    mean_over_ranks([t for m in layers for t in (m.running_mean, m.running_var)
                      if t is not None], weight=seen)


def mean_over_ranks(tensors: list[Tensor], weight: float) -> None:
    """In a torch.distributed job of several ranks (every rank calls this at the same point):
    each tensor replaced by the mean of the ranks' values, each rank's weighted by its
    ``weight`` (one all-reduce, in float64; unchanged where the weights sum to 0). In one
    process: nothing."""
    if not tensors or not dist.is_available() or not dist.is_initialized() \
            or dist.get_world_size() < 2:
        return
    device = tensors[0].device
    packed = torch.cat([torch.cat([t.detach().reshape(-1).double() for t in tensors]) * weight,
                        torch.tensor([float(weight)], dtype=torch.float64, device=device)])
    dist.all_reduce(packed)
    if packed[-1].item() == 0:
        return
    means = (packed[:-1] / packed[-1]).split([t.numel() for t in tensors])
    with torch.no_grad():
        for t, m in zip(tensors, means, strict=True):
            t.copy_(m.view_as(t))
