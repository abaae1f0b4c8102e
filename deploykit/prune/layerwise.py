"""Layer by layer over calibration data: each prunable weight as the matrix its layer multiplies input rows
by, and the statistics of those rows, gathered one layer at a time with the layers before it already
pruned (as Wanda and SparseGPT do: a layer is pruned for the inputs the pruned model gives it).

Why our own and not torchao's or llm-compressor's: torchao's WandaSparsifier takes nn.Linear only and
gathers every layer's statistics in one pass of the unpruned model; llm-compressor's SparseGPT and Wanda
modifiers walk the decoder layers of Hugging Face causal LMs. deploykit prunes any model a user brings
(CNNs, encoder-decoders, speech models, several output heads), so the walk here is by hooks on whatever
layers the plan selects, in the order the model calls them.

A *view* (`WeightView`) is one weight seen as an (out, in) matrix in *parts*: row and column ranges
that share their input rows (a Conv in groups has one part per group; the packed q/k/v projection of
an attention whose query, key and value differ has one per projection). What a view is, by layer:

- Linear: the weight; its input's last axis.
- transformers' Conv1D (GPT-2): the weight transposed (it stores (in, out)).
- Conv1d/Conv2d: the weight flattened to (out, in/groups * kernel), the input unfolded (`F.unfold`) with
  the layer's own padding, stride and dilation; one part per group.
- nn.MultiheadAttention: its packed `in_proj_weight` (or q/k/v weights) on the query/key/value, and its
  `out_proj`, whose input (the heads' output, which the module never hands to `out_proj` as a call) is
  recomputed by a copy of the attention with an identity output projection.

Memory is one layer's statistics at a time (a (in, in) matrix per part for SparseGPT, a vector for
Wanda), beside the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

from deploykit.core.errors import UsageError
from deploykit.core.hooks import class_path, run_forward

#: the part of a view: (first row, end row, first column, end column) of its weight matrix; a Conv in groups
#: has one per group, each reading its group's slice of the unfolded input
Part = tuple[int, int, int, int]
CONV1D_PATH = "transformers.pytorch_utils.Conv1D"


@dataclass
class WeightView:
    """One prunable weight as an (out, in) matrix, where its input rows come from, and its parts."""

    #: "module.parameter", as pruning results name it
    name: str
    module: nn.Module
    param: str
    #: the module whose calls show the input (the attention, for its projections)
    trigger: nn.Module
    kind: str  # "linear", "conv1d-transposed", "conv", "mha-in", "mha-out"
    parts: list[Part]

    def matrix(self) -> torch.Tensor:
        """The weight as it is now, as a float32 (out, in) copy."""
        return as_matrix(self.module, getattr(self.module, self.param).detach()).float().contiguous().clone()

    def write(self, matrix: torch.Tensor) -> None:
        """Put an (out, in) matrix back into the parameter (before its mask is installed)."""
        target = getattr(self.module, self.param)
        with torch.no_grad():
            target.copy_(from_matrix(self.module, matrix, target.shape).to(target.dtype))

    def install(self, keep: torch.Tensor) -> None:
        """Mask the parameter with an (out, in) keep-mask (`torch.nn.utils.prune`)."""
        target = getattr(self.module, self.param)
        prune.custom_from_mask(self.module, self.param, from_matrix(self.module, keep, target.shape))

    def channel_order(self) -> torch.Tensor | None:
        """For a Conv: the columns reordered so that consecutive ones are input channels at one kernel
        position (where N:M patterns run, as NVIDIA's sparse convolutions take them); None otherwise."""
        if self.kind != "conv":
            return None
        kernel = int(torch.tensor(self.module.kernel_size).prod())
        per_group = self.module.in_channels // self.module.groups
        return torch.arange(per_group * kernel).view(per_group, kernel).t().reshape(-1)


def as_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as the (out, in) matrix it multiplies input rows by: a Conv's flattened, GPT-2's
    Conv1D (stored (in, out)) transposed."""
    if class_path(type(module)) == CONV1D_PATH:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def from_matrix(module: nn.Module, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`as_matrix` undone: an (out, in) matrix in the layout of the layer's weight (`shape`)."""
    if class_path(type(module)) == CONV1D_PATH:
        return matrix.t().contiguous()
    return matrix.reshape(shape)


def weight_views(model: nn.Module, weights: Sequence[tuple[str, str]]) -> list[WeightView]:
    """A view of each (module name, parameter name); a weight no view describes is an error naming it
    (the caller selects only layers these pruners take)."""
    return [_view(model, module_name, model.get_submodule(module_name), param) for module_name, param in weights]


def _view(model: nn.Module, module_name: str, module: nn.Module, param: str) -> WeightView:
    name = f"{module_name}.{param}"
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        parts = [(0, e, 0, e), (e, 2 * e, 0, e), (2 * e, 3 * e, 0, e)] if param == "in_proj_weight" else None
        if parts is None:
            width = getattr(module, param).shape[1]
            parts = [(0, e, 0, width)]
        return WeightView(name, module, param, module, "mha-in", parts)
    parent = _attention_owning(model, module_name, module)
    if parent is not None:
        out, width = module.weight.shape
        return WeightView(name, module, param, parent, "mha-out", [(0, out, 0, width)])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out, groups = module.out_channels, module.groups
        cols = module.weight[0].numel()
        rows = out // groups
        # each group's rows read all the weight's columns, on that group's slice of the unfolded input
        return WeightView(name, module, param, module, "conv", [(g * rows, (g + 1) * rows, 0, cols) for g in range(groups)])
    if isinstance(module, nn.Linear):
        out, width = module.weight.shape
        return WeightView(name, module, param, module, "linear", [(0, out, 0, width)])
    if class_path(type(module)) == CONV1D_PATH:
        width, out = module.weight.shape
        return WeightView(name, module, param, module, "conv1d-transposed", [(0, out, 0, width)])
    raise UsageError(f"{name} ({type(module).__name__}) is not a layer whose inputs a calibration pass can read "
                     "(Linear, Conv1d/Conv2d, GPT-2's Conv1D, nn.MultiheadAttention): exclude it with --exclude")


def _attention_owning(model: nn.Module, module_name: str, module: nn.Module) -> nn.MultiheadAttention | None:
    """The nn.MultiheadAttention whose `out_proj` `module` is (it reads that weight itself)."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if module_name else None
    return parent if isinstance(parent, nn.MultiheadAttention) and child == "out_proj" else None


def rows_of(view: WeightView, args: tuple, kwargs: dict, probe: Callable | None = None) -> list[torch.Tensor]:
    """The input rows of each of `view`'s parts, as (n, part width) float32 matrices, from one call of
    its trigger (`probe`: the attention copy whose output is the heads' output, for "mha-out")."""
    if view.kind == "mha-in":
        query, key, value = (_argument(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        by_param = {"in_proj_weight": (query, key, value), "q_proj_weight": (query,), "k_proj_weight": (key,),
                    "v_proj_weight": (value,)}[view.param]
        return [_flat(x) for x in by_param]
    if view.kind == "mha-out":
        return [_flat(probe(*args, **kwargs))]
    x = _argument(args, kwargs, 0, "input")
    if view.kind == "conv":
        columns = unfolded(view.module, x)
        return [columns[:, g * (c1 - c0):(g + 1) * (c1 - c0)] for g, (_, _, c0, c1) in enumerate(view.parts)]
    return [_flat(x)]


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> torch.Tensor:
    return args[index] if len(args) > index else kwargs[name]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


def unfolded(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d/Conv2d's input as the rows its weight multiplies: (batch * positions, in * kernel)."""
    x = x.detach().float()
    one_d = isinstance(conv, nn.Conv1d)
    if one_d:
        x = x.unsqueeze(-2)
    kernel = (1, *conv.kernel_size) if one_d else conv.kernel_size
    stride = (1, *conv.stride) if one_d else conv.stride
    dilation = (1, *conv.dilation) if one_d else conv.dilation
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = F.pad(x, _explicit_padding(conv, one_d), mode="constant" if conv.padding_mode == "zeros"
                  else conv.padding_mode)
        padding = (0, 0)
    else:
        padding = (0, *conv.padding) if one_d else conv.padding
    columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C*k, L)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _explicit_padding(conv: nn.Module, one_d: bool) -> tuple[int, ...]:
    """F.pad's (left, right, top, bottom) for a Conv's padding ("same", "valid" or sizes)."""
    if conv.padding == "valid":
        return (0, 0) * (1 if one_d else 2)
    if conv.padding == "same":
        pads = []
        for k, d in reversed(list(zip(conv.kernel_size, conv.dilation))):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return tuple(p for size in reversed(conv.padding) for p in (size, size))


def first_calls(model: nn.Module, modules: dict, inputs: Sequence[torch.Tensor]) -> dict:
    """Key of `modules` -> the position of its module's first call in one forward pass over `inputs`
    (a module never called is absent)."""
    first: dict = {}

    def seen(key):
        def hook(_module, _args) -> None:  # a pre-hook's return value would replace the call's arguments
            first.setdefault(key, len(first))
        return hook

    handles = [module.register_forward_pre_hook(seen(key)) for key, module in modules.items()]
    try:
        with torch.no_grad():
            run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return first


def call_order(model: nn.Module, views: Sequence[WeightView], inputs: Sequence[torch.Tensor]) -> list[WeightView]:
    """`views` in the order the model first calls their triggers on `inputs` (an attention's packed
    projection before its output projection); a view whose trigger never runs is an error naming it."""
    first = first_calls(model, {id(v.trigger): v.trigger for v in views}, inputs)
    never = [v.name for v in views if id(v.trigger) not in first]
    if never:
        raise UsageError(f"{', '.join(never[:4])}{', ...' if len(never) > 4 else ''} never ran on the calibration "
                         "inputs, so there are no inputs to prune by: --exclude them (a layer only a decoding loop or "
                         "another entry point calls)")
    return sorted(views, key=lambda v: (first[id(v.trigger)], v.kind == "mha-out"))


def gather(model: nn.Module, view: WeightView, batches, start: Callable[[int], object],
           add: Callable[[object, torch.Tensor], None]) -> list:
    """Statistics of `view`'s input rows over every calibration batch, per part: `start(width)` makes
    a part's accumulator and `add(acc, rows)` feeds it each call's rows. The model runs as it is (the
    layers before `view` already pruned)."""
    stats = [start(c1 - c0) for _, _, c0, c1 in view.parts]
    probe = _heads_output(view.trigger) if view.kind == "mha-out" else None
    busy = []  # the probe calls the attention again: that call is not a calibration call

    def hook(_module, args, kwargs, _output):
        if busy:
            return
        busy.append(True)
        try:
            for acc, rows in zip(stats, rows_of(view, args, kwargs, probe)):
                add(acc, rows)
        finally:
            busy.clear()

    handle = view.trigger.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                run_forward(model, batch)
    finally:
        handle.remove()
    return stats


def _heads_output(attention: nn.MultiheadAttention) -> Callable:
    """A function of the attention's call arguments giving its heads' output before `out_proj`: the
    attention (as pruned so far) called again with the identity as its output projection, swapped in
    for that call. (A copy cannot be made: a masked projection's weight is not a leaf tensor.)"""
    out_proj = attention.out_proj

    def heads_output(*args, **kwargs):
        saved = {name: _tensor(getattr(out_proj, name)) for name in ("weight", "bias")}
        stand_in = {"weight": torch.eye(attention.embed_dim, dtype=saved["weight"].dtype),
                    "bias": None if saved["bias"] is None else torch.zeros_like(saved["bias"])}
        try:
            for name, value in stand_in.items():
                _swap(out_proj, name, value)
            return attention(*args, **{**kwargs, "need_weights": False})[0]
        finally:
            for name, value in saved.items():
                _swap(out_proj, name, value)
    return heads_output


def _tensor(value: torch.Tensor | None) -> torch.Tensor | None:
    return value.data if isinstance(value, nn.Parameter) else value


def _swap(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set a weight for one call: a parameter's data, or the plain tensor a pruning mask computed."""
    if value is None:
        return
    current = getattr(module, name)
    if isinstance(current, nn.Parameter):
        current.data = value
    else:
        setattr(module, name, value)


class SecondMoment:
    """Running X^T X / n of a part's input rows (SparseGPT's Hessian, halved)."""

    def __init__(self, width: int):
        self.matrix = torch.zeros(width, width, dtype=torch.float64)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        self.matrix += rows.double().t() @ rows.double()
        self.rows += len(rows)

    def mean(self) -> torch.Tensor:
        return (self.matrix / max(self.rows, 1)).float()


class ColumnNorms:
    """Running sum of squares of each input column (Wanda's ||X_j||^2)."""

    def __init__(self, width: int):
        self.sums = torch.zeros(width, dtype=torch.float64)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        self.sums += (rows.double() ** 2).sum(dim=0)
        self.rows += len(rows)

    def norms(self) -> torch.Tensor:
        return self.sums.sqrt().float()
