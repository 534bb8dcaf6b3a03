"""LAWA: latest weight averaging (Kaddour 2022; Sanyal et al. 2023, "Early Weight Averaging
meets High Learning Rates for LLM Pre-training"): the equal mean of the last ``swa.lawa_k``
checkpoints, taken every ``swa.freq`` units of the plan (from ``swa.start``), kept online. The
checkpoints live in a ring buffer on the model's device (k copies of the weights: checked
against the free memory before the first is taken); the average is recomputed from the
buffer at each update, so it is exactly the mean of the k latest points and nothing older.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import Average, Batches, bn_update, has_batch_norm
from swa_research.averaging.swag import available_bytes
from swa_research.errors import UserError


class LAWA(Average):
    method = "lawa"

    @staticmethod
    def check(*, lawa_k: int = 10, **_: Any) -> None:
        """The options' one-line ValueError, in the arguments' names."""
        if isinstance(lawa_k, bool) or not isinstance(lawa_k, int) or lawa_k < 1:
            raise ValueError(f"lawa_k={lawa_k}: must be a whole number of at least 1 "
                             "(checkpoints averaged)")

    def __init__(self, model: nn.Module, *, lawa_k: int = 10, bn_update: bool = True) -> None:
        """The mean of the latest ``lawa_k`` points (Sanyal et al. 2023)."""
        self.check(lawa_k=lawa_k)
        self.k = lawa_k
        self._module = copy.deepcopy(model).eval()
        for p in self._module.parameters():
            p.requires_grad_(False)
        self.bn_update = bn_update and has_batch_norm(model)
        self._bn_stale = False
        self.buffer: list[list[Tensor]] = []  # the latest k points' floating-point params
        self.updates = 0
        self._checked = False

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def n_averaged(self) -> int:
        return len(self.buffer)

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "updates": self.updates}

    def _check_memory(self, params: list[Tensor]) -> None:
        numel = sum(p.numel() for p in params)
        need = self.k * numel * params[0].element_size() if params else 0
        free = available_bytes(params[0].device) if params else need
        if need > free:
            raise UserError(f"lawa_k={self.k} (swa.lawa_k): LAWA keeps {self.k} copies of "
                            f"{numel:,} weights, {need / 2**30:,.1f} GiB on "
                            f"{params[0].device}, {free / 2**30:,.1f} GiB are free; lower it")
        self._checked = True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        if not self._checked:
            self._check_memory(params)
        if len(self.buffer) == self.k:  # reuse the oldest point's storage
            oldest = self.buffer.pop(0)
            torch._foreach_copy_(oldest, params)
            self.buffer.append(oldest)
        else:
            self.buffer.append([p.clone() for p in params])
        self.updates += 1
        mine = list(self._module.parameters())
        torch._foreach_copy_(mine, self.buffer[0])
        for point in self.buffer[1:]:
            torch._foreach_add_(mine, point)
        torch._foreach_div_(mine, float(len(self.buffer)))
        for b, src in zip(self._module.buffers(), model.buffers(), strict=True):
            b.copy_(src)  # BN statistics: the model's, recomputed before evaluation
        self._bn_stale = True

    def prepare_for_eval(self, batches: Batches) -> bool:
        if not (self.bn_update and self._bn_stale and self.buffer):
            return False
        bn_update(batches, self._module)
        self._bn_stale = False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"module": self._module.state_dict(), "buffer": self.buffer,
                "updates": self.updates, "bn_stale": self._bn_stale,
                "identity": self.identity()}

    def state_settings(self) -> dict[str, Any]:
        return {"k": self.k}

    def nbytes(self) -> int:
        ring = sum(t.numel() * t.element_size() for point in self.buffer for t in point)
        return super().nbytes() + ring

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._module.load_state_dict(state["module"])
        device = next(self._module.parameters()).device
        self.buffer = [[t.to(device) for t in point] for point in state["buffer"]]
        self.updates = int(state["updates"])
        self._bn_stale = bool(state["bn_stale"])
