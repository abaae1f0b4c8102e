"""A user's CNN with BatchNorm and a residual connection, as an entry point (no zoo model is this one).

    deploykit export --model models/examples/residual_cnn.py:build --prune l1-structured:0.5 \
        --form dense-shrunk --out residual-cnn

Structured pruning must keep the two branches that meet at the addition the same width: the
dependency graph couples them into one group, so they lose the same channels.
"""

import torch
from torch import nn

from deploykit.model.spec import InputSpec, ModelSpec


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 48, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        x = torch.relu(x + self.block(x))  # the residual: stem and block outputs are one channel group
        return self.head(self.down(x))


def build() -> ModelSpec:
    """3x32x32 images to 10 logits (random weights, seeded by deploykit)."""
    return ModelSpec(name="residual-cnn", build=ResidualCNN, inputs=(InputSpec("image", ("batch", 3, 32, 32)),),
                     outputs=("logits",), description="CNN with BatchNorm and a residual block (example entry point)")


if __name__ == "__main__":  # a quick look without deploykit's CLI
    print(build().make()(torch.zeros(1, 3, 32, 32)).shape)
