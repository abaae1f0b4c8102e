"""Model facts for people: module shapes as the VAE study printed them, and FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from deploykit.core.hooks import class_path, is_scripted, observe_forward, run_forward


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
    """FLOPs of one forward pass (a multiply-add counts 2): torch's own counter, plus the recurrent
    layers it does not count (`rnn_flops`)."""
    return flop_count(model, inputs).total


def count_sparse_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass with the pruned weights' multiply-adds left out: each module that owns
    weights counts its FLOPs times their density, as pruning-at-initialisation papers report
    "remaining FLOPs". What a sparse kernel could skip; dense kernels still do it all."""
    counted = flop_count(model, inputs)
    skipped = 0.0
    for name, module in model.named_modules():
        weights = [p for local, p in module.named_parameters(recurse=False) if p.dim() >= 2 or local == "weight"]
        total = sum(w.numel() for w in weights)
        if not name or not total:
            continue
        density = sum(int(torch.count_nonzero(w)) for w in weights) / total
        # its own work: a module's count includes its children's (nn.MultiheadAttention's out_proj)
        own = counted.by_module.get(name, 0) - sum(counted.by_module.get(f"{name}.{child}", 0)
                                                   for child, _ in module.named_children())
        skipped += own * (1 - density)
    return int(round(counted.total - skipped))


@dataclass(frozen=True)
class FlopCount:
    total: int
    #: module name -> FLOPs of its own forward (its children's included), "" not listed
    by_module: dict[str, int]
    #: modules that multiply by weights of their own but no FLOP was counted for (an operator neither
    #: torch's counter nor `rnn_flops` knows): the total leaves them out, and says so
    uncounted: tuple[str, ...]


def flop_count(model: nn.Module, inputs: Sequence[torch.Tensor]) -> FlopCount:
    """One forward pass under torch's FlopCounterMode, with nn.MultiheadAttention's fused fast path off
    (the counter cannot see inside `_native_multi_head_attention`, and FLOPs before and after a
    pruned attention must be counted on the same path) and recurrent layers counted by formula."""
    from torch.utils.flop_counter import FlopCounterMode

    scripted = is_scripted(model)  # no hooks: its total only
    recurrent: dict[str, int] = {}
    handles = [] if scripted else [module.register_forward_hook(lambda m, args, _out, name=name: recurrent.__setitem__(
        name, recurrent.get(name, 0) + rnn_flops(m, args[0] if args else None)))
        for name, module in model.named_modules() if isinstance(module, nn.RNNBase)]
    counter = FlopCounterMode(display=False, custom_mapping=_missing_formulas())
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, torch.no_grad():
            run_forward(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
    root = type(model).__name__
    by_module = {key.removeprefix(f"{root}."): int(sum(ops.values())) for key, ops in counter.get_flop_counts().items()
                 if key not in (root, "Global")}
    for name, flops in recurrent.items():  # the counter saw none of it: add to the layer and its parents
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            by_module[".".join(parts[:i])] = by_module.get(".".join(parts[:i]), 0) + flops
    silent = [] if scripted else [name for name, module in model.named_modules()
                                  if name and not by_module.get(name) and _multiplies_by_weights(module)]
    ran = _ran(model, inputs) if silent else set()  # a layer that did not run did no work
    uncounted = tuple(name for name in silent if name in ran)
    return FlopCount(int(counter.get_total_flops()) + sum(recurrent.values()), by_module, uncounted)


def _missing_formulas() -> dict:
    """Operators torch's counter has no formula for, with the one it uses for their siblings: the CPU
    kernel scaled_dot_product_attention dispatches to on the CPU (what attention runs here)."""
    def cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        # scores (query x key) and mixing (scores x value), per query head: grouped-query attention's
        # key/value heads are shared, which torch's sdpa_flop_count does not allow for
        *batch, length, size = query_shape
        return 2 * math.prod(batch) * length * key_shape[-2] * (size + value_shape[-1])

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: cpu_flash_attention} if op is not None else {}


def _multiplies_by_weights(module: nn.Module) -> bool:
    """A module holding a matrix (or kernel) of its own that it multiplies by: not a lookup table."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    return any(p.dim() >= 2 and p.is_floating_point() for p in module.parameters(recurse=False))


def _ran(model: nn.Module, inputs: Sequence[torch.Tensor]) -> set[str]:
    ran: set[str] = set()
    observe_forward(model, inputs, {m: (lambda _a, _o, name=name: ran.add(name))
                                    for name, m in model.named_modules() if _multiplies_by_weights(m)})
    return ran


#: gates per recurrent cell: their input and hidden projections are what costs
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_flops(module: nn.RNNBase, data) -> int:
    """FLOPs of one call of an LSTM, GRU or RNN on `data` (a tensor or a PackedSequence): per step,
    layer and direction, 2 x gates x hidden x (input + hidden) for the projections (and the LSTM's
    projection to proj_size, if any), plus the gates' elementwise work. torch's counter has no formula
    for `aten.lstm` / `aten.gru` / `aten.rnn_*`; this is the standard count (as fvcore and ptflops)."""
    if data is None:
        return 0
    if isinstance(data, nn.utils.rnn.PackedSequence):
        steps = int(data.batch_sizes.sum())  # batch x time, padding excluded
    elif data.dim() == 2:  # unbatched (time, features)
        steps = data.shape[0]
    else:
        steps = data.shape[0] * data.shape[1]
    gates = _GATES.get(module.mode, 1)
    directions = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    output = module.proj_size or hidden
    flops = 0
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else output * directions
        per_step = 2 * gates * hidden * (width + output) + 4 * gates * hidden  # projections, biases and gates
        if module.proj_size:
            per_step += 2 * hidden * module.proj_size
        flops += per_step * directions
    return flops * steps


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of a plain (stripped) model."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero
