"""How the zoo's trained models are trained: a recipe (plain data, recorded in every export's manifest)
and the one loop that follows it.

Our own loop rather than a trainer library's (Lightning, transformers' Trainer): each model trains for
a few hundred to a few thousand steps on batches generated in memory, and the pieces deploykit needs
from the loop are few and specific: seeded batches so a cache miss reproduces the model, a hook after
each step (iterative pruning rewinds to a step's weights), and pruning masks that stay in force while
the weights under them train. A trainer's callbacks, checkpointing and device placement would be
larger than the loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Recipe:
    """What a trained zoo model was trained on and how: the record an artifact's manifest carries."""

    #: where the data comes from, in words (a package's text, a generated task and its sizes)
    data: str
    steps: int
    batch: int
    lr: float
    #: steps of linear warm-up before a cosine decay to `lr * final_lr_share`
    warmup: int = 0
    final_lr_share: float = 0.1
    #: gradient norm clipping (None: none)
    clip: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    #: seed of the batch order (the weights' initial seed is the spec's)
    data_seed: int = 1

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        """Learning rate of the 0-based `step`: warm-up, then cosine decay."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        share = self.final_lr_share + (1 - self.final_lr_share) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        return self.lr * share


Batch = Callable[["torch.Generator"], Any]
Loss = Callable[["nn.Module", Any], "torch.Tensor"]


def fit(model: "nn.Module", recipe: Recipe, batch: Batch, loss: Loss,
        after_step: Callable[[int], None] | None = None) -> None:
    """Train `model` in place for `recipe.steps` steps: `batch(generator)` draws a batch (the generator
    seeded with `recipe.data_seed`), `loss(model, batch)` scores it; `after_step(step)` (1-based) after
    each update. Pruning masks (`torch.nn.utils.prune`) stay in force: the masked weights get gradients
    through `weight_orig`, and the forward pass always multiplies by the mask."""
    import torch

    generator = torch.Generator().manual_seed(recipe.data_seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step)
        optimizer.zero_grad()
        value = loss(model, batch(generator))
        value.backward()
        if recipe.clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, recipe.clip)
        optimizer.step()
        if after_step is not None:
            after_step(step + 1)
    model.eval()
