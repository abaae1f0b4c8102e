"""A model brought by a user, as deploykit expects one: an entry point returning a ModelSpec.

    deploykit export --model models/examples/small_cnn.py:build --prune l1-structured:0.5 \
        --form dense-shrunk --out small-cnn

Any of these return values works: a `ModelSpec` (names, dynamic axes and outputs spelled out, as
here), `(model, example_inputs)`, or a bare `nn.Module` with `--input-spec x:batch,3,32,32`.
"""

import torch
from torch import nn

from deploykit.model.spec import InputSpec, ModelSpec


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def build() -> ModelSpec:
    """A small CIFAR-shaped CNN: 3x32x32 images to 10 logits (random weights, seeded by deploykit)."""
    return ModelSpec(name="small-cnn", build=_net, inputs=(InputSpec("image", ("batch", 3, 32, 32)),),
                     outputs=("logits",), description="small CIFAR-shaped CNN (example entry point)")


if __name__ == "__main__":  # a quick look without deploykit's CLI
    print(build().make()(torch.zeros(1, 3, 32, 32)).shape)
