"""SWA and EMA in your own PyTorch loop, with swa_research's averaging library only (no Hydra,
no W&B, no data sets of the framework). Runs on a CPU in seconds:

    python examples/plain_loop.py

Your model, your data, your loop; the library adds an average built by name, a plan of when to
update it, the BN update over your batches and the metrics (docs/library.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from swa_research.averaging import (
    Average,
    AveragingPlan,
    classification_metrics,
    make_average,
    make_plan,
    predict,
    update_bn,
)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, epochs: Iterable[Batches],
          plan: AveragingPlan, averages: dict[str, Average],
          bn_batches: Callable[[], Batches]) -> None:
    """The user's loop: a step per batch, each average updated where the plan says; at the end
    the averages' BN statistics recomputed over one pass of the training batches."""
    step = 0
    for epoch, batches in enumerate(epochs, start=1):
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if plan.due_after_iter(step):
                for average in averages.values():
                    average.update(model)
        if plan.due_after_epoch(epoch):
            for average in averages.values():
                average.update(model)
    for average in averages.values():
        update_bn(average, bn_batches())


# -- everything below is the user's own setup: data, model, settings -------------------------

def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four noisy classes in 16 dimensions (each a fixed centre plus noise)."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 16, generator=g) * 2.0, y


def main() -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    x, y = blobs(2048, seed=1)
    x_test, y_test = blobs(1024, seed=2)
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    epochs, batch = 10, 64

    def loader(seed: int) -> Batches:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        return [(x[i], y[i]) for i in order.split(batch)]

    averages = {"swa": make_average("swa", model), "ema": make_average("ema", model, decay=0.9)}
    plan = make_plan(start=0.5, freq=1, unit="epoch", epochs=epochs,
                     iters_per_epoch=len(x) // batch)
    train(model, optimizer, (loader(e) for e in range(epochs)), plan, averages,
          bn_batches=lambda: loader(-1))
    test = [(x_test, y_test)]
    results = {"sgd": classification_metrics(*predict(model, test))}
    for name, average in averages.items():
        results[name] = classification_metrics(*predict(average, test))
        results[name]["n_averaged"] = average.n_averaged
    for name, r in results.items():
        print(f"{name:4s} test accuracy {100 * r['acc']:.2f}%  loss {r['loss']:.4f}  "
              f"NLL {r['nll']:.4f}  ECE {100 * r['ece']:.2f}%"
              + (f"  (n={r['n_averaged']})" if "n_averaged" in r else ""))
    return results


if __name__ == "__main__":
    main()
