"""The sample models' architectures, importable for ``--arch samples.architectures:digits_cnn``.

``DigitsCNN`` reuses one ``nn.ReLU`` at two call sites in each residual block, as torchvision's
ResNet blocks do: a retrofit must give each call its own parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then the same ReLU module again."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DigitsCNN(nn.Module):
    """A small ResNet-style classifier for 1x8x8 digit images."""

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.layer1 = ResidualBlock(channels)
        self.layer2 = ResidualBlock(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DigitsMLP(nn.Module):
    """A two-hidden-layer perceptron on the flattened 64 pixels, ReLU spelled functionally."""

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.out(nn.functional.relu(self.fc2(x)))


def digits_cnn() -> DigitsCNN:
    return DigitsCNN()


def digits_mlp() -> DigitsMLP:
    return DigitsMLP()
