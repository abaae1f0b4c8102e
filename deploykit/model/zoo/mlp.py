"""Multi-layer perceptrons from the pruning studies."""

from __future__ import annotations

import torch
from torch import nn

from deploykit.model.spec import InputSpec, register_model
from deploykit.model.training import Recipe
from deploykit.model.zoo.synthetic import TopicClassification, TopicText

SST2_VOCAB = 5000
SST2_HIDDEN = 256
#: expected words present in one bag-of-words vector (a short movie-review sentence)
SST2_WORDS_PER_SENTENCE = 20


class BagOfWordsMLP(nn.Module):
    """Bag-of-words classifier: `mlp` is a Sequential so parameters are named `mlp.0.weight`, ..."""

    def __init__(self, vocab: int, hidden: int, depth: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = vocab
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, bow: torch.Tensor) -> torch.Tensor:
        return self.mlp(bow)


def _sample_bag_of_words(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    # Real inputs are sparse non-negative word counts, not Gaussian noise: sample ~20 words a sentence.
    present = torch.rand(batch_size, SST2_VOCAB, generator=generator) < SST2_WORDS_PER_SENTENCE / SST2_VOCAB
    return (present.to(torch.float32),)


@register_model(
    "mlp-sst2",
    inputs=[InputSpec("bow", ("batch", SST2_VOCAB))],
    outputs=["logits"],
    sampler=_sample_bag_of_words,
)
def mlp_sst2() -> nn.Module:
    """SST-2 bag-of-words MLP (SST-2 study): 5000 -> 256 -> 256 -> 256 -> 2, ReLU, 1,412,354 parameters."""
    return BagOfWordsMLP(SST2_VOCAB, SST2_HIDDEN, depth=3, classes=2)


@register_model("linear-stack-4096", inputs=[InputSpec("x", ("batch", 4096))], outputs=["y"])
def linear_stack_4096() -> nn.Module:
    """Linear stack for sparse-kernel crossover benchmarks: 4096 -> 4096 -> 4096 -> 10, ReLU, 33,603,594 parameters."""
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


SST2_TASK = TopicClassification(TopicText(vocab=SST2_VOCAB, classes=2, length=SST2_WORDS_PER_SENTENCE),
                                train_size=20_000, test_size=2_000, encoding="bag")


@register_model(
    "mlp-sst2-trained",
    inputs=[InputSpec("bow", ("batch", SST2_VOCAB))],
    outputs=["logits"],
    **SST2_TASK.spec_fields(Recipe(data=SST2_TASK.describe(), steps=1500, batch=64, lr=1e-3, warmup=50)),
)
def mlp_sst2_trained() -> nn.Module:
    """mlp-sst2 (5000 -> 256 -> 256 -> 256 -> 2) trained on generated two-class bag-of-words text (1-2 minutes on 2 cores)."""
    return mlp_sst2()
