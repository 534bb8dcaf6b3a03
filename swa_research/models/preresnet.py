"""PreResNet-110 and PreResNet-164 for CIFAR, as in the SWA paper's code (timgaripov/swa,
``models/preresnet.py``, itself from bearpaw/pytorch-classification).

Layout: a 3x3 conv to 16 channels, three stages of pre-activation residual blocks (16, 32, 64
planes; stride 2 at the first block of stages 2 and 3), then BN, ReLU, global average pooling
and a linear layer. As in the reference, the block type follows from the depth: bottleneck
blocks with expansion 4 from depth 44 on (depth = 9n + 2), basic blocks below (depth = 6n + 2).
Both of the paper's networks are therefore bottleneck networks: PreResNet-110 with n = 12
blocks per stage, PreResNet-164 with n = 18. A projection shortcut (a bias-free 1x1 conv,
applied to the block's raw input) appears where the stride or the channel count changes.

Initialisation as in the reference: conv weights N(0, sqrt(2 / (k * k * out_channels))), BN
weight 1 and bias 0, the linear layer PyTorch's default. The reference pools with
``AvgPool2d(8)``, which fits 32x32 inputs only; here the pooling is global (adaptive), which is
the same operation, with the same parameters and outputs, on 32x32 inputs, and also accepts any
image size that is a multiple of 4 (the network's total downsampling). Module names follow the
reference, so its state dicts load as they are.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 to 4x planes, plus the
    shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class PreResNet(nn.Module):
    """The CIFAR PreResNet of the given depth: basic blocks below depth 44, bottlenecks from
    44 on."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck]
        if depth >= 44:
            if (depth - 2) % 9:
                raise ValueError(f"depth={depth}: a bottleneck PreResNet has depth 9n + 2")
            block, n = Bottleneck, (depth - 2) // 9
        else:
            if (depth - 2) % 6:
                raise ValueError(f"depth={depth}: a basic-block PreResNet has depth 6n + 2")
            block, n = BasicBlock, (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._stage(block, 16, n, stride=1)
        self.layer2 = self._stage(block, 32, n, stride=2)
        self.layer3 = self._stage(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(8) on 32x32 inputs
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
               stride: int) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_planes != out_planes:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, out_planes, kernel_size=1,
                                                 stride=stride, bias=False))
        layers: list[nn.Module] = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = out_planes
        layers += [block(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))  # 32x32, 16x16, 8x8 for 32x32 inputs
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.flatten(1))


def preresnet110(num_classes: int, image_size: int = 32) -> PreResNet:
    """PreResNet-110 as the SWA paper's code builds it: bottleneck blocks, 12 per stage (the
    reference switches to bottlenecks from depth 44 on, so its PreResNet110 is not He et al.'s
    basic-block ResNet-110 with 1.7M parameters): 1,146,842 parameters for 10 classes,
    1,169,972 for 100. Image sizes: multiples of 4 (32 is the reference's)."""
    return PreResNet(110, num_classes)


def preresnet164(num_classes: int, image_size: int = 32) -> PreResNet:
    """PreResNet-164 (bottleneck blocks, 18 per stage), the SWA paper's PreResNet164:
    1,703,258 parameters for 10 classes, 1,726,388 for 100. Image sizes: multiples of 4 (32 is
    the reference's)."""
    return PreResNet(164, num_classes)
