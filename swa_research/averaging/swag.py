"""SWAG: a Gaussian posterior over the weights fitted to the SGD iterates (Maddox et al., 2019,
"A Simple Baseline for Bayesian Uncertainty in Deep Learning"; code: wjmaddox/swa_gaussian).

At each averaging point of the plan (the same points as SWA) the average takes the iterate w
into a running mean and a running mean of squares, and (``swag``, not ``swag_diag``) keeps the
deviation of w from the mean *after* the update in a ring buffer of the last K =
``swa.max_models`` deviations: ``SWAG.collect_model`` in ``swag/posteriors/swag.py``, where the
mean is ``mean * n / (n + 1) + w / (n + 1)``, the second moment likewise with ``w ** 2``, and the
deviation ``w - mean`` is appended as a row of ``cov_mat_sqrt``, the oldest row dropped once
there are more than ``max_num_models``.

A sample follows ``SWAG.sample_fullrank`` of the same file:

    var = clamp(sq_mean - mean ** 2, var_clamp)          (var_clamp = 1e-30, SWAG.__init__)
    z1 ~ N(0, I_P), z2 ~ N(0, I_k)                        (k: the deviations stored, <= K)
    w = mean + sqrt(scale) * (sqrt(var) * z1 + D^T z2 / sqrt(K - 1))

with D the k x P matrix of stored deviations, oldest first, and K the buffer's capacity (the
reference divides by ``max_num_models - 1`` also while fewer than K deviations are stored).
z1 is drawn parameter by parameter (one ``randn`` per parameter, in ``parameters()`` order, where
the reference draws one vector): the same distribution, and the same numbers for a model sharded
with FSDP, whose ranks each keep their slice of every parameter's draw (:mod:`.sharded_swag`).
``swag_diag`` draws ``mean + sqrt(scale) * sqrt(var) * z1`` only (``cov=False``). Each method
has its own scale, as in the reference's uncertainty experiments
(``experiments/uncertainty/README.md``): 0.5 for SWAG (``swa.swag_scale``; the paper's 1/2 of
Sigma_diag + Sigma_lowrank) and 1.0 for SWAG-Diagonal (``swa.swag_diag_scale``).

An evaluation is Bayesian model averaging as ``experiments/uncertainty/uncertainty.py`` does
it: for each of ``swa.samples`` (the reference's ``--N``, 30) samples, the weights are loaded
into a working network, its BN statistics are recomputed over the training data
(``utils.bn_update``), and the softmax probabilities of the whole sets are accumulated; the
prediction is their mean. The samples come from a generator seeded per evaluation.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import (
    Average,
    Batches,
    EvalSet,
    bn_update,
    has_batch_norm,
)

log = logging.getLogger(__name__)

VAR_CLAMP = 1e-30  # swa_gaussian swag/posteriors/swag.py, SWAG.__init__(var_clamp=1e-30)


def flat_parameters(model: nn.Module, device: torch.device) -> Tensor:
    """The model's parameters as one float32 vector on ``device``, in ``parameters()`` order."""
    return torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float32)
                      for p in model.parameters()])


@torch.no_grad()
def load_flat(model: nn.Module, flat: Tensor) -> None:
    """Copy a vector of :func:`flat_parameters`'s layout into the model's parameters."""
    params = list(model.parameters())
    if flat.numel() != sum(p.numel() for p in params):
        raise ValueError(f"a vector of {flat.numel()} weights does not fit a model of "
                         f"{sum(p.numel() for p in params)} parameters")
    pieces = torch.split(flat, [p.numel() for p in params])
    for p, piece in zip(params, pieces, strict=True):
        p.copy_(piece.view_as(p))


def resolve_swag_device(name: str, model: nn.Module) -> torch.device:
    """``device``: auto is the device of the model's parameters (the training device)."""
    if name == "auto":
        return next(model.parameters()).device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name}: no CUDA GPU is available here; use auto or cpu")
    return torch.device(name)


def check_swag_options(*, max_models: int = 20, scale: float | None = None, samples: int = 30,
                       device: str = "auto", eval_every: int = 0, **_: Any) -> None:
    """SWAG's and SWAG-Diagonal's options: a one-line ValueError in the arguments' names."""
    def whole(name: str, value: Any, least: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r}: must be a whole number of at least {least}")

    # The low-rank part divides by sqrt(max_models - 1) (swa_gaussian's SWAG.sample_fullrank).
    whole("max_models", max_models, 2)
    whole("samples", samples, 1)
    whole("eval_every", eval_every, 0)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not (math.isfinite(scale) and 0 <= scale <= 100)):
        raise ValueError(f"scale={scale}: must be a number in [0, 100] (the sample variance's "
                         "factor; swa_gaussian uses 0.5 for SWAG, 1.0 for SWAG-Diagonal)")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda")
                                           or device.startswith("cuda:")):
        raise ValueError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: the GPU's free memory, or the host's
    available memory (MemAvailable; the cgroup limit where lower)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = min(available, int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return available


def check_memory(method: str, numel: int, rows: int, device: torch.device,
                 available: int | None = None) -> None:
    """The moments (2 x P floats), the deviation buffer (K x P) and a sample's working vectors
    (2 x P) must fit in ``device``'s free memory: a ValueError before anything is allocated
    (max_models=100000000 once asked for 40 TB)."""
    need = (4 + rows) * numel * 4
    free = available_bytes(device) if available is None else available
    if need > free:
        key = f"max_models={rows}" if rows else f"device={device}"
        raise ValueError(
            f"{key}: {method} needs {need / 2**30:,.1f} GiB on {device} ({rows} deviations "
            f"and 4 vectors of {numel:,} float32 weights), {free / 2**30:,.1f} GiB are free; "
            "lower max_models" + (", or keep the posterior in host memory (device=cpu)"
                                  if device.type != "cpu" else ""))


def class_logits(out: Tensor, method: str) -> Tensor:
    """A classifier's logits [N, C] as float32; any other shape (a language model's [N, T, V])
    is refused: the Bayesian model average averages class probabilities per example."""
    if out.ndim != 2:
        raise ValueError(f"{method}: the Bayesian model average takes a classifier's logits "
                         f"[N, C]; the model gave {tuple(out.shape)}")
    return out.float()


class SWAG(Average):
    """SWAG with the low-rank plus diagonal covariance (``swa.also=[swag]``); see the module
    docstring for the reference lines followed."""

    method = "swag"
    low_rank = True
    default_scale = 0.5  # swa_gaussian's sample variance factor for SWAG (1.0: diagonal)
    check = staticmethod(check_swag_options)

    def __init__(self, model: nn.Module, *, max_models: int = 20, scale: float | None = None,
                 samples: int = 30, device: str = "auto", eval_every: int = 0,
                 bn_update: bool = True) -> None:
        """``max_models`` deviations (the low-rank part), samples drawn with variance ``scale``
        (None: 0.5, or 1.0 for SWAG-Diagonal), ``samples`` networks per Bayesian model average
        at every ``eval_every``-th evaluation (0: the final one), the moments on ``device``
        (auto: the model's)."""
        check_swag_options(max_models=max_models, scale=scale, samples=samples, device=device,
                           eval_every=eval_every)
        self.device = resolve_swag_device(device, model)
        self.scale = float(self.default_scale if scale is None else scale)
        self.samples = int(samples)
        self.max_models = int(max_models)
        self.eval_every = int(eval_every)
        self.bn_update = bn_update and has_batch_norm(model)
        # The working network: the mean's weights between evaluations, a sample during one.
        self.net = copy.deepcopy(model)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.sizes = [p.numel() for p in model.parameters()]
        self.numel = sum(self.sizes)
        check_memory(self.method, self.numel, self.max_models if self.low_rank else 0,
                     self.device)
        self.count = 0
        self.mean = torch.zeros(self.numel, device=self.device)
        self.sq_mean = torch.zeros(self.numel, device=self.device)
        self.position = 0  # the buffer's row the next deviation goes into
        self.filled = 0  # rows holding a deviation (min(count, K))
        self.buffer = (torch.zeros(self.max_models, self.numel, device=self.device)
                       if self.low_rank else None)
        mb = self.numel * 4 / 2**20
        if self.buffer is not None:
            log.info("%s: a buffer of %d deviations x %s parameters in float32 costs %.1f MiB "
                     "on %s (+ %.1f MiB for the mean and the mean of squares)", self.method,
                     self.max_models, f"{self.numel:,}", self.buffer_mb, self.device, 2 * mb)
        else:
            log.info("%s: the mean and the mean of squares of %s parameters cost %.1f MiB on %s",
                     self.method, f"{self.numel:,}", 2 * mb, self.device)

    # -- the moments -----------------------------------------------------------------------
    @property
    def buffer_mb(self) -> float:
        """What the deviation buffer costs: parameters x 4 bytes x K, in MiB (0 for diag)."""
        return 0.0 if self.buffer is None else self.buffer.numel() * 4 / 2**20

    @property
    def n_averaged(self) -> int:
        return self.count

    @property
    def module(self) -> nn.Module:
        return self.net

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``SWAG.collect_model``: first and second moments, then the deviation from the
        updated mean into the ring buffer."""
        w = self._flat(model)
        n = float(self.count)
        # As written there: mean * n / (n + 1) + w / (n + 1), evaluated left to right.
        self.mean.mul_(n).div_(n + 1.0).add_(w / (n + 1.0))
        self.sq_mean.mul_(n).div_(n + 1.0).add_(w ** 2 / (n + 1.0))
        if self.buffer is not None:
            self.buffer[self.position].copy_(w - self.mean)
            self.position = (self.position + 1) % self.max_models
            self.filled = min(self.filled + 1, self.max_models)
        self.count += 1
        self._keep_mean(model)

    def _keep_mean(self, model: nn.Module) -> None:
        """The saved network (swag.pt's state dict): the mean, with the model's buffers (BN
        statistics) at this point, as the SWA average copies them."""
        load_flat(self.net, self.mean)
        for mine, theirs in zip(self.net.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def _flat(self, model: nn.Module) -> Tensor:
        """The model's weights as the moments' vector (here: all of them)."""
        return flat_parameters(model, self.device)

    def _z1(self, generator: torch.Generator) -> Tensor:
        """The diagonal part's standard normal draws: parameter by parameter, in
        ``parameters()`` order, so that a sharded SWAG (each rank its slice of every
        parameter's draw) samples the same weights for the same seed."""
        return torch.cat([torch.randn(n, generator=generator, device=self.device)
                          for n in self.sizes])

    def _network(self) -> nn.Module:
        """The network a sample is evaluated in (:meth:`bma`)."""
        return self.net

    def _put(self, flat: Tensor) -> None:
        """A weight vector of the moments' layout into :meth:`_network`."""
        load_flat(self.net, flat)

    def variance(self) -> Tensor:
        """The diagonal variance, clamped as the reference does: clamp(sq_mean - mean^2)."""
        return torch.clamp(self.sq_mean - self.mean ** 2, VAR_CLAMP)

    def deviations(self) -> Tensor:
        """The stored deviations [k, P], oldest first (the reference's ``cov_mat_sqrt``)."""
        if self.buffer is None:
            return torch.zeros(0, self.numel, device=self.device)
        rows = self.buffer[:self.filled]
        return torch.roll(rows, -self.position, dims=0) if self.filled else rows

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Tensor:
        """One weight vector drawn as ``SWAG.sample_fullrank(scale, cov)`` draws it: z1 over
        the P weights first (:meth:`_z1`), then z2 over the k stored deviations."""
        if self.count == 0:
            raise RuntimeError(f"{self.method}: nothing to sample before the first update")
        var = self.variance()
        rand = var.sqrt() * self._z1(generator)
        if self.buffer is not None and self.filled:
            z2 = torch.randn(self.filled, generator=generator, device=self.device)
            # Row j of the chronological D is buffer row (position + j) % k: D^T z2 equals
            # buffer^T roll(z2, position) (a roll by a multiple of k is the identity).
            rows = self.buffer[:self.filled]
            cov = torch.roll(z2, self.position) @ rows
            rand += cov / math.sqrt(self.max_models - 1)
        return self.mean + math.sqrt(self.scale) * rand

    # -- evaluation ------------------------------------------------------------------------
    def eval_due(self, evaluation: int, final: bool) -> bool:
        """At the final evaluation, and at every ``swa.swag_eval_every``-th one if set."""
        return final or (self.eval_every > 0 and evaluation % self.eval_every == 0)

    @torch.no_grad()
    def bma(self, sets: dict[str, Callable[[], Iterable[Tensor]]],
            bn_batches: Callable[[], Iterable[Any]] | None, seed: int,
            labels: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The Bayesian model average of ``samples`` samples (float64 class probabilities
        [N, C] per set), as ``experiments/uncertainty/uncertainty.py``: sample, BN statistics
        recomputed over ``bn_batches()`` (a fresh pass each call; skipped when None or without
        BN), softmax of the predictions summed over the samples, divided by their number.
        ``sets`` maps a name to a function giving a fresh pass of model inputs in a fixed
        order; ``labels`` (optional) only serve the progress line."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        sums: dict[str, Tensor] = {}
        net = self._network()
        buffers = [b.clone() for b in net.buffers()]
        was_training = net.training
        try:
            for i in range(self.samples):
                t0 = time.perf_counter()
                self._put(self.sample(generator))
                if self.bn_update and bn_batches is not None:
                    bn_update(bn_batches(), net)
                net.eval()
                accs = []
                for name, inputs in sets.items():
                    parts = [torch.softmax(class_logits(net(x), self.method), dim=1).double()
                             for x in inputs()]
                    if not parts:
                        continue
                    probs = torch.cat(parts)
                    sums[name] = probs if name not in sums else sums[name].add_(probs)
                    if labels is not None and name in labels:
                        hit = (sums[name].argmax(1) == labels[name].to(sums[name].device)
                               ).double().mean()
                        accs.append(f"{name} {100 * hit.item():.2f}%")
                log.info("%s: sample %d/%d (%s) in %.1fs; BMA accuracy so far: %s", self.method,
                         i + 1, self.samples, "BN recomputed" if self.bn_update else "no BN",
                         time.perf_counter() - t0, ", ".join(accs) or "-")
        finally:
            self._put(self.mean)
            for mine, kept in zip(net.buffers(), buffers, strict=True):
                mine.copy_(kept)
            net.train(was_training)
        return {name: s / self.samples for name, s in sums.items()}

    def collect_probs(self, sets: dict[str, EvalSet], bn_batches: Callable[[], Batches],
                      seed: int) -> dict[str, Tensor]:
        """:meth:`bma` over whole sets (their inputs, in order)."""
        sets = {k: v for k, v in sets.items() if v.size}
        return self.bma({name: s.inputs for name, s in sets.items()}, bn_batches, seed,
                        labels={name: s.labels for name, s in sets.items()
                                if s.labels is not None})

    # -- checkpoints and the saved file ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Mean, mean of squares, the stored deviations in buffer order, the ring position and
        the count: a resume continues bit for bit. Only the filled rows are kept."""
        rows = None
        if self.buffer is not None:
            # A slice would be saved with its whole storage: copy a partial buffer.
            rows = self.buffer if self.filled == self.max_models else \
                self.buffer[:self.filled].clone()
        return {"count": self.count, "mean": self.mean, "sq_mean": self.sq_mean,
                "deviations": rows, "position": self.position, "filled": self.filled,
                "max_models": self.max_models,
                "net_buffers": {k: v for k, v in self.net.named_buffers()},
                "identity": self.identity()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        if state["mean"].shape != self.mean.shape:
            raise ValueError(f"{self.method}: the checkpoint's mean holds "
                             f"{state['mean'].numel()} weights, this model "
                             f"{self.numel}")
        if (state["deviations"] is None) != (self.buffer is None) or (
                self.buffer is not None and state["max_models"] != self.max_models):
            raise ValueError(f"{self.method}: the checkpoint's deviation buffer (max_models="
                             f"{state['max_models']}) does not fit this run's "
                             f"(swa.max_models={self.max_models})")
        self.mean.copy_(state["mean"])
        self.sq_mean.copy_(state["sq_mean"])
        self.count, self.position = int(state["count"]), int(state["position"])
        self.filled = int(state["filled"])
        if self.buffer is not None:
            self.buffer.zero_()
            self.buffer[:self.filled].copy_(state["deviations"])
        load_flat(self.net, self.mean)
        mine = dict(self.net.named_buffers())
        for k, v in state["net_buffers"].items():
            mine[k].copy_(v)

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scale": self.scale, "samples": self.samples}
        if self.buffer is not None:
            out["max_models"] = self.max_models
        return out

    def export(self) -> dict[str, Any]:
        """swag.pt: besides the mean's state dict, the posterior to draw samples from."""
        return {"swag": {"mean": self.mean.cpu(), "sq_mean": self.sq_mean.cpu(),
                         "deviations": self.deviations().cpu(), "max_models": self.max_models,
                         "scale": self.scale, "var_clamp": VAR_CLAMP,
                         "low_rank": self.buffer is not None}}


class SWAGDiag(SWAG):
    """SWAG-Diagonal (``swa.also=[swag_diag]``): the reference's ``no_cov_mat=True``; samples
    have no low-rank part."""

    method = "swag_diag"
    low_rank = False
    default_scale = 1.0
