"""swa_research.models: VGG11/13/16/19 against torchvision, and the seed's simplified VGG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from swa_research.config import UserError
from swa_research.models import build_model, resolve_model_config
from swa_research.models.vgg import vgg_cifar, vgg_simplified


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_features_match_torchvision(name: str, batch_norm: bool) -> None:
    ctor = getattr(torchvision.models, name + ("_bn" if batch_norm else ""))
    with torch.device("meta"):  # torchvision's full model, without the cost of its init
        reference = ctor(weights=None).features
    ours = vgg_cifar(name, num_classes=10, batch_norm=batch_norm, width=1.0).features
    assert n_params(ours) == n_params(reference)
    assert [tuple(p.shape) for p in ours.parameters()] == \
        [tuple(p.shape) for p in reference.parameters()]
    assert len(ours) == len(reference)  # the same layers (our convs are nn.Conv2d subclasses)
    assert all(isinstance(a, type(b)) for a, b in zip(ours, reference, strict=True))


def test_known_parameter_counts() -> None:
    # torchvision's published totals for the conv stacks (cfg A: 9,220,480; cfg E: 20,024,384)
    assert n_params(vgg_cifar("vgg11", 10).features) == 9_220_480
    assert n_params(vgg_cifar("vgg19", 10).features) == 20_024_384


@pytest.mark.parametrize("name", ["simplified", "vgg11", "vgg16"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_forward_shape(name: str, batch_norm: bool) -> None:
    torch.manual_seed(0)
    model = build_model(dict(name=name, batch_norm=batch_norm, width=0.125),
                        num_classes=7)
    model.eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_forward_other_image_sizes() -> None:
    vgg = build_model(dict(name="vgg11", width=0.125), num_classes=5, image_size=64)
    assert vgg(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    simple = build_model(dict(name="simplified", width=0.125), num_classes=3,
                         image_size=48)
    assert simple.classifier[0].in_features == 32 * 6 * 6
    assert simple(torch.randn(2, 3, 48, 48)).shape == (2, 3)


def test_width_multiplier_scales_channels() -> None:
    full = vgg_cifar("vgg11", 10, width=1.0)
    half = vgg_cifar("vgg11", 10, width=0.5)
    convs = [m for m in half.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256, 256, 256]
    assert half.classifier[1].in_features == 256 and half.classifier[1].out_features == 256
    assert n_params(half) < n_params(full)
    # A conv layer's weights scale with both channel counts: about a quarter.
    assert 0.2 < n_params(half.features) / n_params(full.features) < 0.3
    tiny = build_model(dict(name="simplified", width=0.25), num_classes=10)
    assert [c.out_channels for c in tiny.features if isinstance(c, nn.Conv2d)] == \
        [16, 16, 32, 32, 64, 64]
    assert n_params(tiny) < n_params(vgg_simplified(10))


def test_simplified_matches_seed_notebook() -> None:
    torch.manual_seed(0)
    model = build_model(dict(name="simplified"), num_classes=10)
    layers = list(model.features)
    expected = [("conv", 3, 64), ("relu",), ("conv", 64, 64), ("relu",), ("pool",),
                ("conv", 64, 128), ("relu",), ("conv", 128, 128), ("relu",), ("pool",),
                ("conv", 128, 256), ("relu",), ("conv", 256, 256), ("relu",), ("pool",)]
    assert len(layers) == len(expected)
    for layer, exp in zip(layers, expected, strict=True):
        if exp[0] == "conv":
            assert isinstance(layer, nn.Conv2d)
            assert (layer.in_channels, layer.out_channels) == exp[1:]
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)
            assert layer.stride == (1, 1)
            assert torch.count_nonzero(layer.bias) == 0
            # Kaiming normal, fan_out: std sqrt(2 / (9 * out_channels))
            std = (2.0 / (9 * layer.out_channels)) ** 0.5
            assert layer.weight.std().item() == pytest.approx(std, rel=0.1)
        elif exp[0] == "relu":
            assert isinstance(layer, nn.ReLU)
        else:
            assert isinstance(layer, nn.MaxPool2d)
            assert layer.kernel_size == 2 and layer.stride == 2
    head = list(model.classifier)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == \
        [(4096, 1024), (1024, 1024), (1024, 10)]
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
    big = linears[0].weight
    assert big.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(big.mean().item()) < 1e-4
    assert linears[1].weight.std().item() == pytest.approx(0.01, rel=0.05)
    # conv 1,145,408 + linear 4,195,328 + 1,049,600 + 10,250
    assert n_params(model) == 6_400_586


def test_simplified_with_batch_norm() -> None:
    model = build_model(dict(name="simplified", batch_norm=True, width=0.25), 10)
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


@pytest.mark.parametrize("name", ["simplified", "vgg13"])
def test_dropout_taken_from_config(name: str) -> None:
    model = build_model(dict(name=name, dropout=0.3, width=0.125), num_classes=10)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2
    assert all(d.p == 0.3 for d in drops)
    model = build_model(dict(name=name, dropout=0.0, width=0.125), num_classes=10)
    assert all(d.p == 0.0 for d in model.modules() if isinstance(d, nn.Dropout))


def test_vgg_paper_head() -> None:
    model = build_model(dict(name="vgg16", width=1.0), num_classes=100)
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == \
        [(512, 512), (512, 512), (512, 100)]


@pytest.mark.parametrize("name,size", [("vgg11", 48), ("vgg16", 16), ("vgg19", 40),
                                       ("simplified", 36), ("simplified", 4)])
def test_bad_image_size_rejected(name: str, size: int) -> None:
    with pytest.raises(UserError, match=str(size)):
        build_model(dict(name=name, width=0.125), num_classes=10, image_size=size)


def test_unknown_model_rejected() -> None:
    with pytest.raises(UserError, match="resnet18: no such model; expected one of simplified"):
        build_model(dict(name="resnet18"), num_classes=10)
    with pytest.raises(UserError, match="resnet18: no such model"):
        resolve_model_config({"name": "resnet18"})


def test_model_options_are_the_builders_and_stay_with_their_family() -> None:
    """The options come from the builder's keyword arguments, with its defaults and types;
    another family's option, a typo, a wrong type and a bad value are refused by name."""
    assert resolve_model_config({"name": "vgg16"}) == {
        "name": "vgg16", "sync_bn": False, "batch_norm": False, "dropout": 0.5, "width": 1.0}
    assert resolve_model_config({"name": "vgg11", "width": 1})["width"] == 1.0  # int -> float
    with pytest.raises(UserError, match=r"model.widht: not an option of model vgg16 .*"
                                        r"did you mean model.width\?"):
        resolve_model_config({"name": "vgg16", "widht": 0.5})
    with pytest.raises(UserError, match="model.batch_norm='yes': expected a bool"):
        resolve_model_config({"name": "vgg16", "batch_norm": "yes"})
    with pytest.raises(UserError, match=r"model.dropout=1.5: must be in \[0, 1\)"):
        resolve_model_config({"name": "simplified", "dropout": 1.5})
    with pytest.raises(UserError, match="model.width=0.0: must be a positive number"):
        resolve_model_config({"name": "vgg11", "width": 0.0})


def test_a_new_model_is_one_builder_and_one_registry_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A toy model family, written here: its builder's keyword arguments become its options on
    the command line (model=toy model.hidden=8), VGG's options are refused for it, and it
    trains through the whole pipeline."""
    from conftest import TINY, compose_config

    from swa_research.models import MODELS, register_model
    from swa_research.training.build import load_config, train

    def toy(num_classes: int, image_size: int = 32, *, hidden: int = 16) -> nn.Module:
        if hidden < 1:
            raise ValueError(f"model.hidden={hidden}: must be at least 1")
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden),
                             nn.ReLU(), nn.Linear(hidden, num_classes))

    monkeypatch.setitem(MODELS, "toy", MODELS["simplified"])  # restored after the test
    register_model("toy", toy)
    tiny = [o for o in TINY if not o.startswith("model.")]  # VGG options
    overrides = [*tiny, "model=toy", "model.hidden=8"]
    cfg = compose_config(overrides)
    assert load_config(cfg).model == {"name": "toy", "hidden": 8, "sync_bn": False}
    with pytest.raises(UserError, match="model.batch_norm: not an option of model toy"):
        load_config(compose_config([*overrides, "+model.batch_norm=true"]))
    with pytest.raises(UserError, match="model.hidden=0: must be at least 1"):
        load_config(compose_config([*overrides, "model.hidden=0"]))
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["swa"]["n_averaged"] > 0
    saved = torch.load(tmp_path / "run" / "swa.pt", weights_only=True)
    assert saved["state_dict"]["1.weight"].shape == (8, 3 * 32 * 32)
