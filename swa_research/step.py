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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swa_research.config import UserError

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class TrainStep:
    """forward, loss, backward, optimizer step; returns the detached loss and logits.

    Compile the model (``model.compile()``, in place) before or after building this: the step
    calls the module, so it runs whatever the module's forward is.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: str,
                 device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.precision, self.device):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()
