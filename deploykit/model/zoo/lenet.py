"""LeNets of the LeNet/ResNet study, trained on the UCI handwritten digits (shipped with deploykit) upsampled to MNIST's 28x28."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from deploykit.model.spec import InputSpec, register_model
from deploykit.model.zoo.digits import accuracy_on_digits, calibration_batches, labelled_batches, train_on_digits

IMAGE = InputSpec("image", ("batch", 1, 28, 28))


class LeNet300100(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(image.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(image)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


@register_model("lenet-300-100", inputs=[IMAGE], outputs=["logits"],
                train=partial(train_on_digits, epochs=20), evaluate=accuracy_on_digits, calibration=calibration_batches,
                data=labelled_batches)
def lenet_300_100() -> nn.Module:
    """LeNet-300-100 (LeNet/ResNet study): 784 -> 300 -> 100 -> 10, 266,610 parameters; trained on digits."""
    return LeNet300100()


@register_model("lenet-5", inputs=[IMAGE], outputs=["logits"],
                train=partial(train_on_digits, epochs=20), evaluate=accuracy_on_digits, calibration=calibration_batches,
                data=labelled_batches)
def lenet_5() -> nn.Module:
    """LeNet-5 (LeNet/ResNet study): conv 6@5x5, conv 16@5x5, 400 -> 120 -> 84 -> 10, 61,706 parameters; trained on digits."""
    return LeNet5()
