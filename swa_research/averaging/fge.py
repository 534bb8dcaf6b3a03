"""FGE: Fast Geometric Ensembling (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and
Fast Ensembling of DNNs"; timgaripov/dnn-mode-connectivity fge.py). With ``schedule=fge`` the
learning rate cycles from the averaging start (``schedule.fge_cycle`` epochs per cycle, from
``schedule.fge_lr_high`` down to ``swa.lr`` and back); a copy of the model is collected at
each cycle's low point, and the ensemble predicts the mean of the collected models' softmax
probabilities. It averages predictions, not weights: it is the ensemble the SWA paper's one
averaged model is compared with (its Table 1's FGE column).

The members keep their own BN statistics (the reference evaluates them as trained). Their
probabilities of a set are summed as they are collected, so an evaluation runs only the members
collected since the last one; the sums are recomputed after a resume in the same order. At most
``swa.max_models`` members are kept (the latest); their memory is checked when the ensemble is
made, before training starts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging.base import Average, Batches, EvalSet
from swa_research.averaging.swag import available_bytes


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class FGE(Average):
    method = "fge"

    def __init__(self, model: nn.Module, *, max_models: int = 20,
                 available: int | None = None) -> None:
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
            raise ValueError(f"max_models={max_models!r}: FGE keeps at least 1 model")
        self.max_models = max_models
        need = self.max_models * state_bytes(model)
        device = next(iter(model.state_dict().values())).device
        free = available_bytes(device) if available is None else available
        if need > free:
            raise ValueError(f"max_models={self.max_models}: FGE keeps up to "
                            f"{self.max_models} copies of the model, {need / 2**30:,.1f} GiB on "
                            f"{device}, {free / 2**30:,.1f} GiB are free; lower max_models")
        self.net = copy.deepcopy(model).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.members: list[dict[str, Tensor]] = []
        self.collected = 0  # all members ever collected (the oldest leave past max_models)
        # set name -> (members summed, their probabilities' sum, the set's size)
        self._sums: dict[str, tuple[int, Tensor, int]] = {}

    @property
    def module(self) -> nn.Module:
        """The latest member (what ``fge.pt``'s state_dict holds; the members are beside it)."""
        return self.net

    @property
    def n_averaged(self) -> int:
        return len(self.members)

    def settings(self) -> dict[str, Any]:
        return {"members": len(self.members), "collected": self.collected,
                "max_models": self.max_models}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if len(self.members) == self.max_models:
            self.members.pop(0)
            self._sums.clear()  # the oldest left: sum again from the members kept
        self.members.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self._show(self.members[-1])
        self.collected += 1

    def _show(self, member: dict[str, Tensor]) -> None:
        """The working network holding ``member`` (the latest, between evaluations)."""
        self.net.load_state_dict(member)

    def _member_probs(self, member: dict[str, Tensor], batches: Iterable[Tensor]) -> Tensor:
        self.net.load_state_dict(member)
        self.net.eval()
        out = [torch.softmax(self.net(x).float(), dim=-1) for x in batches]
        return torch.cat(out)

    @torch.no_grad()
    def ensemble_probs(self, name: str, batches: Callable[[], Iterable[Tensor]], size: int
                       ) -> Tensor:
        """The members' mean probabilities [N, C] of the set ``name`` whose inputs
        ``batches()`` gives in order; members summed before are not run again."""
        done, total, n = self._sums.get(name, (0, None, size))
        if n != size:
            done, total = 0, None
        for member in self.members[done:]:
            probs = self._member_probs(member, batches())
            total = probs if total is None else total + probs
        self._sums[name] = (len(self.members), total, size)
        self._show(self.members[-1])
        return total / len(self.members)

    def collect_probs(self, sets: dict[str, EvalSet], bn_batches: Callable[[], Batches],
                      seed: int) -> dict[str, Tensor]:
        """The ensemble's probabilities of each set (its inputs, in order)."""
        return {name: self.ensemble_probs(name, s.inputs, s.size)
                for name, s in sets.items() if s.size}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The log of the members' mean probabilities of a batch (scored as logits)."""
        probs = sum(self._member_probs(m, [x]) for m in self.members) / len(self.members)
        self._show(self.members[-1])
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))

    def export(self) -> dict[str, Any]:
        return {"members": self.members}

    def state_dict(self) -> dict[str, Any]:
        return {"members": self.members, "collected": self.collected,
                "identity": self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        device = next(iter(self.net.state_dict().values())).device
        self.members = [{k: v.to(device) for k, v in m.items()} for m in state["members"]]
        self.collected = int(state["collected"])
        self._sums.clear()
        if self.members:
            self._show(self.members[-1])
