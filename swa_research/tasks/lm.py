"""Language modelling (``task=lm``): next-token prediction on text (``data=text``,
:mod:`swa_research.data.text`) with a language model (``model=gpt``). Its metrics are the
cross-entropy per token (``loss``, nats) and the perplexity ``ppl`` = exp(loss), for the
iterate and every average, on val and test; lower is better, and the loss leads the report.

The model has no BatchNorm: the averages' BN pass does nothing (``swa.bn_update`` applies to
BN layers only). SWAG's model average and the calibration are for class predictions of whole
images and do not apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from swa_research.data import DataSplits, Limits
from swa_research.data.text import Tokenizer, TokenSet, load_tokens
from swa_research.errors import DataError, UserError
from swa_research.models import model_task
from swa_research.tasks.base import Task, TaskMetrics, register_task


class TextSplits(DataSplits):
    """The token splits and their tokenizer (the model's vocabulary)."""

    def __init__(self, train: TokenSet, val: TokenSet | None, test: TokenSet,
                 tokenizer: Tokenizer) -> None:
        super().__init__(train, val, test, classes=[])
        self.tokenizer = tokenizer

    @property
    def num_classes(self) -> int:
        return self.tokenizer.vocab_size


def split_bounds(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Where the training tokens end and the test tokens begin: train, val, test in order."""
    n_test, n_val = int(n * test_fraction), int(n * val_fraction)
    return n - n_val - n_test, n - n_test


@register_task("lm")
class LanguageModel(Task):
    spec = TaskMetrics("lm", ("loss", "ppl"), headline="loss", unit="tokens")

    def check(self, config: Any) -> None:
        if config.data.name != "text":
            raise UserError(f"task=lm trains on text: set data=text (not data={config.data.name})")
        if config.trainer.overfit_batches:
            raise UserError("trainer.overfit_batches (debug=overfit) fits fixed images; a "
                            "language model's windows are drawn afresh every epoch: use "
                            "debug=fdr or debug=limit")
        if model_task(config.model) != "lm":
            raise UserError(f"task=lm needs a language model (model=gpt), not "
                            f"model={config.model.get('name')}")

    def output_size(self, data: DataSplits) -> int:
        return data.num_classes

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.float().flatten(0, -2), target.flatten())

    def count(self, target: Tensor) -> int:
        return int(target.numel())

    def metric_sums(self, output: Tensor, target: Tensor) -> list[Tensor]:
        return [torch.zeros((), device=output.device)]  # ppl comes from the mean loss

    def eval_sums(self, output: Tensor, target: Tensor) -> Tensor:
        loss = F.cross_entropy(output.float().flatten(0, -2), target.flatten(), reduction="sum")
        return torch.stack([loss.double(), torch.zeros((), dtype=torch.float64,
                                                       device=loss.device)])

    def summarize(self, sums: list[float], n: float) -> dict[str, float | None]:
        if n <= 0:
            return {"loss": None, "ppl": None}
        loss = sums[0] / n
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    def build_data(self, config: Any, device: torch.device, num_workers: int = 0,
                   memory_format: torch.memory_format = torch.contiguous_format) -> DataSplits:
        d = config.data
        if d.root in (None, "", "???"):
            raise DataError("data.root: set the text file or folder to train on "
                            "(data.root=PATH)")
        tokens, tokenizer = load_tokens(d.root, d.tokenizer, d.pattern)
        block = int(config.model["block_size"])
        n = len(tokens)
        train_end, test_start = split_bounds(n, d.val_fraction, d.test_fraction)
        windows = d.windows_per_epoch or max(1, (train_end - 1) // block)
        # A shortened run (the debug group's trainer.limit_*_batches): that many batches' worth
        # of windows an epoch, and of each held-out split.
        limits = Limits.of(config)
        if limits.train_images:
            windows = min(windows, limits.train_images)

        def held_out(lo: int, hi: int) -> TokenSet | None:
            if hi - lo < block + 1:
                return None
            count = (hi - lo - 1) // block
            if d.eval_tokens:
                count = max(1, min(count, d.eval_tokens // block))
            if limits.eval_images:
                count = min(count, limits.eval_images)
            return TokenSet(tokens, lo, hi, block, count, device)

        train = TokenSet(tokens, 0, train_end, block, windows, device)
        val, test = held_out(train_end, test_start), held_out(test_start, n)
        if test is None and val is None:
            raise DataError(f"data.root={d.root}: no held-out tokens for a window of "
                            f"{block + 1}; raise data.val_fraction")
        return TextSplits(train, val, test if test is not None else val, tokenizer)

    def train_batches(self, data: Any, batch_size: int, generator: torch.Generator,
                      preprocess: Any, drop_last: bool, order: Tensor, start: int,
                      shard: tuple[int, int] | None, aug_seed: int
                      ) -> Iterator[tuple[Tensor, Tensor]]:
        return data.train_batches(batch_size, drop_last, start, aug_seed, shard)

    def eval_batches(self, data: Any, batch_size: int, preprocess: Any,
                     shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        return data.eval_batches(batch_size, shard)

    def bn_batches(self, data: Any, batch_size: int, seed: int, iteration: int,
                   preprocess: Any, shard: tuple[int, int] | None = None) -> Iterator[Any]:
        return data.train_batches(batch_size, False, 0, seed * 1_000_003 + iteration, shard)
