"""The UCI handwritten digits as a small real dataset: train, evaluate, rewind.

The digits (1797 images, 8x8, grey levels 0..16, 10 classes) ship beside this file as `digits.npz`
(45 KB): the copy scikit-learn distributes as `load_digits`, saved once as uint8 arrays so that
scikit-learn and scipy (~160 MB) need not be installed to train two small models; no download is
needed. Source: UCI ML "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak, 1998; CC BY
4.0). They are upsampled to MNIST's 28x28 so the LeNets keep the shapes of the LeNet/ResNet study. A fixed
permutation splits them 1437 train / 360 test.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA_FILE = Path(__file__).with_name("digits.npz")
TRAIN_SIZE = 1437
BATCH = 64


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images (N, 1, 28, 28) in [0, 1]."""
    with np.load(DATA_FILE) as data:  # plain arrays: no pickle is read
        raw, target = data["images"], data["target"]
    images = torch.tensor(raw, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.tensor(target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    return images[:TRAIN_SIZE], labels[:TRAIN_SIZE], images[TRAIN_SIZE:], labels[TRAIN_SIZE:]


def train_on_digits(
    model: nn.Module,
    *,
    epochs: int,
    lr: float = 1e-3,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Adam on the training split, shuffled by a seeded generator; `after_step(step)` after each update.

    Pruning masks (`torch.nn.utils.prune`) stay in force during training: masked weights get gradients
    through `weight_orig`, but the forward pass always multiplies by the mask.
    """
    x, y, _, _ = digits()
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    step = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(BATCH):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step)
    model.eval()


def calibration_batches(count: int) -> list[tuple[torch.Tensor]]:
    """Up to `count` batches of training images: what static quantization calibrates on."""
    images = digits()[0]
    return [(images[i:i + BATCH],) for i in range(0, min(count * BATCH, len(images)), BATCH)]


def labelled_batches(count: int) -> list[tuple[tuple[torch.Tensor], torch.Tensor]]:
    """Up to `count` labelled training batches: what data-aware pruners (snip, grasp) score on."""
    images, labels = digits()[:2]
    return [((images[i:i + BATCH],), labels[i:i + BATCH]) for i in range(0, min(count * BATCH, len(labels)), BATCH)]


def accuracy_on_digits(model: nn.Module) -> dict[str, float]:
    _, _, x, y = digits()
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    return {"accuracy": float((predicted == y).float().mean())}
