"""English text that ships with Python, for training and scoring the zoo's small language models.

The text is the Python language reference as the standard library ships it for `help()`
(`pydoc_data.topics`: 79 topics, about 465,000 characters of prose and grammar); nothing is downloaded.
Topics in sorted order; every tenth is held out for evaluation. It is tokenized by a byte-level BPE
trained on the training topics with Hugging Face `tokenizers` (installed with transformers, the `hf`
extra) to the model's vocabulary size: training is deterministic, so a vocabulary size always means
the same token ids for one Python release (the trained weights' cache key names the release).

Quality of a language model on it: perplexity and next-token accuracy (teacher-forced top-1) over the
held-out topics, in windows of the model's context.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from deploykit.core.extras import require
from deploykit.model.calibration import CALIBRATION_SEED
from deploykit.model.spec import DEFAULT_LENGTH

if TYPE_CHECKING:
    from torch import nn

CORPUS = "the Python language reference shipped with Python (pydoc_data.topics), every tenth topic held out"
HELD_OUT_EVERY = 10
#: held-out windows a language model's quality is averaged over
EVAL_WINDOWS = 32


def _topics() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    train = [topics[k] for i, k in enumerate(keys) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [topics[k] for i, k in enumerate(keys) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


@lru_cache(maxsize=4)
def tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on the training topics (deterministic)."""
    require("tokenizers", "a trained language model")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_topics()[0], trainer=trainer)
    return tok


@lru_cache(maxsize=4)
def token_ids(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training ids, held-out ids), each topic's tokens one after another."""
    tok = tokenizer(vocab)
    train, held = _topics()
    return tuple(torch.tensor([i for text in texts for i in tok.encode(text).ids], dtype=torch.int64)
                 for texts in (train, held))


def windows(ids: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of `length` tokens from `ids`: (count, length)."""
    starts = torch.randint(0, len(ids) - length, (count,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def next_token_loss(model: "nn.Module", batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def language_model_quality(model: "nn.Module", vocab: int, context: int) -> dict[str, float]:
    """Perplexity and next-token accuracy on EVAL_WINDOWS consecutive held-out windows of `context` tokens."""
    held = token_ids(vocab)[1]
    count = min(EVAL_WINDOWS, len(held) // context)
    batch = held[:count * context].view(count, context)
    with torch.no_grad():
        logits = model(batch)[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return {"perplexity": float(torch.exp(nll)), "token_accuracy": float(accuracy)}


def training_windows(vocab: int, length: int, items: int = 16):
    """A calibration hook (`ModelSpec.calibration`): `count` batches of `items` windows of `length` tokens
    of the training text, the same draw every time."""

    def calibration(count: int) -> list[tuple[torch.Tensor]]:
        generator = torch.Generator().manual_seed(CALIBRATION_SEED)
        train = token_ids(vocab)[0]
        return [(windows(train, items, length, generator),) for _ in range(count)]

    return calibration


def held_out_prompts(vocab: int, length: bool = False):
    """A sampler of prompts, windows of held-out text (what a benchmark feeds): of DEFAULT_LENGTH tokens,
    or with `length`, a sampler that takes the length as its third argument."""

    def sample(batch: int, generator: torch.Generator, tokens: int = DEFAULT_LENGTH) -> tuple[torch.Tensor]:
        return (windows(token_ids(vocab)[1], batch, tokens, generator),)

    return sample if length else (lambda batch, generator: sample(batch, generator))
