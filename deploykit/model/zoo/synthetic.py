"""Generated tasks with known answers, for the zoo models whose datasets do not ship in a package
(SST-2, AG News, Multi30k, an ESPnet speech-translation corpus). Each is learnable, has held-out
examples and references, and is seeded: a task's parameters always mean the same data.

- `TopicText`: labelled "sentences" of word ids. Words come from a Zipf-distributed background
  vocabulary shared by every class; each class has its own cue words, and each word of a sentence is
  a cue of its class with probability `cue_rate`. Some labels are flipped (`label_noise`), and some
  sentences draw no cue at all, so accuracy has a ceiling below 1 that a trained model approaches and a
  pruned one can fall from (what the SST-2 and AG News studies measure).
- `TranslationTask`: source sentences of Zipf-distributed word ids; the reference translation maps each
  word through a fixed dictionary into another token space and reverses every run of `reorder` words, so a
  model must align (attend) rather than copy position by position. BLEU against the reference means
  what it means for a real pair of languages. Speech translation renders the source as features: each
  source word is a fixed random 80-dimensional vector held for a random number of 10 ms frames, with
  noise (`SpeechRendering`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch
import torch.nn.functional as F

from deploykit.core.quality import bleu
from deploykit.model.training import fit


def _zipf(count: int, exponent: float = 1.0) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, count + 1, dtype=torch.float64) ** exponent
    return weights / weights.sum()


@dataclass(frozen=True)
class TopicText:
    """Labelled word-id sentences; ids 0..vocab-1 (0 is never drawn: it can pad)."""

    vocab: int
    classes: int
    length: int
    cue_words: int = 40
    cue_rate: float = 0.12
    label_noise: float = 0.05
    seed: int = 0

    @cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        words = torch.randperm(self.vocab - 1, generator=g) + 1
        # cues from the background's rare end: a cue that is also a frequent background word says little
        cues = words[-self.classes * self.cue_words:].view(self.classes, self.cue_words)
        return words, cues

    def describe(self) -> str:
        return (f"generated topic text: {self.classes} classes, vocabulary {self.vocab}, {self.length} words a "
                f"sentence, {self.cue_words} cue words per class at rate {self.cue_rate}, "
                f"{self.label_noise:.0%} labels flipped (seed {self.seed})")

    def sample(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(word ids (count, length), labels (count,)) for a split's `seed`."""
        words, cues = self._tables
        g = torch.Generator().manual_seed(10_000 + seed)
        labels = torch.randint(0, self.classes, (count,), generator=g)
        background = words[torch.multinomial(_zipf(len(words)), count * self.length, replacement=True,
                                              generator=g)].view(count, self.length)
        cue = cues[labels.unsqueeze(1), torch.randint(0, self.cue_words, (count, self.length), generator=g)]
        is_cue = torch.rand(count, self.length, generator=g) < self.cue_rate
        flipped = torch.rand(count, generator=g) < self.label_noise
        shown = torch.where(flipped, (labels + torch.randint(1, self.classes, (count,), generator=g)) % self.classes,
                            labels)
        return torch.where(is_cue, cue, background), shown


#: token ids every translation vocabulary reserves
PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 3


@dataclass(frozen=True)
class TranslationTask:
    """Source sentences over `src_words` word ids, translated into `tgt_words` target ids."""

    src_words: int
    tgt_words: int
    reorder: int = 3
    seed: int = 0

    @cached_property
    def dictionary(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, self.tgt_words, (self.src_words,), generator=g)

    def describe(self) -> str:
        order = f"every {self.reorder} words reversed" if self.reorder > 1 else "in source order"
        return (f"generated translation: {self.src_words} source words to {self.tgt_words} target words by a "
                f"fixed dictionary, {order} (seed {self.seed})")

    def sentence(self, length: int, g: torch.Generator) -> torch.Tensor:
        """`length` source word indices (0-based, Zipf-distributed)."""
        return torch.multinomial(_zipf(self.src_words, 0.8), length, replacement=True, generator=g)

    def translate(self, words: torch.Tensor) -> torch.Tensor:
        """The reference: each word through the dictionary, every run of `reorder` words reversed."""
        target = self.dictionary[words]
        return torch.cat([chunk.flip(0) for chunk in target.split(self.reorder)])


@dataclass(frozen=True)
class SpeechRendering:
    """Source words as feature frames: word i is `prototypes[i]` held for min_frames..max_frames frames."""

    words: int
    feats: int = 80
    min_frames: int = 6
    max_frames: int = 10
    noise: float = 0.4
    seed: int = 0

    @cached_property
    def prototypes(self) -> torch.Tensor:
        return torch.randn(self.words, self.feats, generator=torch.Generator().manual_seed(self.seed + 1))

    def describe(self) -> str:
        return (f"each source word a fixed random {self.feats}-dim vector held {self.min_frames}-"
                f"{self.max_frames} frames, noise {self.noise}")

    def render(self, words: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(frames, feats) for one sentence."""
        durations = torch.randint(self.min_frames, self.max_frames + 1, (len(words),), generator=g)
        frames = self.prototypes[words].repeat_interleave(durations, dim=0)
        return frames + self.noise * torch.randn(frames.shape, generator=g)

    def words_for(self, frames: int) -> int:
        """Source words whose rendering takes about `frames` frames."""
        return max(1, round(2 * frames / (self.min_frames + self.max_frames)))


def bleu_of_ids(hypotheses: list[list[int]], references: list[list[int]]) -> float:
    """Corpus BLEU (sacrebleu, its defaults) of token-id sequences written as words."""
    def words(ids):
        return " ".join(f"w{i}" for i in ids)

    return bleu([words(h) for h in hypotheses], [words(r) for r in references]).score


@dataclass(frozen=True)
class TopicClassification:
    """A `TopicText` task as a classifier's data: train and test splits, its inputs made by `encode`
    (word ids -> what the model takes: a bag of words, the ids themselves), and the hooks a trained
    zoo spec needs (train, evaluate, data, calibration, sampler)."""

    text: TopicText
    train_size: int
    test_size: int
    #: "ids" (the word ids as they are) or "bag" (a 0/1 vector over the vocabulary)
    encoding: str = "ids"

    def describe(self) -> str:
        return f"{self.text.describe()}; {self.train_size} train / {self.test_size} test"

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        if self.encoding == "ids":
            return ids
        bag = torch.zeros(len(ids), self.text.vocab)
        return bag.scatter_(1, ids, 1.0)

    @cached_property
    def splits(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        return self.text.sample(self.train_size, seed=0), self.text.sample(self.test_size, seed=1)

    def train(self, model, *, recipe, after_step=None) -> None:
        ids, labels = self.splits[0]

        def batch(g: torch.Generator):
            chosen = torch.randint(0, len(labels), (recipe.batch,), generator=g)
            return self.encode(ids[chosen]), labels[chosen]

        fit(model, recipe, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]), after_step)

    def accuracy(self, model) -> dict[str, float]:
        ids, labels = self.splits[1]
        with torch.no_grad():
            predicted = torch.cat([model(self.encode(chunk)).argmax(-1) for chunk in ids.split(512)])
        return {"accuracy": float((predicted == labels).float().mean())}

    def labelled_batches(self, count: int, size: int = 64) -> list[tuple[tuple[torch.Tensor], torch.Tensor]]:
        ids, labels = self.splits[0]
        return [((self.encode(ids[i:i + size]),), labels[i:i + size])
                for i in range(0, min(count * size, len(labels)), size)]

    def calibration(self, count: int) -> list[tuple[torch.Tensor]]:
        return [inputs for inputs, _ in self.labelled_batches(count)]

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        ids = self.splits[1][0]
        return (self.encode(ids[torch.randint(0, len(ids), (batch,), generator=generator)]),)

    def spec_fields(self, recipe) -> dict:
        """The trained spec's hooks (and the recipe they follow)."""
        return dict(train=partial(self.train, recipe=recipe), evaluate=self.accuracy, data=self.labelled_batches,
                    calibration=self.calibration, sampler=self.sample, recipe=recipe)
