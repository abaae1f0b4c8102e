"""`nn.MultiheadAttention` with whole heads removed.

torch's module cannot lose a head: its query/key/value projections are `embed_dim` wide by
construction (`head_dim = embed_dim // num_heads`, checked on every call), and torch-pruning's handler
for it prunes `embed_dim` itself (the residual stream, each head narrower), not heads. A model whose
heads go therefore needs another module with the same interface and a narrower inner width; none of
the libraries we use has one, so this is ours.

`HeadPrunedAttention` computes what `nn.MultiheadAttention` computes (same call signature, same
masks, `batch_first`, unbatched inputs, dropout on the attention weights in training) for the heads it
keeps, with separate q/k/v projections of `heads * head_dim` rows and an output projection reading
those. It remembers which of the original heads it keeps, so that a per-head (3-D) `attn_mask` made
for the original head count still applies. The attention weights it returns (`need_weights`) are
those of the kept heads (averaged over them by default): a removed head has none.

Its forward is written out (matmul, softmax, matmul) rather than through scaled-dot-product attention,
so that it exports under every opset deploykit supports and matches torch's `need_weights` path.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as the additive float mask torch's attention uses."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _narrowed(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping output rows (`dim` 0) or input columns (`dim` 1) `index`. (transformers'
    `prune_linear_layer` does this, but transformers is not a dependency of torch models.)"""
    weight = linear.weight.detach().index_select(dim, index)
    bias = linear.bias.detach() if linear.bias is not None else None
    if bias is not None and dim == 0:
        bias = bias[index]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


class HeadPrunedAttention(nn.Module):
    """The kept heads of an `nn.MultiheadAttention` (see the module docstring)."""

    # What modules around an nn.MultiheadAttention read of it (torch's TransformerEncoderLayer decides
    # on its fused fast path by them): there are no packed projections here, which sends them down
    # their standard path, the one that calls this module.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, kdim: int, vdim: int, head_dim: int, heads: Sequence[int], total_heads: int,
                 bias: bool, dropout: float, batch_first: bool):
        super().__init__()
        width = len(heads) * head_dim
        self.embed_dim, self.kdim, self.vdim, self.head_dim = embed_dim, kdim, vdim, head_dim
        self.num_heads, self.total_heads = len(heads), total_heads
        self.dropout, self.batch_first = dropout, batch_first
        # original indices of the kept heads, for per-head masks; a buffer so that it travels with the
        # weights (not persistent: the pruning history rebuilds it)
        self.register_buffer("heads", torch.tensor(list(heads), dtype=torch.long), persistent=False)
        self.q_proj = nn.Linear(embed_dim, width, bias=bias)
        self.k_proj = nn.Linear(kdim, width, bias=bias)
        self.v_proj = nn.Linear(vdim, width, bias=bias)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias)

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> str | None:
        """Why the heads of `mha` cannot be taken apart; None when they can."""
        if mha.bias_k is not None or mha.add_zero_attn:
            return "its learned key/value bias (add_bias_kv) or zero attention (add_zero_attn) spans all heads"
        return None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, keep: Sequence[int]) -> "HeadPrunedAttention":
        """The heads `keep` (indices of `mha`'s heads) of `mha`, with its weights."""
        d, e = mha.head_dim, mha.embed_dim
        new = cls(e, mha.kdim, mha.vdim, d, keep, mha.num_heads, mha.in_proj_bias is not None, mha.dropout,
                  mha.batch_first).to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        rows = torch.tensor([h * d + i for h in keep for i in range(d)], dtype=torch.long)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for linear, weight, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                linear.weight.copy_(weight[rows])
                if b is not None:
                    linear.bias.copy_(b[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach()[:, rows])
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return new.train(mha.training)

    def remove(self, units: Sequence[int]) -> None:
        """Remove heads `units` (positions among the kept heads) in place."""
        drop = set(units)
        kept = [u for u in range(self.num_heads) if u not in drop]
        rows = torch.tensor([u * self.head_dim + i for u in kept for i in range(self.head_dim)], dtype=torch.long)
        self.q_proj, self.k_proj, self.v_proj = (_narrowed(p, rows, 0) for p in (self.q_proj, self.k_proj, self.v_proj))
        self.out_proj = _narrowed(self.out_proj, rows, 1)
        self.heads = self.heads[kept]
        self.num_heads = len(kept)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")  # as torch's module says
        batched = query.dim() == 3
        if not batched:  # (length, embed): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        target, batch, _ = query.shape
        source = key.shape[0]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(target, batch * h, d).transpose(0, 1)
        k = self.k_proj(key).view(source, batch * h, d).transpose(0, 1)
        v = self.v_proj(value).view(source, batch * h, d).transpose(0, 1)
        scores = torch.bmm(q * math.sqrt(1.0 / d), k.transpose(1, 2))  # (batch*h, target, source)
        mask = _additive(attn_mask, scores.dtype)
        if mask is not None:
            if mask.dim() == 3:  # one mask per (batch, original head): keep the kept heads'
                mask = mask.view(batch, self.total_heads, target, source)[:, self.heads].reshape(batch * h, target,
                                                                                                  source)
            scores = scores + mask
        padding = _additive(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding.view(batch, 1, 1, source).expand(-1, h, -1, -1).reshape(batch * h, 1, source)
        weights = F.softmax(scores, dim=-1)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(target * batch, h * d)
        out = self.out_proj(out).view(target, batch, -1)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        elif not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.view(batch, h, target, source)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))
