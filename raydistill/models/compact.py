"""Smaller networks: CIFAR MobileNetV2, VGG-16 with BatchNorm, a tiny CNN for quick runs, and TRADES' MNIST CNN."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when stride is 1."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.stride = stride
        self.conv1, self.bn1 = nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3, self.bn3 = nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return (out + self.shortcut(x)) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: stride-1 stem and stride 1 in the second stage (8x total downsampling)."""

    # (expansion, out channels, blocks, first stride)
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        blocks, cin = [], 32
        for expansion, cout, n, stride in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, expansion, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class VGG(nn.Module):
    """VGG with BatchNorm; ``features`` + a single ``classifier`` layer (the CIFAR convention).

    Max-pools use ceil_mode so inputs smaller than 32x32 stop shrinking at 1x1 instead of failing.
    """

    CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

    def __init__(self, cfg: list, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class SmallCNN(nn.Module):
    """Two conv blocks (32 and 64 channels, each two 3x3 convs + BN + ReLU + 2x2 max-pool) and an MLP head.

    Features are average-pooled to 2x2 (a no-op for 8x8 inputs), so any input from 8x8 up works.
    Trains to >95% test accuracy on 8x8 digits in seconds on a CPU.
    """

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, 32), block(32, 64))
        self.head = nn.Sequential(nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 2).flatten(1))


class TradesSmallCNN(nn.Module):
    """TRADES' network for MNIST (yaodongyu/TRADES, models/small_cnn.py; also Madry et al.'s MNIST family):
    four 3x3 convolutions without padding (32, 32, max-pool, 64, 64, max-pool), then fully connected layers
    of 200, 200 and the classes, ReLU throughout, dropout 0.5 after the first fully connected layer, no
    BatchNorm; TRADES' initialisation (Kaiming-normal convolutions, zero biases, a zero last layer).

    The module and parameter names are TRADES' own (``feature_extractor.conv1`` ... ``classifier.fc3``), so a
    state_dict saved by TRADES' code (e.g. its released ``model_mnist_smallcnn.pt``) loads as it is. ReLUs are not
    in place (TRADES': in place; the same function, and input gradients for attacks stay valid). The features
    are average-pooled to 4x4, which at 28x28 (MNIST, Fashion-MNIST) is the identity: there it is TRADES'
    network exactly. Inputs from 16x16 up work; smaller ones (digits' 8x8) are refused (registered with min_side=16).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, drop: float = 0.5):
        super().__init__()
        from collections import OrderedDict

        self.feature_extractor = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3)), ("relu2", nn.ReLU()), ("maxpool1", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Conv2d(32, 64, 3)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", nn.ReLU()), ("maxpool2", nn.MaxPool2d(2, 2))]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(64 * 4 * 4, 200)), ("relu1", nn.ReLU()), ("drop", nn.Dropout(drop)),
            ("fc2", nn.Linear(200, 200)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(200, num_classes))]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.fc3.weight)
        nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.feature_extractor(x), 4).flatten(1))
