"""Text models of the AG News / Multi30k study (random weights: neither dataset ships in a package)."""

from __future__ import annotations

import math

import torch
from torch import nn

from deploykit.model.spec import InputSpec, register_model

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
                 src_vocab: int = SRC_VOCAB, tgt_vocab: int = TGT_VOCAB):
        super().__init__()
        self.dim = dim
        self.src_embedding = nn.Embedding(src_vocab, dim)
        self.tgt_embedding = nn.Embedding(tgt_vocab, dim)
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
