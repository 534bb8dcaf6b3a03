"""Winograd convolutions (swa_research.conv): exact gradients, fp32 error bounds, the choice
that ``auto`` makes, and models that train the same with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swa_research.config import ModelConfig, UserError
from swa_research.conv import (
    FastConv2d,
    auto_algorithm,
    gemm_conv3x3,
    set_conv_algorithm,
    winograd_conv3x3,
)
from swa_research.models import build_model

FORMATS = [torch.channels_last, torch.contiguous_format]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nhwc", "nchw"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 4), (1, 2, 3, 8, 12)])
def test_winograd_matches_conv2d_and_its_gradients(tile: int, fmt: torch.memory_format,
                                                   shape: tuple[int, ...]) -> None:
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen).to(memory_format=fmt)
    weight = torch.randn(k, c, 3, 3, dtype=torch.float64, generator=gen)
    bias = torch.randn(k, dtype=torch.float64, generator=gen)
    for t in (x, weight, bias):
        t.requires_grad_()
    y = winograd_conv3x3(x, weight, bias, tile)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, padding=1), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: winograd_conv3x3(*a, tile=tile),
                                    (x, weight, bias))
    y_nobias = winograd_conv3x3(x, weight, None, tile)
    torch.testing.assert_close(y_nobias, F.conv2d(x, weight, None, padding=1), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nhwc", "nchw"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 6), (1, 2, 2, 2, 2), (1, 3, 4, 1, 5)])
def test_gemm_matches_conv2d_and_its_gradients(fmt: torch.memory_format,
                                               shape: tuple[int, ...]) -> None:
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen).to(memory_format=fmt)
    weight = torch.randn(k, c, 3, 3, dtype=torch.float64, generator=gen).to(memory_format=fmt)
    bias = torch.randn(k, dtype=torch.float64, generator=gen)
    for t in (x, weight, bias):
        t.requires_grad_()
    y = gemm_conv3x3(x, weight, bias)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, padding=1), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(gemm_conv3x3, (x, weight, bias))


@pytest.mark.parametrize(("tile", "bound"), [(2, 5e-6), (4, 1e-4)])
def test_fp32_error_against_float64(tile: int, bound: float) -> None:
    """max |error| / max |value| of the output and both gradients, against a float64 direct
    convolution: F(2x2) is a few ulps, F(4x4) about 1e-5 (the module docstring's figures)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, 8, 8, generator=gen).to(memory_format=torch.channels_last)
    weight = 0.05 * torch.randn(32, 64, 3, 3, generator=gen)
    gy = torch.randn(8, 32, 8, 8, generator=gen)
    x32, w32 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    winograd_conv3x3(x32, w32, None, tile).backward(gy)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = F.conv2d(x64, w64, padding=1)
    y64.backward(gy.double())
    y32 = winograd_conv3x3(x, weight, None, tile)
    for got, ref in ((y32, y64), (x32.grad, x64.grad), (w32.grad, w64.grad)):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < bound, err


def test_winograd_rejects_what_it_cannot_compute() -> None:
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match="multiples of 4"):
        winograd_conv3x3(x, torch.randn(3, 2, 3, 3), tile=4)
    with pytest.raises(ValueError, match="3x3"):
        winograd_conv3x3(x, torch.randn(3, 2, 5, 5))
    with pytest.raises(ValueError, match="tile=3"):
        winograd_conv3x3(x, torch.randn(3, 2, 3, 3), tile=3)


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the CPU has native bf16 (AMX or AVX512-BF16), which ``auto``'s bf16 GEMM needs."""
    monkeypatch.setattr("swa_research.conv.cpu_has_native", lambda precision: True)


def test_auto_picks_winograd_only_on_small_wide_maps(native_bf16: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_algorithm(512, 512, 2, 2) == ("winograd", 2)
    assert auto_algorithm(256, 512, 4, 4) == ("winograd", 4)
    assert auto_algorithm(256, 256, 8, 8) == ("winograd", 4)
    assert auto_algorithm(128, 128, 16, 16) == ("native", None)  # oneDNN is faster there
    assert auto_algorithm(64, 512, 4, 4) == ("native", None)  # too few channels
    assert auto_algorithm(512, 512, 3, 3) == ("native", None)  # no tile divides 3
    bf16 = torch.bfloat16
    assert auto_algorithm(512, 512, 2, 2, bf16) == ("gemm", None)
    assert auto_algorithm(256, 512, 4, 4, bf16) == ("gemm", None)
    assert auto_algorithm(256, 256, 8, 8, bf16) == ("native", None)  # oneDNN is faster there
    assert auto_algorithm(512, 512, 2, 2, torch.float16) == ("native", None)
    # Without native bf16 the GEMM is emulated and slower than oneDNN's emulated convolution.
    monkeypatch.setattr("swa_research.conv.cpu_has_native", lambda precision: False)
    assert auto_algorithm(512, 512, 2, 2, bf16) == ("native", None)
    assert auto_algorithm(512, 512, 2, 2) == ("winograd", 2)


def test_fast_conv_falls_back_wherever_winograd_does_not_apply(native_bf16: None) -> None:
    conv = FastConv2d(128, 128, 3, padding=1)
    x = torch.randn(1, 128, 4, 4)
    assert conv.choose(x) == ("native", None)  # the default algorithm
    conv.algorithm = "auto"
    assert conv.choose(x) == ("winograd", 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.choose(x) == ("gemm", None)
        assert conv.choose(torch.randn(1, 128, 8, 8)) == ("native", None)
        conv.algorithm = "winograd"  # fp32 only
        assert conv.choose(x) == ("native", None)
        conv.algorithm = "auto"
    assert conv.choose(x.half()) == ("native", None)
    strided = FastConv2d(128, 128, 3, padding=1, stride=2)
    strided.algorithm = "winograd"
    assert strided.choose(x) == ("native", None)
    conv.algorithm = "winograd"
    assert conv.choose(torch.randn(1, 128, 16, 16)) == ("winograd", 4)
    assert conv.choose(torch.randn(1, 128, 6, 6)) == ("winograd", 2)
    assert conv.choose(torch.randn(1, 128, 5, 5)) == ("native", None)


def test_set_conv_algorithm_keeps_the_state_dict() -> None:
    model = build_model(ModelConfig(name="vgg11", width=0.25), 10)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_conv_algorithm(model, "winograd") == 8
    assert all(m.algorithm == "winograd" for m in model.modules() if isinstance(m, FastConv2d))
    assert model.state_dict().keys() == reference.keys()
    assert all(isinstance(m, nn.Conv2d) for m in model.modules() if isinstance(m, FastConv2d))
    with pytest.raises(UserError, match="trainer.conv_algorithm='fast'"):
        set_conv_algorithm(model, "fast")


@pytest.mark.parametrize("fmt", FORMATS, ids=["nhwc", "nchw"])
def test_vgg16_trains_the_same_with_winograd(fmt: torch.memory_format) -> None:
    """VGG16 at width 0.25 (128 channels on the 4x4 and 2x2 maps, so ``auto`` runs Winograd on
    5 of its 13 convolutions): loss and gradients as with oneDNN, to fp32 rounding."""
    torch.manual_seed(0)
    native = build_model(ModelConfig(name="vgg16", width=0.25, dropout=0.0), 10).to(
        memory_format=fmt)
    fast = build_model(ModelConfig(name="vgg16", width=0.25, dropout=0.0), 10).to(
        memory_format=fmt)
    fast.load_state_dict(native.state_dict())
    set_conv_algorithm(fast, "auto")
    x = torch.randn(16, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (16,))
    chosen: list[tuple[str, int | None]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: chosen.append(mod.choose(inp[0])))
             for m in fast.modules() if isinstance(m, FastConv2d)]
    losses = []
    for model in (native, fast):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    for h in hooks:
        h.remove()
    assert chosen.count(("winograd", 4)) == 2 and chosen.count(("winograd", 2)) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, p), q in zip(native.named_parameters(), fast.parameters(), strict=True):
        scale = p.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-3 * scale + 1e-7, name


def test_gemm_under_bf16_autocast_matches_onednn(native_bf16: None) -> None:
    """Under bf16 autocast the GEMM path computes what autocast's F.conv2d does: bf16 output and
    fp32 weight gradients, as close to float64 as oneDNN's bf16 convolution is (bf16 rounding:
    a few 1e-3; oneDNN's own rounding differs by CPU, AMX or AVX2, so both are held to float64
    rather than to each other)."""
    torch.manual_seed(0)
    conv = FastConv2d(128, 128, 3, padding=1).to(memory_format=torch.channels_last)
    ref = nn.Conv2d(128, 128, 3, padding=1).to(memory_format=torch.channels_last)
    ref.load_state_dict(conv.state_dict())
    exact = nn.Conv2d(128, 128, 3, padding=1).double()
    exact.load_state_dict(conv.state_dict())
    conv.algorithm = "auto"
    x = torch.randn(8, 128, 4, 4).to(memory_format=torch.channels_last)
    y64 = exact(x.double())
    y64.square().sum().backward()

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm())

    errors = []
    for module in (conv, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
            if module is conv:
                assert conv.choose(x) == ("gemm", None)
        y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16 and module.weight.grad.dtype == torch.float32
        errors.append([error(y, y64), error(module.weight.grad, exact.weight.grad),
                       error(module.bias.grad, exact.bias.grad)])
    gemm, onednn = errors
    assert max(onednn) < 1e-2
    for e_gemm, e_onednn in zip(gemm, onednn, strict=True):
        assert e_gemm < max(1e-2, 2 * e_onednn)
