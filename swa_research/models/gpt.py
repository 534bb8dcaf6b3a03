"""A decoder-only transformer language model, as karpathy/nanoGPT's ``model.py``: token and
position embeddings, pre-LayerNorm blocks of causal self-attention
(``F.scaled_dot_product_attention``) and a 4x GELU MLP, a final LayerNorm and a head tied to
the token embedding. Initialisation as GPT-2: N(0, 0.02), the residual projections scaled by
1 / sqrt(2 n_layer). The GPT-2 small shape (12 layers, 12 heads, 768 wide, block 1024, bias,
vocabulary 50257) has 124,439,808 parameters with the tied embedding (nanoGPT prints 123.65M:
its count leaves out the 786,432 position embeddings).

The forward pass maps token ids [B, T] to logits [B, T, vocab]; the task computes the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training
                                           else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, gelu: str = "exact") -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 gelu: str = "exact") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, gelu)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float = 0.0, bias: bool = True,
                 gelu: str = "exact") -> None:
        super().__init__()
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout, bias, gelu)
                                for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied: one matrix, counted once
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} tokens is longer than model.block_size "
                             f"{self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward and backward), as nanoGPT's ``estimate_mfu``
        (the PaLM paper's appendix B): 6 N + 12 L T d, N the parameters without the position
        embeddings, d the width, T the block."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * self.n_layer * self.block_size * self.wpe.weight.shape[1]


def gpt(num_classes: int, image_size: int = 32, *, n_layer: int = 6, n_head: int = 6,
        n_embd: int = 384, block_size: int = 256, dropout: float = 0.2, bias: bool = False,
        vocab_multiple: int = 1, gelu: str = "exact", weights: str | None = None) -> nn.Module:
    """A GPT over a vocabulary of ``num_classes`` tokens (the text's tokenizer gives it),
    padded up to a multiple of ``vocab_multiple`` (nanoGPT pads GPT-2's 50,257 to 50,304 = 786
    x 64 for faster matmuls on a GPU; the padded ids never occur, so training pushes their
    logits down); ``image_size`` is not used. The defaults are nanoGPT's shakespeare_char
    shape. ``gelu``: ``exact`` (erf, nanoGPT's ``nn.GELU()``) or ``tanh`` (GPT-2's
    ``gelu_new``). ``weights``: start from OpenAI's GPT-2 weights (``gpt2``, ``gpt2-medium``,
    ``gpt2-large``, ``gpt2-xl``, or a folder or file of them:
    :mod:`swa_research.models.gpt2_weights`), whose shape, biases and tanh GELU they bring;
    ``block_size`` up to 1,024 crops the position embeddings, ``dropout`` stays the config's."""
    for key, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                       ("block_size", block_size)):
        if value < 1:
            raise ValueError(f"model.{key}={value}: must be at least 1")
    if n_embd % n_head:
        raise ValueError(f"model.n_embd={n_embd} must be a multiple of model.n_head={n_head}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout}: must be in [0, 1)")
    if vocab_multiple < 1:
        raise ValueError(f"model.vocab_multiple={vocab_multiple}: must be at least 1")
    if gelu not in ("exact", "tanh"):
        raise ValueError(f"model.gelu={gelu!r}: expected exact or tanh")
    if weights:
        return _pretrained(num_classes, weights, block_size, dropout, vocab_multiple, n_head)
    num_classes = -(-num_classes // vocab_multiple) * vocab_multiple
    return GPT(num_classes, block_size, n_layer, n_head, n_embd, dropout, bias, gelu)


def _pretrained(num_classes: int, weights: str, block_size: int, dropout: float,
                vocab_multiple: int, n_head: int) -> GPT:
    from swa_research.models import gpt2_weights as g

    where = f"model.weights={weights}"
    if vocab_multiple != 1:
        raise ValueError(f"{where}: GPT-2's 50,257 logits are not padded; set "
                         "model.vocab_multiple=1")
    if block_size > g.POSITIONS:
        raise ValueError(f"{where}: model.block_size={block_size} is beyond GPT-2's "
                         f"{g.POSITIONS} positions")
    if torch.empty(0).device.type == "meta":  # the config's check: the shape, nothing read
        _, shape = g.resolve(weights)
        n_layer, heads, n_embd = shape or (1, 1, 64)
        return GPT(g.VOCAB, block_size, n_layer, heads, n_embd, dropout, True, "tanh")
    if num_classes != g.VOCAB:
        raise ValueError(f"{where}: GPT-2's vocabulary is {g.VOCAB:,} BPE tokens, this run's "
                         f"tokenizer has {num_classes:,}: set data.tokenizer=gpt2")
    state, shape = g.hf_state(weights, n_head)
    n_layer, heads, n_embd = shape
    g.describe(weights, shape, block_size)
    model = GPT(g.VOCAB, block_size, n_layer, heads, n_embd, dropout, True, "tanh")
    g.load_into(model, g.to_gpt_state(state, n_layer, block_size), weights)
    return model
