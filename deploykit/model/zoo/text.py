"""Text models of the AG News / Multi30k study: random weights at the study's sizes (neither dataset
ships in a package), and small presets trained on generated tasks (`deploykit.model.zoo.synthetic`)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.model.calibration import CALIBRATION_SEED
from deploykit.model.spec import InputSpec, register_model
from deploykit.model.training import Recipe, fit
from deploykit.model.zoo.synthetic import (
    BOS,
    EOS,
    FIRST_WORD,
    TopicClassification,
    TopicText,
    TranslationTask,
    bleu_of_ids,
)

AGNEWS_VOCAB = 95811
AGNEWS_TOKENS = 48  # tokens per example input (a news title plus description is ~40 words)
AGNEWS_CLASSES = 4


class TextClassifier(nn.Module):
    """EmbeddingBag (mean over a row's token ids) + Linear, as in the PyTorch text classification tutorial."""

    def __init__(self, vocab: int = AGNEWS_VOCAB, dim: int = 64, classes: int = AGNEWS_CLASSES):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(tokens))


AGNEWS_BATCH = 32


def agnews_generated_batches(count: int) -> list[tuple[tuple[torch.Tensor], torch.Tensor]]:
    """Labelled batches for data-aware pruners: token ids and class labels drawn from the model's own
    vocabulary and classes (seeded). AG News does not ship in a package; this exercises the path,
    and saliency on the real dataset needs the real dataset."""
    generator = torch.Generator().manual_seed(0)
    return [((torch.randint(0, AGNEWS_VOCAB, (AGNEWS_BATCH, AGNEWS_TOKENS), generator=generator),),
             torch.randint(0, AGNEWS_CLASSES, (AGNEWS_BATCH,), generator=generator)) for _ in range(count)]


@register_model("textclf-agnews", inputs=[InputSpec("tokens", ("batch", AGNEWS_TOKENS), "int64", high=AGNEWS_VOCAB)],
                outputs=["logits"], data=agnews_generated_batches)
def textclf_agnews() -> nn.Module:
    """AG News classifier (AG News study): EmbeddingBag(95811, 64, mean) + Linear(64 -> 4), 6,132,164 parameters."""
    return TextClassifier()


SRC_VOCAB, TGT_VOCAB = 19214, 10837
SRC_TOKENS, TGT_TOKENS = 16, 12


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int = 512):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div)
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, dim)
        return x + self.table[: x.shape[1]]


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer (the PyTorch translation tutorial's model, as the study used it).

    forward(src, tgt) -> next-token logits (batch, tgt_len, tgt_vocab), with a causal target mask.
    """

    def __init__(self, layers: int = 3, dim: int = 512, heads: int = 8, ffn: int = 512,
                 src_vocab: int = SRC_VOCAB, tgt_vocab: int = TGT_VOCAB, embedding_std: float | None = None):
        super().__init__()
        self.dim = dim
        self.src_embedding = nn.Embedding(src_vocab, dim)
        self.tgt_embedding = nn.Embedding(tgt_vocab, dim)
        if embedding_std is not None:
            for embedding in (self.src_embedding, self.tgt_embedding):
                nn.init.normal_(embedding.weight, 0.0, embedding_std)
        self.position = PositionalEncoding(dim)
        self.transformer = nn.Transformer(dim, heads, layers, layers, ffn, dropout=0.1, batch_first=True)
        self.generator = nn.Linear(dim, tgt_vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(self.dim)
        src_x = self.position(self.src_embedding(src) * scale)
        tgt_x = self.position(self.tgt_embedding(tgt) * scale)
        length = tgt.shape[1]
        causal = torch.triu(torch.full((length, length), float("-inf"), device=tgt.device), diagonal=1)
        return self.generator(self.transformer(src_x, tgt_x, tgt_mask=causal))


@register_model(
    "seq2seq-transformer",
    inputs=[InputSpec("src", ("batch", "src_len"), "int64", high=SRC_VOCAB),
            InputSpec("tgt", ("batch", "tgt_len"), "int64", high=TGT_VOCAB)],
    outputs=["logits"],
    sampler=lambda batch, g: (torch.randint(0, SRC_VOCAB, (batch, SRC_TOKENS), generator=g),
                              torch.randint(0, TGT_VOCAB, (batch, TGT_TOKENS), generator=g)),
    output_layers=["generator"],
)
def seq2seq_transformer() -> nn.Module:
    """Multi30k de->en Transformer (AG News / Multi30k study): 3+3 layers, d_model 512, FFN 512, vocab 19214 -> 10837."""
    return Seq2SeqTransformer()


#: the AG News classifier's small-vocabulary preset, trained on generated four-topic text
AGNEWS_SMALL_VOCAB = 8000
AGNEWS_TASK = TopicClassification(TopicText(vocab=AGNEWS_SMALL_VOCAB, classes=AGNEWS_CLASSES, length=AGNEWS_TOKENS,
                                            cue_rate=0.06), train_size=20_000, test_size=2_000)


@register_model("textclf-agnews-small-trained",
                inputs=[InputSpec("tokens", ("batch", AGNEWS_TOKENS), "int64", high=AGNEWS_SMALL_VOCAB)],
                outputs=["logits"],
                **AGNEWS_TASK.spec_fields(Recipe(data=AGNEWS_TASK.describe(), steps=2000, batch=64, lr=1e-2,
                                                 warmup=50)))
def textclf_agnews_small_trained() -> nn.Module:
    """AG News classifier, small-vocabulary preset: EmbeddingBag(8000, 64, mean) + Linear(64 -> 4), 512,260 parameters; trained on generated four-topic text."""
    return TextClassifier(vocab=AGNEWS_SMALL_VOCAB)


# -- the Multi30k Transformer's small preset, trained on a generated translation task -------------------

TRANSLATION = TranslationTask(src_words=400, tgt_words=320)
#: source lengths of training batches (one length a batch: the model takes no padding mask)
TRAIN_LENGTHS = (4, 20)
#: held-out sentences BLEU is measured on, and their lengths
EVAL_SENTENCES, EVAL_LENGTHS = 192, (6, 18)


def _pair_batch(count: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(source ids (count, length), reference target ids (count, length)), vocabulary offsets applied."""
    words = torch.stack([TRANSLATION.sentence(length, g) for _ in range(count)])
    return words + FIRST_WORD, torch.stack([TRANSLATION.translate(w) for w in words]) + FIRST_WORD


def _teacher_forcing_loss(model: nn.Module, batch) -> torch.Tensor:
    src, tgt = batch
    count = len(src)
    inputs = torch.cat([torch.full((count, 1), BOS), tgt], dim=1)
    targets = torch.cat([tgt, torch.full((count, 1), EOS)], dim=1)
    logits = model(src, inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _train_translation(model: nn.Module, *, recipe: Recipe, after_step=None) -> None:
    def batch(g: torch.Generator):
        length = int(torch.randint(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1, (1,), generator=g))
        return _pair_batch(recipe.batch, length, g)

    fit(model, recipe, batch, _teacher_forcing_loss, after_step)


def greedy_translations(model: nn.Module, src: torch.Tensor, max_new: int) -> list[list[int]]:
    """Greedy target ids (EOS and what follows dropped) for a batch of equal-length sources."""
    ys = torch.full((len(src), 1), BOS)
    done = torch.zeros(len(src), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new):
            token = model(src, ys)[:, -1].argmax(-1)
            ys = torch.cat([ys, token.unsqueeze(1)], dim=1)
            done |= token == EOS
            if bool(done.all()):
                break
    out = []
    for row in ys[:, 1:].tolist():
        out.append(row[:row.index(EOS)] if EOS in row else row)
    return out


def _translation_bleu(model: nn.Module) -> dict[str, float]:
    g = torch.Generator().manual_seed(2)
    hypotheses, references = [], []
    lengths = range(EVAL_LENGTHS[0], EVAL_LENGTHS[1] + 1)
    per_length = EVAL_SENTENCES // len(lengths)
    for length in lengths:
        src, tgt = _pair_batch(per_length, length, g)
        hypotheses += greedy_translations(model, src, length + 4)
        references += tgt.tolist()
    return {"bleu": bleu_of_ids(hypotheses, references)}


def _translation_sample(batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A source sentence of SRC_TOKENS words and the first TGT_TOKENS tokens of its translation after BOS."""
    src, tgt = _pair_batch(batch, SRC_TOKENS, g)
    return src, torch.cat([torch.full((batch, 1), BOS), tgt], dim=1)[:, :TGT_TOKENS]


def _translation_calibration(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches: 16 training-distribution sentence pairs each, as the model takes them (the
    source, and the reference after BOS, one length a batch), the same draw every time."""
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    batches = []
    for _ in range(count):
        length = int(torch.randint(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1, (1,), generator=g))
        src, tgt = _pair_batch(16, length, g)
        batches.append((src, torch.cat([torch.full((16, 1), BOS), tgt], dim=1)))
    return batches


SMALL_SRC_VOCAB, SMALL_TGT_VOCAB = FIRST_WORD + TRANSLATION.src_words, FIRST_WORD + TRANSLATION.tgt_words
TRANSLATION_RECIPE = Recipe(data=f"{TRANSLATION.describe()}; source lengths {TRAIN_LENGTHS[0]}-{TRAIN_LENGTHS[1]}",
                            steps=2000, batch=32, lr=1e-3, warmup=100)


@register_model(
    "seq2seq-transformer-small-trained",
    inputs=[InputSpec("src", ("batch", "src_len"), "int64", high=SMALL_SRC_VOCAB),
            InputSpec("tgt", ("batch", "tgt_len"), "int64", high=SMALL_TGT_VOCAB)],
    outputs=["logits"],
    sampler=_translation_sample,
    calibration=_translation_calibration,
    output_layers=["generator"],
    train=partial(_train_translation, recipe=TRANSLATION_RECIPE),
    evaluate=_translation_bleu,
    recipe=TRANSLATION_RECIPE,
)
def seq2seq_transformer_small_trained() -> nn.Module:
    """Multi30k Transformer, small preset: 2+2 layers, d_model 128, FFN 256, vocab 403 -> 323, 797,635 parameters; trained on a generated translation task."""
    # embeddings drawn at d_model^-1/2 (Vaswani et al., fairseq): scaled by sqrt(d_model) they are unit-sized
    # beside the positional encoding; torch's N(0, 1) would drown the positions and alignment would not be learnt
    # in minutes
    return Seq2SeqTransformer(layers=2, dim=128, heads=4, ffn=256, src_vocab=SMALL_SRC_VOCAB, tgt_vocab=SMALL_TGT_VOCAB,
                              embedding_std=128 ** -0.5)
