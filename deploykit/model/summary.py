"""Model facts for people: module shapes as the VAE study printed them, and FLOPs."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from deploykit.core.hooks import class_path, run_forward


def _conv(m: nn.modules.conv._ConvNd) -> str:
    kernel = "x".join(map(str, m.kernel_size))
    groups = f", groups={m.groups}" if m.groups != 1 else ""
    return f"{type(m).__name__}({m.in_channels} -> {m.out_channels}, {kernel}{groups})"


#: module type -> one-line shape description
_SHAPES: dict[type, Callable[[nn.Module], str]] = {
    nn.Linear: lambda m: f"Linear({m.in_features} -> {m.out_features})",
    nn.modules.conv._ConvNd: _conv,
    nn.modules.batchnorm._BatchNorm: lambda m: f"{type(m).__name__}({m.num_features})",
    nn.LayerNorm: lambda m: f"LayerNorm({', '.join(map(str, m.normalized_shape))})",
    nn.Embedding: lambda m: f"Embedding({m.num_embeddings}, {m.embedding_dim})",
    nn.EmbeddingBag: lambda m: f"EmbeddingBag({m.num_embeddings}, {m.embedding_dim}, {m.mode})",
    nn.MultiheadAttention: lambda m: f"MultiheadAttention({m.embed_dim}, heads={m.num_heads})",
}


#: the same for layer types outside torch, by class path (transformers is not imported here)
_SHAPES_BY_PATH: dict[str, Callable[[nn.Module], str]] = {
    "transformers.pytorch_utils.Conv1D": lambda m: f"Conv1D({m.weight.shape[0]} -> {m.nf})",
    # what an nn.MultiheadAttention becomes when heads go (deploykit.prune.mha, a layer above this one)
    "deploykit.prune.mha.HeadPrunedAttention":
        lambda m: f"MultiheadAttention({m.embed_dim}, heads={m.num_heads} of {m.total_heads})",
}


def describe(module: nn.Module) -> str:
    for kind, fmt in _SHAPES.items():
        if isinstance(module, kind):
            return fmt(module)
    by_path = _SHAPES_BY_PATH.get(class_path(type(module)))
    if by_path is not None:
        return by_path(module)
    shapes = ", ".join(f"{n}={list(p.shape)}" for n, p in module.named_parameters(recurse=False))
    return f"{type(module).__name__}({shapes})"


def module_shapes(model: nn.Module) -> dict[str, str]:
    """Name -> shape description of every module that owns parameters (or is a known layer type)."""
    out = {}
    for name, module in model.named_modules():
        if not name:
            continue
        owns = any(True for _ in module.parameters(recurse=False))
        if owns or isinstance(module, tuple(_SHAPES)) or class_path(type(module)) in _SHAPES_BY_PATH:
            out[name] = describe(module)
    return out


def shape_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    return {name: [before[name], after.get(name, "removed")] for name in before if before[name] != after.get(name)}


def count_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass by torch's own counter (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run_forward(model, inputs)
    return int(counter.get_total_flops())


def count_sparse_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass with the pruned weights' multiply-adds left out: each module that owns
    a `weight` counts its FLOPs times the weight's density, as pruning-at-initialisation papers report
    "remaining FLOPs". What a sparse kernel could skip; dense kernels still do it all."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run_forward(model, inputs)
    per_module = {key: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    skipped = 0.0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not name or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        density = int(torch.count_nonzero(weight)) / weight.numel()
        skipped += per_module.get(f"{root}.{name}", 0) * (1 - density)
    return int(round(counter.get_total_flops() - skipped))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of a plain (stripped) model."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero
