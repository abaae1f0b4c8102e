"""Export forms of ESPnet's relative-position encoding and attention that onnxruntime's transformer
optimiser can read and fuse at every length.

Written here because neither ESPnet nor espnet_onnx has them. espnet_onnx's `OnnxRelPositionalEncoding`
slices a precomputed table at `[center - T + 1, center + T)`, and ESPnet's `rel_shift` keeps
`[..., : L // 2 + 1]` of a score matrix of width L: onnxruntime's symbolic shape inference cannot prove
that L is 2T - 1, "treats as equal" what it cannot compare, and the optimiser then builds on a width
of 2T - 1 where the graph has T (the optimised encoder fails at every length, the one it was traced
with included). Here the positions come from a Range of exactly 2T - 1 values, and the shift keeps its
first T columns with a Gather of Range(T): both lengths are plain sums of T.

The attention is also written in the shape `onnxruntime.transformers`' conformer fusion recognises,
with the same arithmetic as ESPnet's (Transformer-XL's terms a + c and b + d):

- `pos_bias_u` is folded into the query projection's bias, so (q + u) k^T is the plain query-key
  product of the fused attention kernel, its 1/sqrt(d_k) scale a Mul on the query;
- (q + v) p^T, shifted and scaled, is the *attention bias* the fused kernel adds before its softmax.
  It has its own query projection (bias + v) instead of reusing q, so the fusion, which removes the
  query path it folds, leaves nothing dangling.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_positions(length: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """ESPnet's "latest" relative positional encoding of a sequence of `length` frames: (1, 2T - 1, d),
    positions T - 1 down to -(T - 1), sin at even and cos at odd features (ESPnet's `extend_pe`)."""
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    angles = positions.unsqueeze(1) * div_term
    pe = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(-1, d_model)
    return pe.unsqueeze(0).to(dtype)


class ExportRelPositionalEncoding(nn.Module):
    """ESPnet's `RelPositionalEncoding` (x scaled by sqrt(d), and the relative positions of its length)
    with the positions computed in the graph rather than sliced from a table."""

    def __init__(self, module: nn.Module, **_replacement):
        super().__init__()
        self.d_model, self.xscale = module.d_model, module.xscale

    def forward(self, x: torch.Tensor):
        return x * self.xscale, relative_positions(x.size(1), self.d_model, x.dtype)


class ExportRelPositionAttention(nn.Module):
    """ESPnet's `RelPositionMultiHeadedAttention` in the fusable form above."""

    def __init__(self, module: nn.Module, **_replacement):
        super().__init__()
        self.h, self.d_k = module.h, module.d_k
        self.linear_k, self.linear_v, self.linear_out = module.linear_k, module.linear_v, module.linear_out
        self.linear_pos, self.zero_triu = module.linear_pos, module.zero_triu
        self.q_weight = module.linear_q.weight
        bias = module.linear_q.bias if module.linear_q.bias is not None else torch.zeros(self.h * self.d_k)
        scale = 1.0 / math.sqrt(self.d_k)
        with torch.no_grad():
            self.register_buffer("q_bias_u", bias + module.pos_bias_u.reshape(-1))
            # the position query's projection, pre-scaled: a weight of its own, so that no common-
            # subexpression pass merges it into the query's (which the fusion then removes)
            self.register_buffer("qp_weight", module.linear_q.weight * scale)
            self.register_buffer("qp_bias", (bias + module.pos_bias_v.reshape(-1)) * scale)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, h * d_k) -> (batch, h, time, d_k)"""
        return x.view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def forward(self, query, key, value, pos_emb, mask):
        scale = 1.0 / math.sqrt(self.d_k)
        weight = self.q_weight.t()
        # MatMul first in each Add: the input order the fusion's patterns expect
        q_u = self._heads(torch.matmul(query, weight) + self.q_bias_u) * scale
        k = self._heads(torch.matmul(key, self.linear_k.weight.t()) + self.linear_k.bias)
        v = self._heads(torch.matmul(value, self.linear_v.weight.t()) + self.linear_v.bias)
        q_v = self._heads(nn.functional.linear(query, self.qp_weight, self.qp_bias))
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        bias = rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))
        if self.zero_triu:
            bias = bias * torch.ones(bias.size(2), bias.size(3)).tril()
        scores = torch.matmul(q_u, k.transpose(-2, -1)) + bias
        if mask is not None:
            mask = mask.unsqueeze(1).eq(0)
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
            attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        x = torch.matmul(attn, v).transpose(1, 2).reshape(query.size(0), -1, self.h * self.d_k)
        return self.linear_out(x)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """ESPnet's `rel_shift` of (batch, head, T, 2T - 1) scores to (batch, head, T, T): pad a zero
    column, fold, drop the first row; the last step keeps T columns by a Gather of Range(T) instead of
    a slice at (2T - 1) // 2 + 1."""
    batch, heads, time, width = x.size()
    padded = torch.cat([x.new_zeros(batch, heads, time, 1), x], dim=-1)
    shifted = padded.view(batch, heads, width + 1, time)[:, :, 1:].reshape(batch, heads, time, width)
    return shifted.index_select(3, torch.arange(time))
