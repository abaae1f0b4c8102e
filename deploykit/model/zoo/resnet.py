"""CIFAR-10 ResNets of the LeNet/ResNet study (3x3 stem, no max-pool, 32x32 inputs).

Written here rather than taken from torchvision, whose ResNets are the ImageNet variants (7x7 stem and
max-pool) and which would add a dependency tied to the torch version.
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.model.spec import InputSpec, register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _shortcut(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        stages = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(inplanes, planes, 2 if (j == 0 and i > 0) else 1))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


CIFAR = InputSpec("image", ("batch", 3, 32, 32))


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    # Freshly built BatchNorms hold mean 0 / variance 1 and scale 1 / shift 0: with random
    # weights that makes every channel look alike. Give them varied statistics, as a trained
    # network would have, so pruning and parity are exercised on realistic values.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@register_model("resnet18", inputs=[CIFAR], outputs=["logits"])
def resnet18() -> nn.Module:
    """ResNet-18, CIFAR-10 variant (LeNet/ResNet study): BasicBlock [2, 2, 2, 2], 11,173,962 parameters."""
    return _randomise_batchnorm(ResNet(BasicBlock, [2, 2, 2, 2]))


@register_model("resnet50", inputs=[CIFAR], outputs=["logits"])
def resnet50() -> nn.Module:
    """ResNet-50, CIFAR-10 variant (LeNet/ResNet study): Bottleneck [3, 4, 6, 3], 23,520,842 parameters."""
    return _randomise_batchnorm(ResNet(Bottleneck, [3, 4, 6, 3]))
