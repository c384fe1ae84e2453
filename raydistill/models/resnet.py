"""CIFAR-style ResNet-18/34 and PreAct ResNet-18.

Parameter names follow the widely shared CIFAR ResNet code used by the Madry / TRADES /
"overfitting in adversarial training" checkpoints (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.shortcut.0``, ..., ``linear``; PreAct: ``layer1.0.bn1``, ..., ``bn``, ``linear``).
Inputs are expected in [0, 1] with no normalisation layer.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-bn-relu-conv-bn, plus (projected) input, relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block: bn-relu-conv-bn-relu-conv, plus input (projected after bn-relu)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """3x3 stem (no max-pool), four stages of 64/128/256/512 channels, global average pool, linear."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int,
                 in_channels: int = 3, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.conv1 = conv3x3(in_channels, 64)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


def resnet34(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


def preact_resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_channels, preact=True)
