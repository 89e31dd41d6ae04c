"""torchvision-style classifiers written for the tests (torchvision cannot be imported here):
each keeps the ReLU pattern of its family, and ``RELU_SITES`` says how many ReLU calls it makes.

Their forwards have what real code has: type checks (DenseNet), mode-dependent outputs
(Inception's auxiliary head), attribute branches (a ResNet block's ``downsample``), modules
called twice, functional ReLUs, in-place ReLUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet's block: one ``nn.ReLU`` module called at two places."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0]),
                                    BasicBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2),
                                    BasicBlock(widths[1], widths[1]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


class DenseLayer(nn.Module):
    """DenseNet's layer: a type check on its input, which a trace would fix to one case."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, input):  # noqa: A002 - torchvision's name; a Tensor or a list of them
        features = [input] if isinstance(input, Tensor) else input
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))


class DenseNet(nn.Module):
    """The final ReLU is ``F.relu(..., inplace=True)`` in the model's own forward."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(inplace=True))
        self.dense1 = DenseLayer(8, 4)
        self.dense2 = DenseLayer(12, 4)
        self.norm5 = nn.BatchNorm2d(16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        features = torch.cat([features, self.dense1(features)], 1)
        features = torch.cat([features, self.dense2([features])], 1)
        out = F.adaptive_avg_pool2d(F.relu(self.norm5(features), inplace=True), (1, 1))
        return self.classifier(torch.flatten(out, 1))


class BasicConv2d(nn.Module):
    """Inception's and GoogLeNet's convolution: a functional in-place ReLU."""

    def __init__(self, cin: int, cout: int, **conv: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """An auxiliary head that only runs, and is only returned, in training mode."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = BasicConv2d(3, 8, kernel_size=3, padding=1)
        self.branch1x1 = BasicConv2d(8, 4, kernel_size=1)
        self.branch3x3 = BasicConv2d(8, 4, kernel_size=3, padding=1)
        self.aux = nn.Linear(8, num_classes)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.stem(x)
        aux = self.aux(x.mean((2, 3))) if self.training else None
        x = torch.cat([self.branch1x1(x), self.branch3x3(x)], 1)
        x = self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        return (x, aux) if aux is not None else x


class Fire(nn.Module):
    """SqueezeNet's module: three ``nn.ReLU`` modules, each called once."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(inplace=True),
                                      Fire(8, 4, 8), Fire(16, 4, 8))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class VGG(nn.Module):
    """ReLU modules inside ``nn.Sequential`` stacks, features and classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(16, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "resnet": ResNet, "densenet": DenseNet, "inception": Inception, "squeezenet": SqueezeNet,
    "vgg": VGG,
}
RELU_SITES = {"resnet": 9, "densenet": 4, "inception": 3, "squeezenet": 8, "vgg": 3}
