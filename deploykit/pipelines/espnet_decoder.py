"""ESPnet's Transformer decoder exported for incremental decoding: keys and values cached, not recomputed.

ESPnet's `forward_one_step` (and espnet_onnx's decoder, which follows it) caches each layer's
*outputs* and recomputes, at every step, the self-attention keys and values of the whole prefix and
the cross-attention keys and values of the whole encoder output. For a 5 s utterance (125 encoder
frames, d 256) the cross-attention projections alone are ~49 M of the ~55 M multiply-adds of one step
of espnet-st's decoder. Incremental decoders elsewhere (fairseq, Hugging Face) cache keys and values
instead, and so does this export:

- `decoder_memory.onnx`: the encoder output -> each layer's cross-attention keys and values, once
  per utterance;
- `decoder.onnx`: one token and its position, each layer's self-attention keys and values so far,
  and the cross-attention ones -> the next token's log-probabilities and the grown self-attention
  caches. The sinusoidal position is computed in the graph (no table, no length limit).

It computes what ESPnet's step computes (every export checks it against `forward_one_step`); only
the Transformer decoder of plain `DecoderLayer`s with ESPnet's `MultiHeadedAttention` and
`PositionalEncoding` is written this way (`unsupported` says why another is not, and the export then
uses espnet_onnx's layer-output decoder). Our own code: espnet_onnx has no such decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the step graph's inputs and outputs, by layer
SELF_KEY, SELF_VALUE, MEMORY_KEY, MEMORY_VALUE = "self_key_{}", "self_value_{}", "memory_key_{}", "memory_value_{}"
NEW = "new_{}"


def _class_path(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


ATTENTION = "espnet.nets.pytorch_backend.transformer.attention.MultiHeadedAttention"
DECODER_LAYER = "espnet.nets.pytorch_backend.transformer.decoder_layer.DecoderLayer"
POSITIONAL_ENCODING = "espnet.nets.pytorch_backend.transformer.embedding.PositionalEncoding"


def unsupported(decoder: nn.Module) -> str | None:
    """Why `decoder` cannot be exported with cached keys and values (None: it can)."""
    embed = getattr(decoder, "embed", None)
    if not (isinstance(embed, nn.Sequential) and len(embed) == 2 and isinstance(embed[0], nn.Embedding)
            and _class_path(embed[1]) == POSITIONAL_ENCODING and not embed[1].reverse):
        return "its token embedding is not an Embedding followed by ESPnet's PositionalEncoding"
    for i, layer in enumerate(getattr(decoder, "decoders", [])):
        if _class_path(layer) != DECODER_LAYER:
            return f"layer {i} is {type(layer).__name__}, not ESPnet's DecoderLayer"
        if layer.concat_after or getattr(layer, "sequential_attn", None) is not None:
            return f"layer {i} concatenates attention outputs or attends to a second memory"
        for name in ("self_attn", "src_attn"):
            attention = getattr(layer, name)
            if _class_path(attention) != ATTENTION or not isinstance(attention.q_norm, nn.Identity):
                return f"layer {i}'s {name} is not ESPnet's plain MultiHeadedAttention"
    if not getattr(decoder, "decoders", None):
        return "it has no decoder layers"
    return None


def _heads(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """(batch, time, heads * d_k) -> (batch, heads, time, d_k); each layer has its own head count
    (structured pruning removes heads layer by layer)."""
    return x.view(x.shape[0], -1, attention.h, attention.d_k).transpose(1, 2)


def _attend(attention: nn.Module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ESPnet's multi-head attention of one query position over cached keys and values (no mask)."""
    q = _heads(attention.linear_q(query), attention)
    scores = torch.matmul(q, keys.transpose(-2, -1)) / math.sqrt(attention.d_k)
    context = torch.matmul(torch.softmax(scores, dim=-1), values)
    return attention.linear_out(context.transpose(1, 2).reshape(query.shape[0], -1, attention.h * attention.d_k))


class MemoryKeysValues(nn.Module):
    """Encoder output (batch, frames, d) -> each layer's cross-attention keys and values."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.attentions = nn.ModuleList(layer.src_attn for layer in decoder.decoders)

    def forward(self, memory: torch.Tensor):
        out = []
        for attention in self.attentions:
            out += [_heads(attention.linear_k(memory), attention), _heads(attention.linear_v(memory), attention)]
        return tuple(out)

    def output_names(self) -> list[str]:
        return [name.format(i) for i in range(len(self.attentions)) for name in (MEMORY_KEY, MEMORY_VALUE)]


class CachedStep(nn.Module):
    """One decoding step: (token (batch, 1), position (1,), per layer self keys, self values, then per
    layer memory keys, memory values) -> (log-probabilities (batch, vocab), per layer grown self keys
    and values)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.embedding, encoding = decoder.embed[0], decoder.embed[1]
        self.xscale = encoding.xscale
        size = self.embedding.embedding_dim
        # ESPnet's table, one position at a time: sin at even features, cos at odd ones
        self.register_buffer("inverse_frequency", torch.exp(
            torch.arange(0, size, 2, dtype=torch.float32) * -(math.log(10000.0) / size)), persistent=False)
        self.layers = decoder.decoders
        self.normalize_before = decoder.normalize_before
        self.after_norm = decoder.after_norm if decoder.normalize_before else None
        self.output_layer = decoder.output_layer

    def _position(self, position: torch.Tensor) -> torch.Tensor:
        angles = position.to(torch.float32).unsqueeze(-1) * self.inverse_frequency  # (1, d/2)
        return torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2).unsqueeze(1)  # (1, 1, d)

    def forward(self, token: torch.Tensor, position: torch.Tensor, *caches: torch.Tensor):
        count = len(self.layers)
        self_caches, memory = caches[:2 * count], caches[2 * count:]
        x = self.embedding(token) * self.xscale + self._position(position)
        grown = []
        for i, layer in enumerate(self.layers):
            x, keys, values = self._layer(layer, x, self_caches[2 * i], self_caches[2 * i + 1],
                                          memory[2 * i], memory[2 * i + 1])
            grown += [keys, values]
        y = self.after_norm(x[:, -1]) if self.after_norm is not None else x[:, -1]
        if self.output_layer is not None:
            y = torch.log_softmax(self.output_layer(y), dim=-1)
        return (y, *grown)

    def _layer(self, layer, x, self_keys, self_values, memory_keys, memory_values):
        """ESPnet's DecoderLayer for the newest position; its normalised input's keys and values
        join the cache (LayerNorm works position by position, so earlier positions' are unchanged)."""
        residual = x
        h = layer.norm1(x) if self.normalize_before else x
        attention = layer.self_attn
        keys = torch.cat((self_keys, _heads(attention.linear_k(h), attention)), dim=2)
        values = torch.cat((self_values, _heads(attention.linear_v(h), attention)), dim=2)
        x = residual + _attend(attention, h, keys, values)
        if not self.normalize_before:
            x = layer.norm1(x)
        residual = x
        h = layer.norm2(x) if self.normalize_before else x
        x = residual + _attend(layer.src_attn, h, memory_keys, memory_values)
        if not self.normalize_before:
            x = layer.norm2(x)
        residual = x
        h = layer.norm3(x) if self.normalize_before else x
        x = residual + layer.feed_forward(h)
        if not self.normalize_before:
            x = layer.norm3(x)
        return x, keys, values

    def input_names(self) -> list[str]:
        count = range(len(self.layers))
        return (["token", "position"] + [n.format(i) for i in count for n in (SELF_KEY, SELF_VALUE)]
                + [n.format(i) for i in count for n in (MEMORY_KEY, MEMORY_VALUE)])

    def output_names(self) -> list[str]:
        return ["logp"] + [NEW.format(n.format(i)) for i in range(len(self.layers)) for n in (SELF_KEY, SELF_VALUE)]

    def example_inputs(self, memory_keys_values: tuple[torch.Tensor, ...], cached: int = 3):
        """Trace inputs: a token at position `cached` after `cached` positions of random cache."""
        generator = torch.Generator().manual_seed(1)
        caches = []
        for layer in self.layers:
            attention = layer.self_attn
            caches += [torch.randn(1, attention.h, cached, attention.d_k, generator=generator) for _ in range(2)]
        return (torch.tensor([[3]]), torch.tensor([cached]), *caches, *memory_keys_values)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        count = range(len(self.layers))
        axes = {n.format(i): {2: "cached"} for i in count for n in (SELF_KEY, SELF_VALUE)}
        axes.update({NEW.format(n.format(i)): {2: "cached_next"} for i in count for n in (SELF_KEY, SELF_VALUE)})
        axes.update({n.format(i): {2: "encoder_frames"} for i in count for n in (MEMORY_KEY, MEMORY_VALUE)})
        return axes
