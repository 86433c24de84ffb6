"""A small pre-activation ResNet for tests and benchmarks of ResIST (no torchvision or timm needed).

Laid out like torchvision's ResNet (``stem``, ``layer1..layer4``, ``head``), so :class:`~lightning_moshpit.ResIST`
finds its blocks on its own. Each :class:`PreActBlock` computes ``x + F(x)`` (He et al., "Identity Mappings in Deep
Residual Networks"); the first block of a stage with a stride or a channel change has a ``downsample`` shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn


class PreActBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))``, with a 1x1 ``downsample`` shortcut when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """A pre-activation ResNet for small images: ``depths`` blocks per stage, ``widths`` channels per stage."""

    def __init__(
        self,
        depths: Sequence[int] = (1, 1, 6, 1),
        widths: Sequence[int] = (8, 16, 32, 32),
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"`depths` and `widths` need 4 stages each, got {list(depths)} and {list(widths)}")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        channels = widths[0]
        for stage, (depth, width) in enumerate(zip(depths, widths), start=1):
            stride = 1 if stage == 1 else 2
            blocks = [PreActBlock(channels, width, stride)] + [PreActBlock(width, width) for _ in range(depth - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            channels = width
        self.norm = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.relu(self.norm(x)).mean(dim=(2, 3))
        return self.head(x)
