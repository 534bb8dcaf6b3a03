"""Faster 3x3 convolutions for training on a CPU: Winograd's minimal filtering (fp32) and
im2col + GEMM (bf16), on the layers where oneDNN's direct convolutions are slow.

oneDNN's direct fp32 convolutions run near the matmul peak on VGG's 16x16 and 32x32 layers but
lose time on its deep ones (128 to 512 channels on 8x8, 4x4 and 2x2 maps). There, Winograd's
minimal filtering (Lavin & Gray, 2016) computes the same convolution with fewer
multiplications: F(m x m, 3x3) turns each m x m output tile into (m+2)^2 products per channel
pair instead of 9 m^2, done as (m+2)^2 batched matmuls ``[tiles, C_in] @ [C_in, C_out]``:
F(2x2, 3x3) saves 2.25x, F(4x4, 3x3) 4x. The backward pass (input and weight gradients) runs in
the same transformed domain with the same saving. The transforms are small matmuls too.

Rounding differs from a direct convolution. Measured relative errors (max |error| / max |value|
against float64, VGG16's layer shapes, outputs and both gradients) are 3e-7 to 9e-7 for
F(2x2, 3x3) and 5e-6 to 2e-5 for F(4x4, 3x3), against 7e-7 to 3e-6 for oneDNN's own fp32
convolutions; TF32, which PyTorch uses for fp32 convolutions on recent GPUs by default, is at
about 1e-3. cuDNN runs the same algorithms for fp32.

In bf16 (autocast), oneDNN's direct convolutions reach only 4 to 30% of the AMX matmul peak on
4x4 and 2x2 maps, the weight gradient worst of all. There an explicit im2col and one bf16 matmul
per pass (``[N H W, 9 C_in] @ [9 C_in, C_out]`` and its two transposes) computes the same
products as the direct convolution, at 2 to 5 times its speed.

``FastConv2d`` is an ``nn.Conv2d`` (same parameters, state dict and init) whose ``algorithm``
attribute (``native``, ``winograd`` or ``auto``) chooses per call (``auto``: see
``auto_algorithm``); ``set_conv_algorithm`` sets it on a model. Whatever the fast paths don't
cover (CUDA, fp16, torch.compile tracing, other kernels, strides or paddings, maps that no tile
divides) runs ``nn.Conv2d.forward``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swa_research.config import CHOICES, UserError
from swa_research.step import cpu_has_native

CONV_ALGORITHMS = CHOICES["trainer.conv_algorithm"]

# B^T, G, A^T of F(m x m, 3x3) for output tiles m = 2 (points 0, 1, -1) and m = 4 (points 0, 1,
# -1, 2, -2), as in Lavin & Gray (2016).
_MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


@functools.lru_cache(maxsize=16)
def _transforms(m: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """kron(B^T, B^T) [T^2, T^2], kron(G, G) [T^2, 9], kron(A^T, A^T) [m^2, T^2], T = m + 2:
    the 2-D transforms of a flattened tile, computed in float64."""
    return tuple(torch.kron(t, t).to(dtype=dtype, device=device)
                 for t in (torch.tensor(a, dtype=torch.float64) for a in _MATRICES[m]))


def _spans(m: int, size: int, tiles: int) -> list[tuple[int, int, int]]:
    """For each row a of a (m+2)-row input tile (tile i starts at input row m i - 1, padding
    included): (first input row, first tile, number of tiles) of the rows inside the input."""
    spans = []
    for a in range(m + 2):
        first = 0
        while m * first + a - 1 < 0:
            first += 1
        last = tiles - 1
        while m * last + a - 1 > size - 1:
            last -= 1
        spans.append((m * first + a - 1, first, last - first + 1))
    return spans


def _empty_nhwc(n: int, c: int, h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """An [N, C, H, W] tensor in channels-last memory (or NCHW when ``like`` is plain NCHW)
    and its NHWC view."""
    nchw = like.is_contiguous() and not like.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty(n, c, h, w, dtype=like.dtype, device=like.device,
                      memory_format=torch.contiguous_format if nchw else torch.channels_last)
    return out, out.permute(0, 2, 3, 1)


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                m: int) -> Tensor:
        n, c, h, w = x.shape
        k, t = weight.shape[0], m + 2
        th, tw = h // m, w // m
        bt, g, at = _transforms(m, x.dtype, x.device)
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # NHWC with the zero padding
        tiles = xp.unfold(1, t, m).unfold(2, t, m)  # [N, th, tw, C, t, t], a view
        d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(t * t, -1)  # gathered: [t^2, tiles * C]
        v = (bt @ d).view(t * t, n * th * tw, c)
        u = (g @ weight.reshape(k * c, 9).t()).view(t * t, k, c)
        y_tiles = (at @ torch.bmm(v, u.transpose(1, 2)).view(t * t, -1)).view(
            m, m, n, th, tw, k)
        y, y_nhwc = _empty_nhwc(n, k, h, w, x)
        y_nhwc.unflatten(1, (th, m)).unflatten(3, (tw, m)).copy_(
            y_tiles.permute(2, 3, 0, 4, 1, 5))
        if bias is not None:
            y_nhwc += bias
        ctx.save_for_backward(v, u)
        ctx.dims = (n, c, h, w, k, m)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        v, u = ctx.saved_tensors
        n, c, h, w, k, m = ctx.dims
        t, th, tw = m + 2, h // m, w // m
        bt, g, at = _transforms(m, grad_out.dtype, grad_out.device)
        gy = grad_out.permute(0, 2, 3, 1)  # NHWC
        gy_tiles = gy.unflatten(1, (th, m)).unflatten(3, (tw, m)).permute(2, 4, 0, 1, 3, 5)
        dm = (at.t() @ gy_tiles.reshape(m * m, -1)).view(t * t, n * th * tw, k)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dd = (bt.t() @ torch.bmm(dm, u).view(t * t, -1)).view(t, t, n, th, tw, c)
            grad_x, gx = _empty_nhwc(n, c, h, w, grad_out)
            gx.zero_()
            for a, (r0, i0, ni) in enumerate(_spans(m, h, th)):
                for b, (c0, j0, nj) in enumerate(_spans(m, w, tw)):
                    gx[:, r0:r0 + m * ni:m, c0:c0 + m * nj:m, :] += \
                        dd[a, b, :, i0:i0 + ni, j0:j0 + nj, :]
        if ctx.needs_input_grad[1]:
            du = torch.bmm(dm.transpose(1, 2), v)  # [t^2, K, C]
            # G^T du as [9, K C], a wide matmul: du^T G ([K C, 9]) runs at a third of its
            # speed. The permuted view is copied into the weight's own layout by autograd.
            grad_w = (g.t() @ du.view(t * t, k * c)).view(3, 3, k, c).permute(2, 3, 0, 1)
        if ctx.needs_input_grad[2]:
            grad_b = gy.sum((0, 1, 2))
        return grad_x, grad_w, grad_b, None


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     tile: int = 2) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel by Winograd F(tile x tile,
    3x3), tile 2 or 4, with its own backward pass; the tile must divide H and W."""
    if tile not in _MATRICES:
        raise ValueError(f"tile={tile}: expected one of {sorted(_MATRICES)}")
    if x.dim() != 4 or weight.shape[2:] != (3, 3) or x.shape[2] % tile or x.shape[3] % tile:
        raise ValueError(f"winograd_conv3x3 needs a 3x3 kernel and an NCHW input whose height "
                         f"and width are multiples of {tile}, got {tuple(x.shape)}")
    return _Winograd.apply(x, weight, bias, tile)


def _tap_spans(size: int) -> list[tuple[slice, slice]]:
    """For kernel row a (0..2) with padding 1: (input rows, output rows) that it connects."""
    return [(slice(0, size - 1), slice(1, size)), (slice(0, size), slice(0, size)),
            (slice(1, size), slice(0, size - 1))]


class _Im2colGemm(torch.autograd.Function):
    """3x3, stride 1, padding 1 as im2col and one matmul per pass, in NHWC: columns
    [N H W, 9 C] in (kernel row, kernel column, channel) order, so that a channels-last weight
    is a [C_out, 9 C] matrix without a copy."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        k = weight.shape[0]
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
        cols = torch.cat([xp[:, a:a + h, b:b + w, :] for a in range(3) for b in range(3)], 3)
        cols = cols.view(n * h * w, 9 * c)
        wm = weight.permute(0, 2, 3, 1).reshape(k, 9 * c)
        y, y_nhwc = _empty_nhwc(n, k, h, w, x)
        out = torch.mm(cols, wm.t()) if bias is None else torch.addmm(bias, cols, wm.t())
        y_nhwc.copy_(out.view(n, h, w, k))
        ctx.save_for_backward(cols, wm)
        ctx.dims = (n, c, h, w, k)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        cols, wm = ctx.saved_tensors
        n, c, h, w, k = ctx.dims
        gy = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, k)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dcols = (gy @ wm).view(n, h, w, 9, c)
            grad_x, gx = _empty_nhwc(n, c, h, w, grad_out)
            gx.copy_(dcols[:, :, :, 4, :])  # the centre tap covers every pixel
            for a, (rows_in, rows_out) in enumerate(_tap_spans(h)):
                for b, (cols_in, cols_out) in enumerate(_tap_spans(w)):
                    if (a, b) != (1, 1):
                        gx[:, rows_in, cols_in, :] += dcols[:, rows_out, cols_out, 3 * a + b, :]
        if ctx.needs_input_grad[1]:
            grad_w = (gy.t() @ cols).view(k, 3, 3, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b


def gemm_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel by im2col and a matmul, with
    its own backward pass."""
    if x.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"gemm_conv3x3 needs a 3x3 kernel and an NCHW input, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    return _Im2colGemm.apply(x, weight, bias)


def winograd_tile(height: int, width: int) -> int | None:
    """The larger Winograd tile that divides the map (4, else 2), or None."""
    for tile in (4, 2):
        if height % tile == 0 and width % tile == 0:
            return tile
    return None


def auto_algorithm(in_channels: int, out_channels: int, height: int, width: int,
                   dtype: torch.dtype = torch.float32) -> tuple[str, int | None]:
    """(algorithm, Winograd tile) that ``auto`` picks for a CPU convolution of this shape and
    compute dtype, from measured layer times (``scripts/benchmark.py --layers``), all with at
    least 128 channels in and out:

    * fp32: Winograd on maps of at most 8x8, where it takes 0.3 to 0.7 of the time of oneDNN's
      best layout (on larger maps and fewer channels the transforms cost more than the
      multiplications they save);
    * bf16: im2col + GEMM on maps of at most 4x4 (0.2 to 0.5 of oneDNN's time), on a CPU
      with native bf16 (AMX, AVX512-BF16; without it a bf16 matmul is emulated and oneDNN's
      emulated convolution is 1.2 to 1.8 times faster than the GEMM);
    * oneDNN (``native``) everywhere else, fp16 included.

    The fp32 cut-offs hold on an AVX-512/AMX Xeon and on an AVX2 AMD EPYC (Zen 3) alike:
    Winograd takes 0.3 to 0.7 of oneDNN's time on the deep layers of both.
    """
    wide = min(in_channels, out_channels) >= 128
    if dtype in (torch.float32, torch.float64):
        tile = winograd_tile(height, width)
        if tile is not None and height * width <= 64 and wide:
            return "winograd", tile
    elif dtype == torch.bfloat16 and height * width <= 16 and wide and cpu_has_native("bf16"):
        return "gemm", None
    return "native", None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU convolution of x computes in: autocast's when it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs 3x3/stride-1/padding-1 convolutions on a CPU by the algorithm in
    ``self.algorithm``: ``native`` (oneDNN), ``winograd`` (wherever a tile divides the map, in
    fp32; oneDNN elsewhere) or ``auto`` (``auto_algorithm``'s choice per shape and dtype)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.algorithm = "native"
        self._eligible = (self.kernel_size == (3, 3) and self.stride == (1, 1)
                          and self.padding == (1, 1) and self.dilation == (1, 1)
                          and self.groups == 1 and self.padding_mode == "zeros")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algorithm={self.algorithm}"

    def choose(self, x: Tensor) -> tuple[str, int | None]:
        """(algorithm, Winograd tile) for this input: ``native`` wherever neither fast path
        applies."""
        if (self.algorithm == "native" or not self._eligible or x.device.type != "cpu"
                or x.dim() != 4 or torch.compiler.is_compiling()):
            return "native", None
        dtype = _compute_dtype(x)
        h, w = x.shape[2], x.shape[3]
        if self.algorithm == "winograd":
            tile = winograd_tile(h, w)
            if tile is None or dtype not in (torch.float32, torch.float64):
                return "native", None
            return "winograd", tile
        return auto_algorithm(self.in_channels, self.out_channels, h, w, dtype)

    def forward(self, x: Tensor) -> Tensor:
        algo, tile = self.choose(x)
        if algo == "winograd":
            return _Winograd.apply(x, self.weight, self.bias, tile)
        if algo == "gemm":
            # What autocast does for F.conv2d: compute in its dtype (the casts are
            # differentiable; the weight's gradient arrives in fp32).
            dtype = _compute_dtype(x)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast("cpu", enabled=False):
                return _Im2colGemm.apply(x.to(dtype), self.weight.to(dtype), bias)
        return super().forward(x)


def set_conv_algorithm(model: nn.Module, algorithm: str) -> int:
    """Sets ``algorithm`` on every ``FastConv2d`` of the model; returns how many."""
    if algorithm not in CONV_ALGORITHMS:
        raise UserError(f"trainer.conv_algorithm={algorithm!r}: expected one of "
                        f"{', '.join(CONV_ALGORITHMS)}")
    count = 0
    for m in model.modules():
        if isinstance(m, FastConv2d):
            m.algorithm = algorithm
            count += 1
    return count
