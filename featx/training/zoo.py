"""Small CNNs for `featx scratch`: LeNet-5 (modern form), a small VGG-style net and a CIFAR-style ResNet-20.

They are the "no transfer" baselines that `featx compare` sets against pretrained features, so they follow
well-known designs rather than tuned inventions: LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling,
VGG's 3x3 conv stacks (Simonyan & Zisserman 2014) with BatchNorm and dropout, and ResNet-20 from
He et al. 2016, section 4.2 (3 stages of 3 basic blocks, 16/32/64 channels), which was designed for 32x32 images.
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches

import torch
from torch import nn

from ..errors import UsageError


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pool; input size S gives a 16 x ((S-4)/2-4)/2 squared feature map."""

    def __init__(self, num_classes: int, image_size: int = 32):
        super().__init__()
        if image_size < 16:
            raise UsageError(f"lenet5 needs --image-size >= 16, got {image_size}")
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallVGG(nn.Module):
    """Three VGG stages of two 3x3 conv-BN-ReLU layers (64/128/256 channels), max-pool, global pool, dropout."""

    def __init__(self, num_classes: int, image_size: int = 64, widths=(64, 128, 256), dropout: float = 0.3):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers += _conv_bn(cin, w) + _conv_bn(w, w) + [nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        # global average pooling instead of VGG's 4096-wide FC layers: 100x fewer parameters, works at any size
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            # option B (1x1 projection) rather than the paper's zero-padding shortcut: simpler, same accuracy
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet-(6n+2): a 3x3 stem, then 3 stages of n basic blocks (16/32/64 channels)."""

    def __init__(self, num_classes: int, image_size: int = 32, depth: int = 20, widths=(16, 32, 64)):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(3, widths[0]))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # zero-init the last BN of each block: every block starts as identity, which trains faster (Goyal et al. 2017)
        for b in blocks:
            nn.init.zeros_(b.bn2.weight)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)))


@dataclass(frozen=True)
class Arch:
    name: str
    cls: type
    image_size: int  # default --image-size for this net
    description: str
    # Train in channels_last on the CPU: measured faster on the idle 2-core machine for every net here (vgg_small
    # and resnet20 1.40x, lenet5 1.24x; benchmarks/bench_cpu_training.py, BENCHMARKS.md). A net that measures slower
    # sets it False.
    cpu_channels_last: bool = True


ARCHS = {
    a.name: a
    for a in (
        Arch("lenet5", LeNet5, 32, "LeNet-5 (ReLU, max-pool), 62k parameters at 10 classes; digits, tiny icons"),
        Arch("vgg_small", SmallVGG, 64, "VGG-style 3x3 conv stacks with BatchNorm and dropout, 1.1M parameters"),
        Arch("resnet20", ResNetCifar, 32, "CIFAR-style ResNet-20 (3 stages x 3 basic blocks), 0.27M parameters"),
    )
}


def list_archs() -> list:
    return list(ARCHS)


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        close = get_close_matches(name, list(ARCHS), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UsageError(f"unknown architecture {name!r}{hint} (choose from {', '.join(ARCHS)})")
    return ARCHS[name]


def build(name: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A freshly initialised network (seed torch before calling for a reproducible init)."""
    arch = get_arch(name)
    return arch.cls(num_classes=num_classes, image_size=image_size or arch.image_size)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
