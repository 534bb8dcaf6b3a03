"""A Lightning fit on two CPU processes with swa_research's AveragingCallback, for
tests/test_lightning.py::test_the_callback_under_fsdp_equals_ddp_and_resumes.

    python tests/lightning_fsdp_run.py MODE OUT_JSON ROOT_DIR

MODE: ``ddp`` (Lightning's DDP strategy, the module whole on each rank), ``fsdp``
(``ModelParallelStrategy``, the module passed through ``fully_shard`` in ``configure_model``),
or ``fsdp_resume`` (FSDP, 2 epochs with a checkpoint, then a new Trainer resumed from it to 3).
Rank 0 writes each average's whole weights and the logged metrics to OUT_JSON."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import lightning_callback as ex  # noqa: E402

from swa_research.lightning import AveragingCallback  # noqa: E402


class Net(ex.Classifier):
    """examples/lightning_callback.py's classifier without BN (FSDP does not shard it)."""

    def __init__(self, shard: bool) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        self.shard = shard

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not self.shard or isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for i in (0, 2):
            fully_shard(self.net[i], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("sgd/val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.validation_step(batch, _)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, foreach=True)


def fit(mode: str, root: Path, epochs: int, ckpt: str | None = None
        ) -> tuple[pl.Trainer, AveragingCallback, Net]:
    pl.seed_everything(0, verbose=False)
    cb = AveragingCallback({"swa": {}, "ema": {"decay": 0.9}, "swag": {"samples": 3}},
                           start=1, unit="epoch", posthoc_ema=(0.05, 0.10), posthoc_ema_every=5)
    fsdp = mode != "ddp"
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if fsdp \
        else "ddp"
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, strategy=strategy,
                         callbacks=[cb, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    model = Net(shard=fsdp)
    trainer.fit(model, DataLoader(ex.blobs(512, 1), batch_size=32, shuffle=True),
                DataLoader(ex.blobs(256, 2), batch_size=64), ckpt_path=ckpt)
    return trainer, cb, model


def main() -> None:
    mode, out, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "fsdp_resume":
        fit(mode, root, 2)
        trainer, cb, model = fit(mode, root, 3, ckpt=str(root / "ckpt" / "last.ckpt"))
    else:
        trainer, cb, model = fit(mode, root, 3)
    trainer.test(model, DataLoader(ex.blobs(256, 3), batch_size=64), verbose=False)
    record: dict[str, object] = {"metrics": {k: float(v) for k, v in
                                             trainer.callback_metrics.items()}}
    for name, average in cb.averages.items():
        sharded = getattr(average, "sharded", False)
        state = average.full_state_dict() if sharded else average.module.state_dict()
        record[name] = {"n": average.n_averaged,
                        "weights": {k: v.flatten().tolist() for k, v in state.items()}}
        if sharded:
            record[name]["share"] = average.nbytes() / average.whole_nbytes()
    if trainer.global_rank == 0:
        out.write_text(json.dumps(record))
    # The sharded module's reference cycles hold the device mesh and the process group: freed
    # before the group is destroyed, not at the interpreter's exit (distributed.teardown).
    del trainer, cb, model, average
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
