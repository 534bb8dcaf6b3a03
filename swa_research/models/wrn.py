"""WideResNet-28-10 for CIFAR, as in the SWA paper's code (timgaripov/swa,
``models/wide_resnet.py``, itself from meliketoy/wide-resnet.pytorch).

Layout: a 3x3 conv to 16 channels, three stages of n = (depth - 4) / 6 wide pre-activation
blocks (16k, 32k, 64k channels for widen factor k; stride 2 at the first block of stages 2 and
3), then BN, ReLU, global average pooling and a linear layer. A block is BN-ReLU-conv3x3,
dropout, BN-ReLU-conv3x3 (this second conv carries the stride), plus the shortcut: the identity,
or a 1x1 conv where the stride or the channel count changes. Unlike the PreResNets, every conv
has a bias.

Details kept from the reference:

- Initialisation is PyTorch's default for every layer: the reference defines a Xavier
  ``conv_init`` but never applies it. (PyTorch before 1.0, which the paper used, drew BN weights
  from U(0, 1); today's default, used here, sets them to 1.)
- The final BN has ``momentum=0.9``: its running statistics follow mostly the last training
  batch (only the statistics an evaluation of the raw SGD model uses; SWA's BN update
  recomputes them).
- Dropout defaults to 0: the paper's runs use the reference's default ``dropout_rate=0.``.

The reference pools with ``avg_pool2d(.., 8)``, which fits 32x32 inputs only; here the pooling
is global (adaptive), the same operation, with the same parameters and outputs, on 32x32 inputs,
and also accepts any image size that is a multiple of 4 (the network's total downsampling).
Module names follow the reference, so its state dicts load as they are.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3 (strided), plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k of the reference: depth = 6n + 4."""

    def __init__(self, depth: int, widen_factor: int, dropout: float = 0.0,
                 num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth}: a WideResNet has depth 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=True)
        self.layer1 = self._stage(widths[1], n, dropout, stride=1)
        self.layer2 = self._stage(widths[2], n, dropout, stride=2)
        self.layer3 = self._stage(widths[3], n, dropout, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.9)  # as in the reference
        self.linear = nn.Linear(widths[3], num_classes)

    def _stage(self, planes: int, blocks: int, dropout: float, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(WideBasic(self.in_planes, planes, dropout, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)  # the reference's avg_pool2d(out, 8) on 32x32
        return self.linear(out.flatten(1))


def wrn28x10(num_classes: int, image_size: int = 32, *, dropout: float = 0.0) -> WideResNet:
    """WideResNet-28-10 (4 blocks per stage, widths 160/320/640), the SWA paper's
    WideResNet28x10: 36,489,290 parameters for 10 classes, 36,546,980 for 100. ``dropout``:
    the rate between a block's two convs (0 in the paper). Image sizes: multiples of 4 (32 is
    the reference's)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout}: must be in [0, 1)")
    return WideResNet(28, 10, dropout, num_classes)
