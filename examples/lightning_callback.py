"""SWA, EMA and SWAG beside the model in a Lightning run, with swa_research's callback
(``pip install swa_research[lightning]``). Runs on a CPU in under a minute:

    python examples/lightning_callback.py

The LightningModule is the user's own; the callback adds the averages, their plan, their BN
update and their scores at every validation (``swa/val_acc``, ``ema/val_acc``, ...) through
Lightning's loggers, and SWAG's Bayesian model average at test.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swa_research.lightning import AveragingCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def _score(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"sgd/{split}_loss", F.cross_entropy(logits, y))
        self.log(f"sgd/{split}_acc", (logits.argmax(1) == y).float().mean())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self._score(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def blobs(n: int, seed: int) -> TensorDataset:
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, 16, generator=g) * 2.0, y)


def main(default_root_dir: str | None = None, devices: int = 1,
         strategy: str = "auto") -> dict[str, float]:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    train = DataLoader(blobs(2048, 1), batch_size=64, shuffle=True)
    val = DataLoader(blobs(512, 2), batch_size=256)
    test = DataLoader(blobs(1024, 3), batch_size=256)
    callback = AveragingCallback({"swa": {}, "ema": {"decay": 0.9}, "swag": {"samples": 5}},
                                 start=0.5, freq=1, unit="epoch")
    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", devices=devices, strategy=strategy,
                         callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=default_root_dir)
    model = Classifier()
    trainer.fit(model, train, val)
    trainer.test(model, test, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        for name in ("sgd", "swa", "ema", "swag"):
            print(f"{name:4s} test accuracy {100 * metrics[f'{name}/test_acc']:.2f}%  "
                  f"loss {metrics[f'{name}/test_loss']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
