"""Weight averaging in a Lightning run (``pip install swa_research[lightning]``, Lightning 2.x):
:class:`AveragingCallback` keeps one or more averages of the LightningModule's weights (SWA,
EMA, SWAG, SWAG-Diagonal or any registered method) on a plan in iterations, epochs or fractions
of the budget, and evaluates each beside the module at every validation, with fresh BN
statistics, through Lightning's own loggers (``swa/val_loss``, ``ema/val_acc``, ...).

    trainer = L.Trainer(max_epochs=20, callbacks=[AveragingCallback(["swa", "ema"], start=0.75)])

Where it goes beyond Lightning's callbacks (read in lightning 2.6's ``callbacks/``):

- ``StochasticWeightAveraging`` averages once per epoch only, from an epoch, with the equal
  average only, drives the learning rate itself (SWALR), and replaces the module's weights at
  the end; the averaged model is evaluated only then. ``WeightAveraging`` (2.5+) updates by a
  ``should_update`` rule, swaps the average in *for* validation (the module's own metrics are then
  the average's: one or the other, never both) and recomputes no BN statistics (it relies on
  ``use_buffers``, which averages running statistics instead of recomputing them).
- Here: several averages at once (``swa.also`` of the framework) and SWAG's posteriors; a plan
  in iterations or epochs, or as a fraction of the budget (``start=0.75``); the module is never
  swapped, so validation logs the SGD iterate (the module's own ``validation_step``) and each
  average (``NAME/val_loss``, ``NAME/val_acc``, ``NAME/val_nll``, ``NAME/val_ece``) side by side;
  the average's BN statistics are recomputed with a sample-weighted pass over the training
  batches before each evaluation (the SWA paper's ``bn_update``; under DDP each rank passes its
  shard and the statistics are averaged over the ranks); SWAG is scored at test by Bayesian model
  averaging (``NAME/test_*``); weight snapshots for post-hoc averages (``snapshot_every``);
  the averages are in the callback's checkpoint state, so a resumed fit continues them;
  under ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model`` every average is
  sharded like the module (no collective per update, 1/N of its memory a rank), which neither
  of Lightning's callbacks supports.

Batches are ``(input, target)`` by default; ``input_fn`` and ``target_fn`` read any other
structure. The metrics follow what the module's outputs are: logits [N, C] with labels [N] get
classification's (loss, acc, nll, ece), next-token logits [N, T, V] with targets [N, T] a
language model's (loss, ppl); pass ``metrics_fn`` for another task (it takes the set's outputs
and targets and returns named floats), e.g. ``metrics_fn=lambda out, y: {"mae": float((out -
y).abs().mean())}``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from swa_research.averaging import (
    SWAG,
    Average,
    AveragingPlan,
    make_average,
    make_plan,
    predict,
    snapshot,
)
from swa_research.averaging.base import bn_update, first_item, has_batch_norm
from swa_research.averaging.library import check_average_options, check_plan
from swa_research.averaging.metrics import task_metrics
from swa_research.averaging.sharded import copy_into_model, whole_tensor

__all__ = ["AveragingCallback"]


def second_item(batch: Any) -> Tensor:
    return batch[1]


def token_metrics(losses: Tensor, targets: Tensor) -> dict[str, float]:
    """A language model's ``loss`` (mean per token, targets of -1 not counted) and ``ppl``
    from the per-token losses of a whole set: what :func:`~swa_research.averaging.
    language_model_metrics` gives from its logits."""
    kept = losses[targets != -1].double()
    loss = kept.mean()
    return {"loss": float(loss), "ppl": float(loss.exp())}


def _write_snapshot(folder: Path, state: dict[str, Tensor], step: int, epoch: int
                    ) -> dict[str, Any]:
    """One weights file of a series (written whole, then renamed into place); its index
    entry."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"it{step:06d}.pt"
    tmp = folder / f".{name}.tmp"
    torch.save({"state_dict": state, "iteration": step, "epoch": epoch}, tmp)
    tmp.replace(folder / name)
    return {"iteration": step, "epoch": epoch, "file": name}


def _sharded(average: Average) -> bool:
    """Whether ``average`` is of a module sharded with FSDP2 (no network of its own)."""
    return bool(getattr(average, "sharded", False))


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """A nested dict of tensors by slash-joined key."""
    out: dict[str, Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _whole_state(average: Any) -> dict[str, Any]:
    """A sharded average's checkpoint state with its tensors whole on the CPU, gathered one at
    a time (every rank takes part): Lightning's strategies pickle the callbacks' states from
    rank 0 alone, so each rank's shards cannot travel in them as they are."""
    whole = {k: whole_tensor(t) for k, t in _leaves(average.tensors()).items()}
    return {"whole": whole, **average.meta()}


@torch.no_grad()
def _load_whole_state(average: Any, state: dict[str, Any]) -> None:
    """:func:`_whole_state`'s state into a sharded average: each rank takes its slice of each
    whole tensor (``distribute_tensor`` without communication), on any number of ranks."""
    from torch.distributed.tensor import distribute_tensor

    if "whole" not in state:
        raise ValueError(f"the checkpoint's {average.method} average was saved unsharded; "
                         "resume it without FSDP")
    average.load_meta(state)
    mine = _leaves(average.tensors(int(state["ring"])))
    if set(mine) != set(state["whole"]):
        raise ValueError(f"the checkpoint's {average.method} average does not fit this model")
    for key, t in mine.items():
        piece = distribute_tensor(state["whole"][key].to(t.device, t.dtype), t.device_mesh,
                                  t.placements, src_data_rank=None)
        t.to_local().copy_(piece.to_local())


def _loaders(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


class AveragingCallback(pl.Callback):
    """Averages of the module's weights, evaluated beside it; see the module docstring.

    ``validate_with=NAME``: the module validates with that average's weights (Lightning's
    ``WeightAveraging``; off by default: the module's own metrics stay the SGD iterate's);
    ``copy_at_end=NAME``: the module ends ``fit`` holding that average's weights
    (``WeightAveraging`` and ``StochasticWeightAveraging``; off by default).
    ``checkpoint_with=NAME``: checkpoints hold that average as their ``state_dict`` (the module's
    own under ``current_model_state``, which a resume restores), as ``WeightAveraging``.
    ``methods``: method names (``["swa", "ema"]``), or averages by name mapped to their options
    (``{"ema": {"decay": 0.99}}``; :func:`~swa_research.averaging.make_average`'s keywords),
    with ``method`` where the name is not the method: several EMAs at once,
    ``{"ema_fast": {"method": "ema", "decay": 0.99}, "ema_slow": {"method": "ema",
    "decay": 0.999}}``; the logged metrics use the names (``ema_slow/val_loss``).
    ``start``, ``freq``, ``unit``, ``cycle``: the plan (:func:`~swa_research.averaging.make_plan`),
    in optimizer steps (``trainer.global_step``: with ``accumulate_grad_batches=k`` an epoch of
    n batches is ceil(n / k) steps) and epochs; the budget is the trainer's ``max_steps`` or
    ``max_epochs`` x its steps per epoch, whichever ends the fit first. A training loader
    without a length needs ``Trainer(max_steps=N)`` and ``unit="iter"``; a model with BN then
    needs ``bn_batches`` (each BN pass reads that many training batches; None: the whole
    loader). ``evaluate``: score the
    averages at validation. ``snapshot_every`` (in ``snapshot_unit``): save the module's weights
    into ``snapshot_dir`` (default: the trainer's ``default_root_dir``/trajectory) for
    :func:`~swa_research.averaging.average_states` after training. ``posthoc_ema`` (e.g.
    ``(0.05, 0.10)``, EDM2's pair): power EMAs of these relative widths take every optimizer
    step, from the first, and are saved every ``posthoc_ema_every`` steps and after the last
    into ``posthoc_ema_dir`` (default: ``default_root_dir``/posthoc_ema), ``sigma_rel_<s>/
    itNNNNNN.pt`` with an ``index.json`` each, the trainer's layout; after training
    ``average_states(kind="posthoc_ema")`` reconstructs the EMA of any width from them."""

    def __init__(self, methods: Sequence[str] | dict[str, dict[str, Any]] = ("swa",), *,
                 start: float = 0.75, freq: int = 1, unit: str = "epoch",
                 cycle: int | None = None, evaluate: bool = True,
                 input_fn: Callable[[Any], Tensor] = first_item,
                 target_fn: Callable[[Any], Tensor] = second_item,
                 metrics_fn: Callable[[Tensor, Tensor], dict[str, float]] | None = None,
                 swag_seed: int = 0, snapshot_every: int = 0, snapshot_unit: str = "epoch",
                 snapshot_dir: str | Path | None = None, bn_batches: int | None = None,
                 validate_with: str | None = None, copy_at_end: str | None = None,
                 checkpoint_with: str | None = None, posthoc_ema: Sequence[float] = (),
                 posthoc_ema_every: int = 0, posthoc_ema_dir: str | Path | None = None
                 ) -> None:
        super().__init__()
        self.options = dict(methods) if isinstance(methods, dict) else {m: {} for m in methods}
        if not self.options:
            raise ValueError("methods: name at least one averaging method")
        for name in self.options:  # checked now, not at fit
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"{name!r} cannot name an average (it names the logged "
                                 "metrics: swa/val_loss)")
            method, rest = self._method(name)
            try:
                check_average_options(method, rest)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        self.plan_args = dict(start=start, freq=freq, unit=unit, cycle=cycle)
        check_plan(start, freq, unit, cycle)
        if snapshot_unit not in ("iter", "epoch") or snapshot_every < 0:
            raise ValueError("snapshot_unit must be 'iter' or 'epoch', snapshot_every >= 0")
        if bn_batches is not None and (isinstance(bn_batches, bool)
                                       or not isinstance(bn_batches, int) or bn_batches < 1):
            raise ValueError(f"bn_batches={bn_batches!r}: a whole number >= 1, or None")
        self.bn_batches = bn_batches
        self.widths = [float(w) for w in posthoc_ema]
        if self.widths:
            if len(set(self.widths)) < 2 or posthoc_ema_every < 1:
                raise ValueError(f"posthoc_ema={tuple(posthoc_ema)}: two or more distinct "
                                 "widths (EDM2's pair: 0.05, 0.10) saved every "
                                 "posthoc_ema_every >= 1 steps")
            for w in self.widths:
                check_average_options("power_ema", {"sigma_rel": w})
        self.posthoc_every = posthoc_ema_every
        self.posthoc_dir = None if posthoc_ema_dir is None else Path(posthoc_ema_dir)
        self.profiles: dict[float, Average] = {}
        self.profile_saves: list[dict[str, Any]] = []  # each save's step and epoch
        for key, name in (("validate_with", validate_with), ("copy_at_end", copy_at_end),
                          ("checkpoint_with", checkpoint_with)):
            if name is not None and name not in self.options:
                raise ValueError(f"{key}={name!r}: not one of this callback's averages "
                                 f"({', '.join(self.options)})")
        self.validate_with, self.copy_at_end = validate_with, copy_at_end
        self.checkpoint_with = checkpoint_with
        self._kept: dict[str, Tensor] | None = None  # the module's weights while swapped
        self._swap: contextlib.ExitStack | None = None  # a sharded average's swap, likewise
        self._token_losses = False  # the outputs being scored are a language model's losses
        self.evaluate = evaluate
        self.input_fn, self.target_fn = input_fn, target_fn
        self.metrics_fn = metrics_fn or task_metrics
        self.swag_seed = swag_seed
        self.snapshot_every, self.snapshot_unit = snapshot_every, snapshot_unit
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.averages: dict[str, Average] = {}
        self.plan: AveragingPlan | None = None
        self.last_step = self.last_epoch = 0
        self.snapshots: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._bn_done: dict[str, int] = {}  # n_averaged at each average's last BN pass
        self._train: list[Any] = []

    # -- building --------------------------------------------------------------------------

    def _method(self, name: str) -> tuple[str, dict[str, Any]]:
        """An average's method (its ``method`` option, else its name) and other options."""
        opts = dict(self.options[name] or {})
        return str(opts.pop("method", name)), opts

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(getattr(trainer, "strategy", None), FSDPStrategy):  # flat params, no DTensors
            raise ValueError("AveragingCallback: Lightning's FSDPStrategy (FSDP1) is not "
                             "supported; use ModelParallelStrategy with fully_shard in the "
                             "module's configure_model (FSDP2)")
        # After the strategy moved the module to its device: the averages live there too.
        if not self.averages:
            self.averages = {}
            for name in self.options:
                method, opts = self._method(name)
                self.averages[name] = make_average(method, pl_module, **opts)
            self.profiles = {w: make_average("power_ema", pl_module, sigma_rel=w,
                                             bn_update=False) for w in self.widths}
        if self._pending is not None:  # a checkpoint's state, loaded before the averages
            self._restore(self._pending)
            self._pending = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs, per_epoch = self._budget(trainer, pl_module)
        self.plan = make_plan(epochs=epochs, iters_per_epoch=per_epoch, **self.plan_args)
        self._train = _loaders(trainer.train_dataloader)  # for BN passes at test, after fit

    def _budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
        """(epochs, optimizer steps an epoch) of the plan. Lightning steps the optimizer after
        every ``accumulate_grad_batches``-th batch and after an epoch's last one, and counts
        those steps in ``global_step``, which the updates follow."""
        batches = trainer.num_training_batches
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        max_steps = int(trainer.max_steps) if trainer.max_steps is not None else -1
        max_epochs = int(trainer.max_epochs) if trainer.max_epochs is not None else -1
        unit = self.plan_args["unit"]
        if not math.isfinite(batches):  # an unsized (iterable) loader
            if max_steps < 1 or unit != "iter" or (self.snapshot_every
                                                   and self.snapshot_unit != "iter"):
                raise ValueError("AveragingCallback: the training loader has no length, so an "
                                 "epoch's steps are unknown: give Trainer(max_steps=N) and "
                                 "unit='iter' (and snapshot_unit='iter')")
            if self.bn_batches is None and any(not _sharded(a) and has_batch_norm(a.module)
                                               for a in self.averages.values()):
                raise ValueError("AveragingCallback: the model has batch norm and the training "
                                 "loader no length: give bn_batches=N (training batches per BN "
                                 "pass of an average)")
            return 1, max_steps
        per_epoch = math.ceil(int(batches) / accumulate)
        if per_epoch < 1:
            raise ValueError("AveragingCallback: the training loader is empty")
        if max_epochs < 1 and max_steps < 1:
            raise ValueError("AveragingCallback needs Trainer(max_epochs=N) or "
                             "Trainer(max_steps=N): the plan is a function of the budget")
        if max_epochs >= 1 and not 0 < max_steps < max_epochs * per_epoch:
            return max_epochs, per_epoch
        # max_steps ends the fit (first)
        return (1, max_steps) if unit == "iter" else (max(1, max_steps // per_epoch), per_epoch)

    # -- updates ---------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)  # optimizer steps so far
        if self.plan is None or step <= self.last_step:
            return
        self.last_step = step
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches  # never when unsized
        epoch = trainer.current_epoch + 1  # counted from 1, as the framework's plans
        self.last_epoch = epoch
        # The epoch's update comes with its last batch: before the validation that ends it.
        if self.plan.due_after_iter(step) or (last_of_epoch and self.plan.due_after_epoch(epoch)):
            for average in self.averages.values():
                average.update(pl_module)
        if self.snapshot_every and (
                (self.snapshot_unit == "iter" and step % self.snapshot_every == 0)
                or (self.snapshot_unit == "epoch" and last_of_epoch
                    and epoch % self.snapshot_every == 0)):
            self._save_snapshot(trainer, pl_module, step, epoch)
        for profile in self.profiles.values():  # the step-th point: the profile's time
            profile.update(pl_module)
        if self.profiles and step % self.posthoc_every == 0:
            self._save_profiles(trainer, step, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The profiles after the last step, unless saved there already."""
        if self.profiles and self.last_step and (
                not self.profile_saves or self.profile_saves[-1]["iteration"] < self.last_step):
            self._save_profiles(trainer, self.last_step, self.last_epoch)

    # -- evaluation ------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                  ) -> None:
        """``validate_with``: the module validates with that average's weights (fresh BN
        statistics), as Lightning's ``WeightAveraging``; its own come back after."""
        name = self.validate_with
        if name is None or trainer.sanity_checking or self.averages[name].n_averaged == 0:
            return
        average = self.averages[name]
        if _sharded(average):  # FSDP: the average's shards swapped into the module's
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(average.swapped())  # type: ignore[attr-defined]
            return
        self._prepare(trainer, name, average)
        self._kept = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(average.module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``copy_at_end``: the module keeps that average's weights (fresh BN statistics) after
        ``fit``, as ``WeightAveraging`` and ``StochasticWeightAveraging`` do."""
        name = self.copy_at_end
        if name is None or self.averages[name].n_averaged == 0:
            return
        if _sharded(self.averages[name]):
            copy_into_model(self.averages[name])
            return
        self._prepare(trainer, name, self.averages[name])
        pl_module.load_state_dict(self.averages[name].module.state_dict())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                ) -> None:
        if self._kept is not None:  # the module's own weights back (validate_with)
            pl_module.load_state_dict(self._kept)
            self._kept = None
        if self._swap is not None:  # the same, of a sharded average
            self._swap.close()
            self._swap = None
        if not self.evaluate or trainer.sanity_checking:
            return
        self._score(trainer, pl_module, "val", _loaders(trainer.val_dataloaders))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._score(trainer, pl_module, "test", _loaders(trainer.test_dataloaders))

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str,
               loaders: list[Any]) -> None:
        if not loaders:
            return
        for name, average in self.averages.items():
            if average.n_averaged == 0:
                continue
            if isinstance(average, SWAG):
                if split != "test":
                    continue  # SWAG's BMA costs samples x (a BN pass + the set): at test only
                outputs, targets = self._swag_outputs(trainer, average, loaders)
            elif _sharded(average):  # through the sharded module (no BN under FSDP)
                outputs, targets = self._outputs(trainer, average, loaders)
            else:
                self._prepare(trainer, name, average)
                outputs, targets = self._outputs(trainer, average.module, loaders)
            if outputs is None:
                continue
            metrics = (token_metrics(outputs, targets) if self._token_losses
                       else self.metrics_fn(outputs, targets))
            self._token_losses = False
            for key, value in metrics.items():
                pl_module.log(f"{name}/{split}_{key}", float(value), sync_dist=False,
                              rank_zero_only=False)

    def _batches(self, trainer: pl.Trainer, loaders: Iterable[Any]) -> Iterable[Any]:
        for loader in loaders:
            for batch in loader:
                yield trainer.strategy.batch_to_device(batch)

    def _bn_pass(self, trainer: pl.Trainer, loaders: Iterable[Any]) -> Iterable[Any]:
        """The training batches of one BN pass: all of them, or the first ``bn_batches``."""
        batches = self._batches(trainer, loaders)
        return batches if self.bn_batches is None else itertools.islice(batches, self.bn_batches)

    def _prepare(self, trainer: pl.Trainer, name: str, average: Average) -> None:
        """Fresh BN statistics once per change of the average (a sample-weighted pass over this
        rank's training batches, then the mean over the ranks). The training loader is the
        fit's (also at ``trainer.test`` after it)."""
        module = average.module
        train = _loaders(trainer.train_dataloader) or self._train
        if not has_batch_norm(module) or not train \
                or self._bn_done.get(name) == average.n_averaged:
            return
        bn_update(self._bn_pass(trainer, train), module, self.input_fn)
        self._bn_done[name] = average.n_averaged
        if trainer.world_size > 1:
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    buffer.copy_(trainer.strategy.reduce(buffer.clone(), reduce_op="mean"))

    def _outputs(self, trainer: pl.Trainer, module: torch.nn.Module | Average,
                 loaders: list[Any]) -> tuple[Tensor | None, Tensor | None]:
        self._token_losses = False
        reduce = self._per_token if self.metrics_fn is task_metrics else None
        outputs, targets = predict(module, self._batches(trainer, loaders), self.input_fn,
                                   self.target_fn, output_fn=reduce)
        if not len(outputs) or targets is None:
            return None, None
        device = trainer.strategy.root_device  # NCCL gathers device tensors
        return self._gather(trainer, outputs.to(device), targets.to(device))

    def _per_token(self, logits: Tensor, batch: Any) -> Tensor:
        """A language model's logits [B, T, V] kept as their per-token losses [B, T] (a whole
        set's logits would not fit in memory); a classifier's as they are."""
        if logits.ndim != 3:
            return logits
        self._token_losses = True
        targets = self.target_fn(batch)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device),
                               ignore_index=-1, reduction="none").view(targets.shape)

    def _swag_outputs(self, trainer: pl.Trainer, average: SWAG, loaders: list[Any]
                      ) -> tuple[Tensor | None, Tensor | None]:
        def inputs() -> Iterable[Tensor]:
            return (self.input_fn(b) for b in self._batches(trainer, loaders))

        train = _loaders(trainer.train_dataloader) or self._train

        def bn() -> Iterable[Tensor]:
            return (self.input_fn(b) for b in self._bn_pass(trainer, train))

        probs = average.bma({"set": inputs}, bn if train else None, self.swag_seed).get("set")
        if probs is None:
            return None, None
        targets = torch.cat([self.target_fn(b) for b in self._batches(trainer, loaders)])
        return self._gather(trainer, probs.clamp_min(1e-40).log().float(), targets)

    @staticmethod
    def _gather(trainer: pl.Trainer, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The whole set's outputs on every rank (a DistributedSampler pads the shards to equal
        length by repeating a few samples: they count twice, as in Lightning's own metrics)."""
        if trainer.world_size > 1:
            outputs = trainer.strategy.all_gather(outputs).flatten(0, 1)
            targets = trainer.strategy.all_gather(targets).flatten(0, 1)
        return outputs.cpu(), targets.cpu()

    # -- snapshots and checkpoints ---------------------------------------------------------

    def _save_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                       epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        folder = self.snapshot_dir or Path(trainer.default_root_dir) / "trajectory"
        self.snapshots.append(_write_snapshot(folder, snapshot(pl_module), step, epoch))
        self._write_index(folder, self.snapshot_unit, self.snapshot_every, self.snapshots)

    def _save_profiles(self, trainer: pl.Trainer, step: int, epoch: int) -> None:
        """Each profile's weights after ``step`` (a sharded one gathered whole, every rank
        taking part), written by rank 0."""
        base = self.posthoc_dir or Path(trainer.default_root_dir) / "posthoc_ema"
        self.profile_saves.append({"iteration": step, "epoch": epoch,
                                   "file": f"it{step:06d}.pt"})
        for w, profile in self.profiles.items():
            state = profile.full_state_dict() if _sharded(profile) else snapshot(profile.module)
            if trainer.is_global_zero:
                folder = base / f"sigma_rel_{w:g}"
                _write_snapshot(folder, state, step, epoch)
                self._write_index(folder, "iter", self.posthoc_every, self.profile_saves)

    def _write_index(self, folder: Path, unit: str, every: int,
                     entries: list[dict[str, Any]]) -> None:
        index = {"unit": unit, "every": every, "dtype": "fp32",
                 "iters_per_epoch": self.plan.iters_per_epoch if self.plan else None,
                 "snapshots": entries}
        tmp = folder / ".index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        tmp.replace(folder / "index.json")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """``checkpoint_with``: the checkpoint's ``state_dict`` is that average's (fresh BN
        statistics), the module's own under ``current_model_state``, as ``WeightAveraging``
        saves them: the file then loads as the averaged model."""
        name = self.checkpoint_with
        if name is None or self.averages[name].n_averaged == 0:
            return
        average = self.averages[name]
        if _sharded(average):
            raise ValueError("checkpoint_with: a sharded average's weights are in the "
                             "callback's state; Lightning's sharded state_dict holds the module")
        self._prepare(trainer, name, average)
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v.detach().clone()
                                    for k, v in average.module.state_dict().items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A ``checkpoint_with`` checkpoint resumes the module's own weights (Lightning has
        just loaded the average's from ``state_dict``)."""
        if "current_model_state" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])

    def state_dict(self) -> dict[str, Any]:
        return {"averages": {n: _whole_state(a) if _sharded(a) else a.state_dict()
                             for n, a in self.averages.items()},
                "profiles": {f"{w:g}": _whole_state(p) if _sharded(p) else p.state_dict()
                             for w, p in self.profiles.items()},
                "profile_saves": list(self.profile_saves), "last_epoch": self.last_epoch,
                "last_step": self.last_step, "snapshots": list(self.snapshots)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.averages:
            self._restore(state_dict)
        else:  # before on_fit_start built the averages
            self._pending = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        saved = state.get("averages", {})
        if set(saved) != set(self.averages):
            raise ValueError(f"the checkpoint holds the averages {sorted(saved)}, this "
                             f"callback keeps {sorted(self.averages)}")
        for name, average in self.averages.items():
            if _sharded(average):
                _load_whole_state(average, saved[name])
            else:
                average.load_state_dict(saved[name])
        profiles = state.get("profiles", {})
        if set(profiles) != {f"{w:g}" for w in self.profiles}:
            raise ValueError(f"the checkpoint holds post-hoc EMA profiles of sigma_rel "
                             f"{sorted(profiles)}, this callback keeps "
                             f"{sorted(f'{w:g}' for w in self.profiles)}; a profile's time counts "
                             "the steps from the first, so one cannot start midway")
        for w, profile in self.profiles.items():
            if _sharded(profile):
                _load_whole_state(profile, profiles[f"{w:g}"])
            else:
                profile.load_state_dict(profiles[f"{w:g}"])
        self.profile_saves = list(state.get("profile_saves", []))
        self.last_step = int(state.get("last_step", 0))
        self.last_epoch = int(state.get("last_epoch", 0))
        self.snapshots = list(state.get("snapshots", []))
