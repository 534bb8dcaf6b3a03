"""The FGE column of the SWA paper's Table 1 (Izmailov et al. 2018: "FGE (1 Budget)", test
accuracy %, one figure per cell, no std given) and the recipe of its runs, from
timgaripov/dnn-mode-connectivity README.md ("To reproduce the results from the paper"): train.py
over the budget (200 epochs), its checkpoint at epoch 160, then fge.py for the last 40 epochs
with cycles of 2 epochs from lr_1 down to lr_2 and back (VGG16 lr_1 = lr_2 = 0.01: a constant
lr; PreResNet164 and WideResNet28x10 0.05 and 0.01), a model collected at each cycle's middle:
20 models. The README gives the CIFAR-100 commands; the CIFAR-10 presets use the same values.
One run of ``experiment=paper_fge/<model>_<dataset>`` (schedule=fge, swa=fge) is that whole
procedure; its ``fge`` test accuracy is the cell.
"""

from __future__ import annotations

from typing import Any

FGE_SOURCE = ("the SWA paper's Table 1, FGE (1 Budget) column (no std published); recipe: "
              "timgaripov/dnn-mode-connectivity README.md")

# (model, dataset) -> the published FGE test accuracy, %.
FGE_PUBLISHED: dict[tuple[str, str], float] = {
    ("vgg16", "cifar10"): 93.52, ("preresnet164", "cifar10"): 95.45,
    ("wrn28x10", "cifar10"): 96.36, ("vgg16", "cifar100"): 74.26,
    ("preresnet164", "cifar100"): 79.84, ("wrn28x10", "cifar100"): 82.27,
}

FGE_EPOCHS, FGE_START, FGE_CYCLE = 200, 160, 2
# model -> (train.py --lr, --wd, fge.py --lr_1, --lr_2)
FGE_LRS: dict[str, tuple[float, float, float, float]] = {
    "vgg16": (0.05, 5e-4, 0.01, 0.01),
    "preresnet164": (0.1, 3e-4, 0.05, 0.01),
    "wrn28x10": (0.1, 5e-4, 0.05, 0.01),
}


def fge_preset(model: str, dataset: str) -> str:
    return f"paper_fge/{model}_{dataset}"


def fge_expected(model: str) -> dict[str, Any]:
    """The config values (command-line names) of an FGE run of ``model``'s recipe, beyond the
    data and model settings it shares with the SWA recipe."""
    lr, wd, lr_1, lr_2 = FGE_LRS[model]
    return {"optimizer.name": "sgd", "optimizer.lr": lr, "optimizer.momentum": 0.9,
            "optimizer.weight_decay": wd, "optimizer.nesterov": False,
            "schedule.name": "fge", "schedule.step_unit": "epoch",
            "schedule.decay_start": 0.5, "schedule.decay_end": 0.9,
            "schedule.final_ratio": 0.01, "schedule.fge_cycle": FGE_CYCLE,
            "schedule.fge_lr_high": lr_1, "swa.lr": lr_2, "swa.start": FGE_START,
            "swa.unit": "epoch", "trainer.epochs": FGE_EPOCHS}
