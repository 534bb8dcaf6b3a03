"""The training step and what makes it fast: mixed precision (autocast, a gradient scaler for
fp16), the channels-last memory format and torch.compile.

Nothing here reads a device tensor on the host, so a loop of steps queues work on a GPU without
waiting for it. fp16's GradScaler checks the gradients for inf/NaN: with the fused optimizers
that ``optim.build_optimizer`` makes, the check stays on the device (the optimizer skips the
step itself); with another optimizer ``GradScaler.step`` reads it on the host at every step.
bf16 needs no scaler.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swa_research.config import UserError

log = logging.getLogger(__name__)

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# CPU features that compute bf16 / fp16 matmuls in hardware (/proc/cpuinfo's names), and the
# torch.cpu probes for them where torch has one.
_NATIVE_CPU_FLAGS = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}
_NATIVE_CPU_PROBES = {"bf16": ("_is_amx_tile_supported", "_is_avx512_bf16_supported"),
                      "fp16": ("_is_amx_fp16_supported",)}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_has_native(precision: str) -> bool:
    """Whether this CPU multiplies in ``precision`` (bf16, fp16) in hardware: AMX or AVX-512's
    bf16/fp16 instructions. Without them oneDNN emulates the type, and a bf16 matmul runs at
    about 1% of fp32's speed (docs/speed.md)."""
    if precision == "fp32":
        return True
    if any(flag in _cpu_flags() for flag in _NATIVE_CPU_FLAGS.get(precision, ())):
        return True
    for name in _NATIVE_CPU_PROBES.get(precision, ()):
        probe = getattr(torch.cpu, name, None)
        if probe is not None and probe():
            return True
    return False


@functools.cache
def _warn_emulated(precision: str) -> None:
    log.warning("trainer.precision=%s on a CPU without native %s (AMX or AVX-512 %s): "
                "autocast emulates it, tens of times slower than fp32; use "
                "trainer.precision=fp32 (or auto) here", precision, precision, precision)


def resolve_precision(name: str, device: torch.device) -> str:
    """``trainer.precision`` for this device: auto is bf16 on CUDA (fp16 on a GPU without
    bf16) and fp32 on a CPU, where autocast gains only with native bf16 (AMX, AVX512-BF16)."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name not in AUTOCAST_DTYPES:
        raise UserError(f"trainer.precision={name!r}: expected one of auto, "
                        f"{', '.join(AUTOCAST_DTYPES)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("trainer.precision=bf16: this GPU has no bf16 support; use fp16")
    if device.type == "cpu" and not cpu_has_native(name):
        _warn_emulated(name)
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_in_place(model: nn.Module, mode: str) -> None:
    """``model.compile`` in ``trainer.compile_mode`` (``default`` is torch.compile's own)."""
    model.compile(mode=None if mode == "default" else mode)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class TrainStep:
    """forward, loss, backward, optimizer step; returns the detached loss and output.

    ``accumulate`` > 1: the batch in that many micro-batches, their gradients added (each loss
    weighted by its share of the batch, so the step is the whole batch's; under DDP the
    gradients are all-reduced once, at the last); the memory of a micro-batch, the step of the
    batch. ``grad_clip`` > 0: the gradients' global L2 norm clipped to it (after fp16's
    unscaling) before the step.

    Compile the model (``model.compile()``, in place) before or after building this: the step
    calls the module, so it runs whatever the module's forward is.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: str,
                 device: torch.device, loss: Callable[[Tensor, Tensor], Tensor] | None = None,
                 grad_clip: float = 0.0, accumulate: int = 1) -> None:
        self.model = model
        self.loss = loss or _cross_entropy  # the task's: (output, target) -> scalar mean
        self.optimizer = optimizer
        self.precision = precision
        self.device = device
        self.grad_clip, self.accumulate = grad_clip, accumulate
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def _forward_backward(self, x: Tensor, y: Tensor, weight: float = 1.0
                          ) -> tuple[Tensor, Tensor]:
        with autocast(self.precision, self.device):
            output = self.model(x)
        loss = self.loss(output, y)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        return loss.detach(), output.detach()

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.accumulate == 1:
            loss, output = self._forward_backward(x, y)
        else:
            n = y.shape[0]
            parts = list(zip(x.chunk(self.accumulate), y.chunk(self.accumulate), strict=True))
            no_sync = getattr(self.model, "no_sync", None)
            losses, outputs = [], []
            for j, (xc, yc) in enumerate(parts):
                last = j == len(parts) - 1
                with (no_sync() if no_sync is not None and not last
                      else contextlib.nullcontext()):
                    part_loss, part_out = self._forward_backward(xc, yc, yc.shape[0] / n)
                losses.append(part_loss * (yc.shape[0] / n))
                outputs.append(part_out)
            loss, output = torch.stack(losses).sum(), torch.cat(outputs)
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups
                                      for p in g["params"]], self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, output


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), target)
