"""The VGG family: VGG11/13/16/19 for 32x32 inputs (torchvision's cfgs A/B/D/E with the SWA
paper's CIFAR head) and the seed notebook's "simplified" VGG.

Options (``model.batch_norm``, ``model.dropout``, ``model.width``) are the builders'
keyword arguments; the registry in ``swa_research/models/__init__.py`` names the builders.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

# torchvision.models.vgg cfgs A, B, D, E; "M" is a 2x2 max pool.
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
    "simplified": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
}


def _scale(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def make_features(cfg: list[int | str], batch_norm: bool, width: float = 1.0,
                  in_channels: int = 3) -> tuple[nn.Sequential, int]:
    """The conv stack; returns it with its number of output channels."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = _scale(int(v), width)
        layers.append(nn.Conv2d(in_channels, out, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out
    return nn.Sequential(*layers), in_channels


class VGG(nn.Module):
    """Features, flatten, classifier: the layout shared by both heads below."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _init_conv_and_bn(model: nn.Module) -> None:
    # Kaiming-normal fan_out: the seed's init, and the SWA paper's normal(0, sqrt(2 / (k*k*out))).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def vgg_cifar(depth_name: str, num_classes: int, batch_norm: bool = False,
              dropout: float = 0.5, width: float = 1.0, image_size: int = 32) -> VGG:
    """VGG with the SWA paper's CIFAR head: Dropout, 512-512, ReLU, Dropout, 512-512, ReLU,
    512-classes (timgaripov/swa models/vgg.py); linear layers keep PyTorch's default init."""
    features, channels = make_features(VGG_CFGS[depth_name], batch_norm, width)
    spatial = image_size // 32
    hidden = _scale(512, width)
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(channels * spatial * spatial, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
    model = VGG(features, classifier)
    _init_conv_and_bn(model)
    return model


def vgg_simplified(num_classes: int, batch_norm: bool = False, dropout: float = 0.5,
                   width: float = 1.0, image_size: int = 32) -> VGG:
    """The seed notebook's net: conv 64,64,M,128,128,M,256,256,M, head 4096-1024-1024-classes
    with ReLU then Dropout; Kaiming-normal conv init, N(0, 0.01) linear init, zero biases."""
    features, channels = make_features(VGG_CFGS["simplified"], batch_norm, width)
    spatial = image_size // 8
    hidden = _scale(1024, width)
    classifier = nn.Sequential(
        nn.Linear(channels * spatial * spatial, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    model = VGG(features, classifier)
    _init_conv_and_bn(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def _check(dropout: float, width: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout}: must be in [0, 1)")
    if not width > 0:
        raise ValueError(f"model.width={width}: must be a positive number")


def simplified(num_classes: int, image_size: int = 32, *, batch_norm: bool = False,
               dropout: float = 0.5, width: float = 1.0) -> VGG:
    """The seed notebook's VGG (conv 64,64,M,128,128,M,256,256,M; head 4096-1024-1024)."""
    _check(dropout, width)
    return vgg_simplified(num_classes, batch_norm, dropout, width, image_size)


def vgg(depth_name: str, num_classes: int, image_size: int = 32, *, batch_norm: bool = False,
        dropout: float = 0.5, width: float = 1.0) -> VGG:
    """VGG11/13/16/19 (``depth_name``) with the SWA paper's CIFAR head."""
    _check(dropout, width)
    return vgg_cifar(depth_name, num_classes, batch_norm, dropout, width, image_size)


vgg11, vgg13, vgg16, vgg19 = (partial(vgg, name) for name in ("vgg11", "vgg13", "vgg16", "vgg19"))
