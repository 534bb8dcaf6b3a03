"""Choose the EMA length after training (EDM2's post-hoc EMA, Karras et al. 2024) in your own
loop, with swa_research's averaging library only. Runs on a CPU in seconds:

    python examples/posthoc_ema.py

During training, two power-function EMAs (relative widths 0.05 and 0.10) take every step and
are saved every few steps; after training, the EMA of any width at any saved step is
reconstructed from the saved ones by least squares (``average_states(kind="posthoc_ema")``),
given its BN statistics, and scored: one run answers which EMA length is best. One width is
also tracked online, to show that the reconstruction gives it back (docs/posthoc.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swa_research.averaging import (
    average_states,
    classification_metrics,
    make_average,
    predict,
    update_bn,
)

WIDTHS = (0.05, 0.10)  # the tracked profiles: EDM2's pair
SAVE_EVERY = 20  # steps between saves of the profiles
CHECK = 0.07  # a width also tracked online, as a check of the reconstruction


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four noisy classes in 16 dimensions (each a fixed centre plus noise)."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 16, generator=g) * 2.0, y


def main() -> tuple[dict[float, dict[str, float]], dict[str, float]]:
    """The reconstructed widths' validation metrics, and the online EMA's of width CHECK."""
    torch.manual_seed(0)
    x, y = blobs(2048, seed=1)
    val = [blobs(1024, seed=2)]
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = 64

    def loader(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        return [(x[i], y[i]) for i in order.split(batch)]

    # bn_update=False: a profile is saved as it is; BN is recomputed for a reconstruction.
    profiles = {s: make_average("power_ema", model, sigma_rel=s, bn_update=False)
                for s in WIDTHS}
    online = make_average("power_ema", model, sigma_rel=CHECK)
    saved: list[tuple[float, int, dict[str, torch.Tensor]]] = []  # (width, step, weights)
    step = 0
    for epoch in range(10):
        model.train()
        for xb, yb in loader(epoch):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            online.update(model)
            for s, profile in profiles.items():
                profile.update(model)  # the step-th point: the profile's time is the step
                if step % SAVE_EVERY == 0:  # in a real run: torch.save to disk
                    saved.append((s, step, {k: v.detach().clone() for k, v in
                                            profile.module.state_dict().items()}))

    results = {}
    for s in (0.02, 0.03, 0.05, CHECK, 0.10, 0.15, 0.2):
        ema = average_states(model, [st for _, _, st in saved], kind="posthoc_ema",
                             times=[t for _, t, _ in saved], sigma_rels=[w for w, _, _ in saved],
                             sigma_rel=s)
        update_bn(ema, loader(-1))
        results[s] = classification_metrics(*predict(ema, val))
        print(f"post-hoc EMA sigma_rel={s:<5g} val loss {results[s]['loss']:.4f}  "
              f"accuracy {100 * results[s]['acc']:.2f}%")
    update_bn(online, loader(-1))
    check = classification_metrics(*predict(online, val))
    print(f"online EMA   sigma_rel={CHECK:<5g} val loss {check['loss']:.4f}  "
          f"accuracy {100 * check['acc']:.2f}%")
    best = min(results, key=lambda s: results[s]["loss"])
    print(f"best width by validation loss: sigma_rel={best:g} (from {len(saved)} saved "
          f"profiles, {step} steps)")
    return results, check


if __name__ == "__main__":
    main()
