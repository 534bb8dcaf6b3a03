"""swa_research.models: the SWA paper's PreResNet-110/164 and WideResNet-28-10 (timgaripov/swa
models/preresnet.py and models/wide_resnet.py): their parameter counts, layout, init, options
and registry entries."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config
from torch import nn

from swa_research.config import UserError
from swa_research.models import MODELS, build_model, resolve_model_config
from swa_research.models.preresnet import BasicBlock, Bottleneck, PreResNet
from swa_research.models.wrn import WideBasic, WideResNet
from swa_research.training.build import load_config

NAMES = ["preresnet110", "preresnet164", "wrn28x10"]

# Measured on the reference's definitions; the published figures are about 1.7M for
# PreResNet-164 and 36.5M for WRN-28-10 on CIFAR-10.
PARAMETERS = {
    ("preresnet110", 10): 1_146_842,
    ("preresnet110", 100): 1_169_972,
    ("preresnet164", 10): 1_703_258,
    ("preresnet164", 100): 1_726_388,
    ("wrn28x10", 10): 36_489_290,
    ("wrn28x10", 100): 36_546_980,
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(name: str, num_classes: int, **options: object) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build_model({"name": name, **options}, num_classes)


@pytest.mark.parametrize(("name", "num_classes"), list(PARAMETERS))
def test_parameter_counts(name: str, num_classes: int) -> None:
    assert n_params(on_meta(name, num_classes)) == PARAMETERS[(name, num_classes)]


def test_docstrings_state_the_counts() -> None:
    for name in NAMES:
        doc = " ".join((MODELS[name].build.__doc__ or "").split())
        for classes in (10, 100):
            assert f"{PARAMETERS[(name, classes)]:,} parameters for {classes}" in doc or \
                f"{PARAMETERS[(name, classes)]:,} for {classes}" in doc, (name, classes)


@pytest.mark.parametrize(("name", "blocks_per_stage", "block"),
                         [("preresnet110", 12, Bottleneck), ("preresnet164", 18, Bottleneck)])
def test_preresnet_layout(name: str, blocks_per_stage: int, block: type) -> None:
    """The reference picks bottleneck blocks from depth 44 on, with depth = 9n + 2."""
    model = on_meta(name, 10)
    assert isinstance(model, PreResNet)
    stages = [model.layer1, model.layer2, model.layer3]
    assert [len(s) for s in stages] == [blocks_per_stage] * 3
    assert all(isinstance(b, block) for s in stages for b in s)
    assert [s[0].conv3.out_channels for s in stages] == [64, 128, 256]
    assert [s[0].conv2.stride for s in stages] == [(1, 1), (2, 2), (2, 2)]
    # A projection shortcut opens each stage, and nowhere else.
    assert [sum(b.downsample is not None for b in s) for s in stages] == [1, 1, 1]
    assert all(s[0].downsample is not None for s in stages)
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.fc.in_features == 256
    # Depth: the stem conv, three convs a block, the classifier.
    assert 1 + 3 * 3 * blocks_per_stage + 1 == int(name.removeprefix("preresnet"))


def test_preresnet_depth_rule() -> None:
    with torch.device("meta"):
        shallow = PreResNet(20, 10)
    assert all(isinstance(b, BasicBlock) for b in shallow.layer1) and len(shallow.layer1) == 3
    with pytest.raises(ValueError, match="9n \\+ 2"):
        PreResNet(110 + 1, 10)


def test_wrn_layout() -> None:
    model = on_meta("wrn28x10", 10)
    assert isinstance(model, WideResNet)
    stages = [model.layer1, model.layer2, model.layer3]
    assert [len(s) for s in stages] == [4, 4, 4]
    assert all(isinstance(b, WideBasic) for s in stages for b in s)
    assert [s[0].conv1.out_channels for s in stages] == [160, 320, 640]
    # The stride sits on the second conv of a stage's first block.
    assert [(s[0].conv1.stride, s[0].conv2.stride) for s in stages] == \
        [((1, 1), (1, 1)), ((1, 1), (2, 2)), ((1, 1), (2, 2))]
    # Every conv has a bias; a 1x1 shortcut opens each stage (16 -> 160 changes channels too).
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert [sum(isinstance(b.shortcut, nn.Sequential) for b in s) for s in stages] == [1, 1, 1]
    assert model.bn1.momentum == 0.9  # the reference's final BN
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 12 and all(d.p == 0.0 for d in drops)
    assert all(d.p == 0.3 for d in on_meta("wrn28x10", 10, dropout=0.3).modules()
               if isinstance(d, nn.Dropout))


def test_preresnet_init() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "preresnet110"}, 10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096:
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            assert m.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # The linear layer keeps PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert model.fc.weight.abs().max().item() <= 1 / math.sqrt(256)


def test_preresnet_forward_shapes_and_pooling() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    seen: list[tuple[int, ...]] = []
    for classes in (10, 100):
        seen.clear()
        model = build_model({"name": "preresnet110"}, classes)
        model.layer3.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        out = model(x)
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        assert seen == [(2, 256, 8, 8)]  # the map the reference's AvgPool2d(8) averages
    model.eval()
    with torch.no_grad():  # global pooling: any multiple of 4 works
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 100)
    with torch.device("meta"):
        assert build_model({"name": "preresnet164"}, 100)(
            torch.empty(2, 3, 32, 32)).shape == (2, 100)


def test_wrn_forward_shapes() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "wrn28x10"}, 10)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    wide = on_meta("wrn28x10", 100)
    assert wide(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 100)


def test_options_and_defaults() -> None:
    for name in ("preresnet110", "preresnet164"):
        assert resolve_model_config({"name": name}) == {"name": name, "sync_bn": False}
    assert resolve_model_config({"name": "wrn28x10"}) == {"name": "wrn28x10", "sync_bn": False,
                                                          "dropout": 0.0}
    assert resolve_model_config({"name": "wrn28x10", "dropout": 0})["dropout"] == 0.0
    with pytest.raises(UserError, match=r"model.dropout=1.5: must be in \[0, 1\)"):
        resolve_model_config({"name": "wrn28x10", "dropout": 1.5})
    with pytest.raises(UserError, match=r"model.batch_norm: not an option of model "
                                        r"preresnet110 \(its options: none\)"):
        resolve_model_config({"name": "preresnet110", "batch_norm": True})
    with pytest.raises(UserError, match=r"model.width: not an option of model wrn28x10 "
                                        r"\(its options: dropout\)"):
        resolve_model_config({"name": "wrn28x10", "width": 0.5})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [30, 34, 2])
def test_bad_image_size_rejected(name: str, size: int) -> None:
    assert MODELS[name].image_multiple == 4
    with torch.device("meta"), pytest.raises(UserError, match=f"multiple of 4, got {size}"):
        build_model({"name": name}, num_classes=10, image_size=size)


@pytest.mark.parametrize("name", NAMES)
def test_composes_and_loads(name: str) -> None:
    config = load_config(compose_config([f"model={name}", "data=synthetic"]))
    assert config.model == resolve_model_config({"name": name})
    with pytest.raises(UserError, match=f"model.batch_norm: not an option of model {name}"):
        load_config(compose_config([f"model={name}", "data=synthetic",
                                    "+model.batch_norm=true"]))


def test_wrn_dropout_from_the_command_line() -> None:
    config = load_config(compose_config(["model=wrn28x10", "model.dropout=0.3",
                                         "data=synthetic"]))
    assert config.model == {"name": "wrn28x10", "sync_bn": False, "dropout": 0.3}
