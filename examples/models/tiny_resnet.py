"""A model plugin in one file: ``tiny_resnet``, a pre-activation ResNet of 3 stages and 6 blocks (~0.3M parameters).

    python -m raydistill.train pgd_at --plugin examples/models/tiny_resnet.py --student tiny_resnet --dataset digits

A model is a factory ``factory(num_classes, in_channels) -> nn.Module`` registered under its name with
``raydistill.extend.register_model`` (into the MODELS registry, where the built-ins are); every command then takes
the name wherever it takes an architecture (``--student``, ``--peer``, ``--teacher-arch``, a study's
``student:``). What the network must do, as the built-in ones do:

* take images in [0, 1] shaped (N, C, H, W), C = ``in_channels`` (no normalisation outside the network: the
  threat model is in pixel scale, so any normalisation belongs inside ``forward``);
* return logits (N, num_classes), never probabilities;
* use no in-place operation on a tensor the attack differentiates through (``nn.ReLU(inplace=True)`` on a
  block's input breaks input gradients), and BatchNorm layers only as ``nn.BatchNorm2d`` (the attacks switch
  them between train() and eval(), ``--fold-bn`` folds them).

Input sizes: any. The stem keeps the size, two stages halve it (rounding up) and an adaptive average pool ends
the features, so 8x8 (digits), 28x28, 32x32 (CIFAR) and 64x64 (TinyImageNet) images all work: it registers
with ``input_sizes=None``. A network built for one size (a flattening head, a fixed pooling window) declares
the sizes it accepts, e.g. ``input_sizes=[32]`` or ``[(64, 48)]``, and a run on other images is refused before
it starts.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.extend import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, with a 1x1 projection on the shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class TinyResNet(nn.Module):
    """Widths 16, 32, 64; two blocks per stage; strides 1, 2, 2."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks += [PreActBlock(cin, width, 1 if i == 0 else 2), PreActBlock(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


register_model("tiny_resnet", TinyResNet, input_sizes=None)  # any size (adaptive pooling)
