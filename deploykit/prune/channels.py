"""Coupled channel groups, from torch-pruning's dependency graph.

A *group* is the unit of structured pruning: all the parameter slices that must go together when one
output channel of a layer goes (the producing Linear/Conv rows, a BatchNorm's entries, every layer
joined by a residual add or a concatenation, a consumer's input columns). torch-pruning's
`DependencyGraph` finds groups; this module adds what deploykit needs on top: which parameter slices
*produce* a channel (zeroing those makes the channel's output exactly zero), and which channels of a
group are already dead.

How to support another layer type: for a built-in one, add it to `_PRODUCER_SLICES` with the
parameters and dimensions that hold one output channel (and, if torch-pruning does not know it, a
pruner in torch-pruning's registry); for a user's own layer, give a `LayerHandler` in the model
spec's pruning hints (`deploykit.model.hints`), which does both without editing deploykit.

Where torch-pruning cannot follow an architecture, the failure names the layer: grouped
convolutions block their groups (`_is_grouped_conv`), and an exception inside torch-pruning's group
search is reported with the layers it has no real handler for (`unknown_layers`).
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from deploykit.core.deadline import deadline
from deploykit.core.errors import DeployKitError
from deploykit.core.hooks import class_path, run_forward
from deploykit.core.outputs import flat_tensors
from deploykit.model.hints import NO_HINTS, PruningHints
from deploykit.prune.blocks import block_groups
from deploykit.prune.slices import Reader, Slice, SliceGroup

ROOT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
#: layers that normalise across channels: removing a channel changes every other channel's output
#: (the mean and variance are taken over one channel fewer), so their groups are never removable exactly
BLOCKING_TYPES = (nn.LayerNorm, nn.GroupNorm)
#: attention modules that reshape their projections into heads of a size kept as an attribute (ESPnet's
#: `d_k`): one channel of a projection cannot go alone, only whole heads could (not supported yet)
HEAD_SPLIT_CLASSES = ("espnet.nets.pytorch_backend.transformer.attention.MultiHeadedAttention",)
#: attributes by which attention modules of other libraries say how many heads they split into
#: (Hugging Face: BERT/RoBERTa/ViT `num_attention_heads`, BART/Llama `num_heads`, DistilBERT/T5
#: `n_heads`, GPT-2 blocks handled by `deploykit.prune.blocks`; torch: `nn.MultiheadAttention.num_heads`)
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head")
#: attributes by which attention modules say the size of a head instead (Llama, Mistral, Qwen and other
#: grouped-query attention modules of transformers keep only `head_dim`; the count is in their config)
HEAD_SIZE_ATTRIBUTES = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_k")


def splits_into_heads(module: nn.Module) -> bool:
    """Whether `module` reshapes its child projections into attention heads: a known class, or a module
    with Linear children that says its head count (more than one head) or its head size. Its
    projections' channels cannot go one by one, only whole heads could."""
    if any(class_path(c) in HEAD_SPLIT_CLASSES for c in type(module).__mro__):
        return True
    if not any(isinstance(child, nn.Linear) for child in module.children()):
        return False
    heads = next((getattr(module, a) for a in HEAD_COUNT_ATTRIBUTES if isinstance(getattr(module, a, None), int)), 1)
    return heads > 1 or any(isinstance(getattr(module, a, None), int) for a in HEAD_SIZE_ATTRIBUTES)


class UnsupportedLayerError(DeployKitError):
    """A group contains a layer whose channel parameters deploykit does not know how to read."""


def _conv_slices(m: nn.Module) -> list[tuple[str, int]]:
    return [("weight", 1 if m.transposed else 0), ("bias", 0)]


#: layer type -> (parameter name, dimension) pairs that hold one output channel
_PRODUCER_SLICES = {
    nn.Linear: lambda m: [("weight", 0), ("bias", 0)],
    nn.modules.conv._ConvNd: _conv_slices,
    nn.modules.batchnorm._BatchNorm: lambda m: [("weight", 0), ("bias", 0)],
    nn.Embedding: lambda m: [("weight", 1)],
    nn.EmbeddingBag: lambda m: [("weight", 1)],
    # a channel that is zero stays zero through PReLU whatever its slope: the slopes produce nothing, and
    # torch-pruning's PReLUPruner removes a removed channel's slope (a single shared slope stays)
    nn.PReLU: lambda m: [],
}


def producer_slices(module: nn.Module, hints: PruningHints = NO_HINTS) -> list[tuple[str, int]] | None:
    """(parameter, dim) pairs of `module` that hold its output channels; None for unknown types."""
    handler = hints.handler_for(module)
    if handler is not None:
        return [(name, dim) for name, dim in handler.out if isinstance(getattr(module, name, None), torch.Tensor)]
    for kind, slices in _PRODUCER_SLICES.items():
        if isinstance(module, kind):
            return [(name, dim) for name, dim in slices(module) if getattr(module, name, None) is not None]
    return None


#: what a time limit on grouping says: its remedies
GRAPH_TIMEOUT_HINT = ("raise --graph-timeout, --exclude the blocks it loops on, or use an unstructured method "
                      "(magnitude, random) with --form dense or csr")


def grouping_deadline(seconds: float | None):
    """The time limit on building a model's dependency graph and walking its groups."""
    return deadline(seconds, f"torch-pruning's dependency graph of this model (limit --graph-timeout; "
                             f"{GRAPH_TIMEOUT_HINT})")


def dependency_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                     hints: PruningHints = NO_HINTS) -> tp.DependencyGraph:
    # torch-pruning traces through autograd, so gradients must be on even for an inference model.
    try:
        with torch.enable_grad(), _split_glu():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=tuple(example_inputs),
                forward_fn=lambda m, inputs: tuple(flat_tensors(run_forward(m, inputs))),
                customized_pruners=hints.customized_pruners() or None, verbose=False)
    except (ArithmeticError, IndexError, KeyError, RecursionError, RuntimeError, TypeError, ValueError) as exc:
        # torch-pruning fails deep inside on graphs it cannot follow (a channel shuffle's reshape:
        # ZeroDivisionError); the user needs the reason and what still works, not its traceback
        where = traceback.extract_tb(exc.__traceback__)[-1].name
        raise UnsupportedLayerError(
            f"torch-pruning cannot build this model's dependency graph ({type(exc).__name__} in {where}: "
            f"{(str(exc).splitlines() or [''])[0][:160]}), so its channels cannot be grouped: structured pruning "
            "and dense-shrunk do not apply to it; unstructured methods (magnitude, random) with --form dense or "
            "csr do") from None
    _detach_kept_activations(model)
    # deploykit's own finding, read by ChannelGroup: torch-pruning maps a flatten's columns in (channel,
    # position) order and cannot see a permute before it
    graph.deploykit_reordered = reordered_flatten_producers(model, example_inputs, hints)
    return graph


#: autograd nodes that reorder axes, and those that merge axes into one (a flatten); nodes that mix
#: channels (matrix products, convolutions, attention) end the walk: no channel passes them unchanged
_REORDERS = ("PermuteBackward", "TransposeBackward")
_MERGES = ("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "FlattenBackward")
_MIXES = ("MmBackward", "BmmBackward", "AddmmBackward", "BaddbmmBackward", "ConvolutionBackward", "Attention",
          "EmbeddingBackward", "LinearBackward")


def reordered_flatten_producers(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                                hints: PruningHints = NO_HINTS) -> dict[str, str]:
    """Layers whose output channels reach a Linear (or Conv) through an axis permutation followed by a
    flatten (`x.permute(0, 2, 1, 3).reshape(batch, -1)`), each -> the layer it feeds. The consumer's
    input columns are then ordered (position, channel, ...), not (channel, position), and removing a
    channel would take the wrong columns: these producers keep their channels (their groups are left
    whole, the reason said). Found on one forward pass's autograd graph."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ROOT_TYPES) or hints.handler_for(m)}
    made_by: dict[object, str] = {}
    consumers: list[tuple[str, object]] = []

    def after(name):
        def hook(_module, args, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                made_by[output.grad_fn] = name
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.grad_fn is not None:
                consumers.append((name, first.grad_fn))
        return hook

    handles = [m.register_forward_hook(after(name)) for name, m in layers.items()]
    try:
        with torch.enable_grad():
            run_forward(model, example_inputs)
    except Exception:  # noqa: BLE001 - a model the hooks' pass cannot run: torch-pruning's own errors say why
        return {}
    finally:
        for handle in handles:
            handle.remove()
    found: dict[str, str] = {}
    for consumer, start in consumers:
        # (node, a reorder below a merge seen on the way down from the consumer)
        stack, seen = [(start, False, False)], set()
        while stack:
            node, merged, reordered = stack.pop()
            if node is None or (node, merged, reordered) in seen:
                continue
            seen.add((node, merged, reordered))
            if node in made_by:
                if merged and reordered:
                    found.setdefault(made_by[node], consumer)
                continue
            kind = type(node).__name__
            if any(mix in kind for mix in _MIXES):
                continue
            merged = merged or any(m in kind for m in _MERGES)
            reordered = reordered or (merged and any(r in kind for r in _REORDERS))
            stack.extend((child, merged, reordered) for child, _ in node.next_functions)
    return found


def unknown_layers(graph: tp.DependencyGraph, model: nn.Module, hints: PruningHints = NO_HINTS) -> list[str]:
    """Modules holding their own parameters that neither torch-pruning nor deploykit can read the
    channels of (torch-pruning handles them as elementwise: a guess)."""
    out = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)) or hints.handler_for(module) is not None:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or isinstance(pruner, tp.ops.ElementWisePruner):
            out.append(f"{name} ({type(module).__name__})")
    return out


@contextlib.contextmanager
def _split_glu():
    """Trace GLU as the split it is. `F.glu(x)` is `a * sigmoid(b)` for the two halves of `x`; traced as
    one opaque op, torch-pruning takes it for elementwise and couples channel i of its output with
    channel i of its input only (seen on ESPnet's Conformer conv module: pruning then broke the
    depthwise conv). Computed with `chunk`, the trace shows a split, which torch-pruning maps to
    channels i and C + i. Same values; only the recorded graph differs."""
    original = F.glu

    def glu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
        a, b = input.chunk(2, dim=dim)
        return a * torch.sigmoid(b)

    F.glu = glu
    try:
        yield
    finally:
        F.glu = original


def _detach_kept_activations(model: nn.Module) -> None:
    """Some modules keep their last activation as an attribute (ESPnet's attention keeps `attn` for
    plotting). Traced with gradients, those are autograd graph nodes, which pin the graph in memory
    and make the model impossible to deep-copy; detached, they are plain tensors again."""
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, name, value.detach())


class ChannelGroup(SliceGroup):
    """A torch-pruning group seen as channels: which slices produce each root channel."""

    def __init__(self, graph: tp.DependencyGraph, group, names: dict[nn.Module, str], head_projections=(),
                 hints: PruningHints = NO_HINTS):
        super().__init__()
        self.group = group
        self.root_module = group[0].dep.target.module
        self.root_name = names[self.root_module]
        self.size = len(group[0].idxs)
        reordered = getattr(graph, "deploykit_reordered", {})
        for item in group:
            dep = item.dep
            module = dep.target.module
            if isinstance(module, nn.Module) and module in names and graph.is_in_channel_pruning_fn(dep.handler):
                self.readers.append(Reader(names[module], module, [int(i) for i in item.idxs],
                                           [int(r) for r in item.root_idxs]))
            if isinstance(module, BLOCKING_TYPES):
                self.blocking.append(f"{names.get(module, '?')} ({type(module).__name__})")
                continue
            if module in head_projections:
                self.blocking.append(f"{names.get(module, '?')} (projection into attention heads)")
                continue
            if isinstance(module, nn.MultiheadAttention):
                # its input and output are embed_dim wide, which its heads split: channels cannot go one
                # by one there; its heads go as units (`deploykit.prune.blocks.MultiheadAttentionHeads`)
                self.blocking.append(f"{names.get(module, '?')} (nn.MultiheadAttention: its embed_dim is split into "
                                     "its heads; only whole heads can go)")
                continue
            if _is_grouped_conv(module):
                self.blocking.append(f"{names.get(module, '?')} (convolution in {module.groups} groups: its channels "
                                     "go only in equal shares of every group)")
                continue
            if not isinstance(module, nn.Module) or not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            if names.get(module) in reordered:
                self.blocking.append(f"{names[module]} (feeds {reordered[names[module]]} through a permute and a flatten: "
                                     "the consumer's columns are not in channel order, so its channels stay)")
                continue
            if not any(True for _ in module.parameters(recurse=False)):
                continue  # torch-pruning's placeholder nodes (add, cat, reshape) hold no weights
            slices = producer_slices(module, hints)
            if slices is None:
                self.unsupported.append(f"{names.get(module, '?')} ({type(module).__name__})")
                continue
            for param, dim in slices:
                for index, root in zip(item.idxs, item.root_idxs):
                    self.slices.append(Slice(names[module], module, param, dim, int(index), int(root)))

    def prune(self, channels: Sequence[int]) -> None:
        """Physically remove root `channels` from every layer of the group (records history)."""
        # With idxs, torch-pruning prunes (and records) a new sub-group, then records this whole
        # group's indices as well unless told not to: that second entry would replay as "prune all".
        self.group.prune(idxs=list(channels), record_history=False)


def _is_grouped_conv(module) -> bool:
    """A grouped (not depthwise) convolution: removing channels unevenly across groups breaks it.
    Depthwise ones (one channel per group) shrink like any other layer."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not (module.groups == module.in_channels == module.out_channels)


def head_projections(model: nn.Module, hints: PruningHints = NO_HINTS) -> dict[nn.Module, nn.Module]:
    """The children of attention modules (`splits_into_heads`, or named by an attention hint), each to
    its attention module: their output channels go only as whole heads."""
    return {child: m for name, m in model.named_modules() if splits_into_heads(m) or hints.is_attention(name)
            for child in m.children()}


def channel_groups(
    graph: tp.DependencyGraph, model: nn.Module, keep: Sequence[str] = (), block_history: list | None = None,
    hints: PruningHints = NO_HINTS,
) -> Iterator[SliceGroup]:
    """Groups whose width may change (not those of `keep`): torch-pruning's groups rooted at
    Linear/Conv/embedding layers, then the units of composite blocks it cannot see (`deploykit.prune.blocks`).

    Removals in torch-pruning groups are recorded in `graph.pruning_history()`; removals in block
    groups are appended to `block_history`.
    """
    names = {module: name for name, module in model.named_modules()}
    ignored = [model.get_submodule(name) for name in keep]
    heads = head_projections(model, hints)
    # the projections into heads keep their width (their groups would block below): not rooting groups
    # at them also spares torch-pruning the head reshapes it can loop on (grouped-query attention's
    # repeated key/value heads)
    groups = graph.get_all_groups(ignored_layers=[*ignored, *heads], root_module_types=(*ROOT_TYPES, *hints.layers))
    while True:
        try:
            group = next(groups)
        except StopIteration:
            break
        except DeployKitError:
            raise  # a time limit, say: it says itself what happened
        except Exception as exc:  # noqa: BLE001 - torch-pruning fails deep inside on layers it misreads
            unknown = unknown_layers(graph, model, hints)
            raise UnsupportedLayerError(
                f"torch-pruning could not follow the channels ({type(exc).__name__}: {exc})"
                + (f"; layers it cannot read: {', '.join(unknown)}: describe them with a LayerHandler hint, or "
                   "prune a model without them" if unknown else "")) from None
        yield ChannelGroup(graph, group, names, heads, hints)
    yield from block_groups(model, keep, [] if block_history is None else block_history)
