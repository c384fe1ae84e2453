"""WideResNet (Zagoruyko & Komodakis) as used by TRADES and RobustBench.

Parameter names match those checkpoints: ``conv1``, ``block1.layer.0.bn1`` / ``.conv1`` / ``.bn2`` /
``.conv2`` / ``.convShortcut``, ..., ``block3``, ``bn1``, ``fc``. Inputs in [0, 1], no normalisation.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError


class WideBlock(nn.Module):
    """Pre-activation block; when the width changes the 1x1 shortcut takes the activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A stage of ``n`` WideBlocks held in ``.layer`` (the checkpoints' naming)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: (depth - 4) / 6 blocks per stage, stage widths 16k/32k/64k."""

    # TRADES' WideResNet also stores an unused ``sub_block1``; its keys are dropped when loading.
    IGNORED_KEY_PREFIXES = ("sub_block1.",)

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise UsageError(f"WideResNet depth must be 6n+4 (e.g. 28, 34, 70), not {depth}")
        n, k = (depth - 4) // 6, widen_factor
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
