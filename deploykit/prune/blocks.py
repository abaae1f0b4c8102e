"""Structured units inside composite modules that torch-pruning's dependency graph cannot see.

GPT-2 keeps its projections in transformers' `Conv1D` (weight stored (in, out), applied with
`addmm`), which torch-pruning does not recognise, and its attention heads are a reshape of one packed
QKV projection. The attention modules of BERT-like encoders, ViT and BART's encoder reshape their
projections into heads, which torch-pruning's channel groups cannot follow either. A *block handler*
exposes such units (attention heads, MLP hidden channels) as a `SliceGroup`, like a torch-pruning
group: the slices that produce each unit (to mask and to find dead units) and a removal. Removal goes
through transformers' own `prune_heads` / `prune_conv1d_layer` / `prune_linear_layer`, which also
keep head counts and `split_size` consistent. Blocks are matched by class path or by the interface
they offer (`prune_heads`; a head count inferred from the projection width), so this module never
imports transformers itself until it removes something.

torch's `nn.MultiheadAttention` cannot narrow, so its handler *replaces* it (`deploykit.prune.mha`).
Decoders whose head counts size the key/value cache from the config (grouped-query attention) keep
the same number of heads in every layer (`even_key`: the pruner and the shrinker cut all groups of a
key to the fewest), and their handler sets the config's counts. Attention modules whose heads stay
say why (`heads_stay_because`).

How to add a handler: subclass `BlockHandler` with `unit`, `root` (the layer whose name selects the
unit's sparsity in a plan; `root_of` where it depends on the block), `slices` and `remove` (and
`replaces`, `even_key` where they apply), and list it in `HANDLERS` under the block's class path (or
test its interface in `handler_for`).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Sequence

import torch
from torch import nn

from deploykit.core.hooks import class_path
from deploykit.prune.mha import HeadPrunedAttention
from deploykit.prune.slices import Reader, Slice, SliceGroup


class BlockHandler:
    unit = ""
    root = ""
    #: whether `remove` returns a new module to put in the block's place (the block cannot narrow itself)
    replaces = False

    def size(self, block: nn.Module) -> int:
        raise NotImplementedError

    def slices(self, block_name: str, block: nn.Module) -> list[Slice]:
        raise NotImplementedError

    def remove(self, block: nn.Module, units: Sequence[int]) -> nn.Module | None:
        """Remove `units` from `block`: in place (None), or, for a handler that `replaces`, as the new
        module to put in its place."""
        raise NotImplementedError

    def readers(self, block_name: str, block: nn.Module) -> list[Reader]:
        """The layers reading the units as their input (an attention's output projection): what
        activation-aware scores and reconstruction use (`deploykit.prune.activation`); none by default."""
        return []

    def unit_width(self, block: nn.Module) -> int:
        """Channels one unit spans (a head: its size)."""
        return 1

    def root_of(self, block: nn.Module) -> str:
        """The path, in the block, of the layer whose name selects the unit's sparsity in a plan."""
        return self.root

    def even_key(self, block: nn.Module) -> object:
        """Blocks with the same key must keep the same number of units (one config value sizes them
        all, as a decoder's key/value cache); None where each block may keep its own."""
        return None


def _column_slices(name: str, conv1d: nn.Module, columns: Sequence[tuple[int, int]]) -> list[Slice]:
    """Slices of a transformers Conv1D producing output columns: (column, root unit) pairs."""
    out = []
    for column, root in columns:
        out.append(Slice(name, conv1d, "weight", 1, column, root))  # Conv1D weight is (in, out)
        if conv1d.bias is not None:
            out.append(Slice(name, conv1d, "bias", 0, column, root))
    return out


class AttributeHeads(BlockHandler):
    """Heads of a module that says its head count and size as `num_heads` and `head_dim`."""

    unit = "heads"

    def size(self, block):
        return block.num_heads

    def unit_width(self, block):
        return block.head_dim


class GPT2Heads(AttributeHeads):
    """Attention heads of transformers' GPT2Attention: head h owns columns h*d..(h+1)*d of q, k and v."""

    root = "c_attn"

    def slices(self, block_name, block):
        d, width = block.head_dim, block.split_size
        columns = [(part * width + h * d + i, h) for h in range(block.num_heads) for part in range(3) for i in range(d)]
        return _column_slices(f"{block_name}.c_attn", block.c_attn, columns)

    def even_key(self, block):
        # one config head count sizes every layer's key/value cache in the exported decoder (optimum
        # builds the cache inputs from it): the layers of one model keep the same number of heads
        config = getattr(block, "config", None)
        return None if config is None or getattr(block, "is_cross_attention", False) else ("n_head", id(config))

    def readers(self, block_name, block):
        d = block.head_dim
        return [_reader(f"{block_name}.c_proj", block.c_proj, [(h * d + i, h) for h in range(block.num_heads)
                                                               for i in range(d)])]

    def remove(self, block, units):
        # prune_heads numbers heads as in the original model, skipping heads pruned earlier
        original = [h for h in range(block.num_heads + len(block.pruned_heads)) if h not in block.pruned_heads]
        block.prune_heads({original[u] for u in units})


class GPT2MLPHidden(BlockHandler):
    """Hidden channels of transformers' GPT2MLP: c_fc's output columns and c_proj's input rows."""

    unit = "hidden"
    root = "c_fc"

    def size(self, block):
        return block.c_fc.nf

    def slices(self, block_name, block):
        return _column_slices(f"{block_name}.c_fc", block.c_fc, [(j, j) for j in range(block.c_fc.nf)])

    def readers(self, block_name, block):
        return [_reader(f"{block_name}.c_proj", block.c_proj, [(j, j) for j in range(block.c_fc.nf)])]

    def remove(self, block, units):
        from transformers.pytorch_utils import prune_conv1d_layer

        drop = set(units)
        keep = torch.tensor([j for j in range(block.c_fc.nf) if j not in drop], dtype=torch.long)
        block.c_fc = prune_conv1d_layer(block.c_fc, keep, dim=1)
        block.c_proj = prune_conv1d_layer(block.c_proj, keep, dim=0)


#: names of the query, key and value projections inside transformers' attention modules
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
#: attributes saying the head count, and the head size, on the attention module or its child
HEAD_COUNT = ("num_attention_heads", "n_heads", "num_heads")
HEAD_SIZE = ("attention_head_size", "head_dim", "dim_per_head", "key_value_proj_dim")


def _row_slices(name: str, module: nn.Module, param: str, offset: int, heads: int, d: int) -> list[Slice]:
    """Slices of rows offset + h*d .. offset + (h+1)*d of `module.<param>`, head h the unit."""
    return [Slice(name, module, param, 0, offset + h * d + i, h) for h in range(heads) for i in range(d)]


def _projection_slices(name: str, linear: nn.Linear, heads: int, d: int) -> list[Slice]:
    """Slices of a Linear projection into `heads` units of `d` rows each: its weight's rows and its bias's."""
    return [s for param in ("weight", "bias") if getattr(linear, param) is not None
            for s in _row_slices(name, linear, param, 0, heads, d)]


def _heads_layout(block: nn.Module) -> tuple[nn.Module, str, tuple[str, str, str]] | None:
    """(the module holding the head count, its path in `block`, q/k/v names) of an attention module
    of transformers that prunes its own heads, or None where its layout is not one of these."""
    for path, holder in [("", block), *block.named_children()]:
        count = next((a for a in HEAD_COUNT if isinstance(getattr(holder, a, None), int)), None)
        size = next((a for a in HEAD_SIZE if isinstance(getattr(holder, a, None), int)), None)
        names = next((n for n in QKV_NAMES if all(isinstance(getattr(holder, x, None), nn.Linear) for x in n)), None)
        if count and size and names:
            return holder, path, names
    return None


class TransformersHeads(BlockHandler):
    """Attention heads of transformers' modules that prune their own heads (`prune_heads(heads)` and a
    `pruned_heads` set: BERT, RoBERTa, ELECTRA, ViT, DeiT, DistilBERT, T5's encoder, ... found by that
    interface, not by class): head h owns rows h*d..(h+1)*d of the query, key and value projections.
    Removal is the module's own `prune_heads`, which also shrinks the output projection's input and its
    head count. T5's keeps the shared relative-position bias at the original head count on purpose:
    each layer picks its remaining heads' columns by its `pruned_heads`. Not in a decoder
    (`is_decoder`): its heads size the key/value cache, built alike for every layer."""

    unit = "heads"

    @staticmethod
    def applies(block: nn.Module) -> bool:
        return (callable(getattr(block, "prune_heads", None)) and isinstance(getattr(block, "pruned_heads", None), set)
                and not getattr(block, "is_decoder", False) and _heads_layout(block) is not None)

    @staticmethod
    def _holder(block):
        holder, path, names = _heads_layout(block)
        count = next(a for a in HEAD_COUNT if isinstance(getattr(holder, a, None), int))
        size = next(a for a in HEAD_SIZE if isinstance(getattr(holder, a, None), int))
        return holder, path, names, getattr(holder, count), getattr(holder, size)

    def root_of(self, block) -> str:
        _, path, names, _, _ = self._holder(block)
        return f"{path}.{names[0]}" if path else names[0]

    def size(self, block):
        return self._holder(block)[3]

    def unit_width(self, block):
        return self._holder(block)[4]

    def slices(self, block_name, block):
        holder, path, names, heads, d = self._holder(block)
        prefix = f"{block_name}.{path}" if path else block_name
        return [s for name in names for s in _projection_slices(f"{prefix}.{name}", getattr(holder, name), heads, d)]

    def even_key(self, block):
        # one config head count sizes every layer's key/value cache in the exported decoder (optimum
        # builds the cache inputs from it): the layers of one model keep the same number of heads
        config = getattr(block, "config", None)
        return None if config is None or getattr(block, "is_cross_attention", False) else ("n_head", id(config))

    def remove(self, block, units):
        # prune_heads numbers heads as in the original model, skipping heads pruned earlier
        heads = self._holder(block)[3]
        original = [h for h in range(heads + len(block.pruned_heads)) if h not in block.pruned_heads]
        block.prune_heads({original[u] for u in units})


TRANSFORMERS_HEADS = TransformersHeads()


class ReshapedHeads(BlockHandler):
    """Heads of transformers' encoder attention modules that infer their head count from the
    projection width (`view(batch, length, -1, head_dim)`: BART's, mBART's, Marian's, Whisper's
    encoders): head h owns rows h*d..(h+1)*d of q_proj, k_proj and v_proj and the same columns of the
    output projection, so slicing those removes it. Only encoders (`is_decoder` False): a decoder's
    heads size the key/value cache inputs, which optimum builds from the config for every layer alike.
    The config's head count cannot say a per-layer number; the artifact's pruning history does."""

    unit = "heads"
    root = "q_proj"
    PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    @classmethod
    def applies(cls, block: nn.Module) -> bool:
        linear = all(isinstance(getattr(block, n, None), nn.Linear) for n in cls.PROJECTIONS)
        has_output = any(isinstance(getattr(block, n, None), nn.Linear) for n in ("out_proj", "o_proj"))
        return (linear and has_output and isinstance(getattr(block, "head_dim", None), int)
                and getattr(block, "is_decoder", None) is False and not hasattr(block, "prune_heads")
                and getattr(block, "num_key_value_groups", 1) == 1)

    def size(self, block):
        return block.q_proj.out_features // block.head_dim

    def unit_width(self, block):
        return block.head_dim

    def slices(self, block_name, block):
        return [s for name in self.PROJECTIONS
                for s in _projection_slices(f"{block_name}.{name}", getattr(block, name), self.size(block),
                                            block.head_dim)]

    def remove(self, block, units):
        from transformers.pytorch_utils import prune_linear_layer

        d, drop = block.head_dim, set(units)
        keep = torch.tensor([h * d + i for h in range(self.size(block)) if h not in drop for i in range(d)],
                            dtype=torch.long)
        for name in self.PROJECTIONS:
            setattr(block, name, prune_linear_layer(getattr(block, name), keep, dim=0))
        output = next(n for n in ("out_proj", "o_proj") if isinstance(getattr(block, n, None), nn.Linear))
        setattr(block, output, prune_linear_layer(getattr(block, output), keep, dim=1))
        if isinstance(getattr(block, "num_heads", None), int):
            block.num_heads = self.size(block)


RESHAPED_HEADS = ReshapedHeads()


def _narrow_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping the output rows (dim 0) or input columns (dim 1) `keep`."""
    weight = linear.weight.index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.index_select(0, keep) if dim == 0 else linear.bias)
    return new.to(linear.weight.dtype).train(linear.training)


class ESPnetHeads(BlockHandler):
    """Heads of ESPnet's MultiHeadedAttention and its relative-position variants (Conformer encoders,
    Transformer decoders): head h owns rows h*d_k..(h+1)*d_k of linear_q, linear_k, linear_v and
    linear_pos, row h of pos_bias_u and pos_bias_v, and those columns of linear_out; `h` is the count
    every call reads. ESPnet's decoder caches each layer's output (the model width), not per-head keys
    and values, so a decoder's heads go like an encoder's."""

    unit = "heads"
    root = "linear_q"
    PROJECTIONS = ("linear_q", "linear_k", "linear_v", "linear_pos")

    def size(self, block):
        return block.h

    def unit_width(self, block):
        return block.d_k

    def slices(self, block_name, block):
        return [s for name in self.PROJECTIONS if isinstance(getattr(block, name, None), nn.Linear)
                for s in _projection_slices(f"{block_name}.{name}", getattr(block, name), block.h, block.d_k)]

    def readers(self, block_name, block):
        d = block.d_k
        return [_reader(f"{block_name}.linear_out", block.linear_out, [(h * d + i, h) for h in range(block.h)
                                                                       for i in range(d)])]

    def remove(self, block, units):
        d, drop = block.d_k, set(units)
        heads = torch.tensor([h for h in range(block.h) if h not in drop], dtype=torch.long)
        keep = torch.tensor([h * d + i for h in heads.tolist() for i in range(d)], dtype=torch.long)
        for name in self.PROJECTIONS:
            if isinstance(getattr(block, name, None), nn.Linear):
                setattr(block, name, _narrow_linear(getattr(block, name), keep, dim=0))
        block.linear_out = _narrow_linear(block.linear_out, keep, dim=1)
        for name in ("pos_bias_u", "pos_bias_v"):
            if isinstance(getattr(block, name, None), nn.Parameter):
                setattr(block, name, nn.Parameter(getattr(block, name).detach().index_select(0, heads).clone()))
        block.h = len(heads)


class MultiheadAttentionHeads(AttributeHeads):
    """Heads of torch's `nn.MultiheadAttention` (torchvision's ViT, users' models): head h owns rows
    h*d..(h+1)*d of the query, key and value parts of its packed `in_proj_weight` (or of
    `q/k/v_proj_weight` where keys and values are of other widths) and of `in_proj_bias`. torch's
    module cannot narrow, so removal returns a `HeadPrunedAttention` holding the kept heads; the
    output projection's name stays `out_proj`, which is the root a plan names."""

    root = "out_proj"
    replaces = True

    @staticmethod
    def applies(block: nn.Module) -> bool:
        return isinstance(block, nn.MultiheadAttention) and HeadPrunedAttention.supports(block) is None

    def slices(self, block_name, block):
        h, d, e = block.num_heads, block.head_dim, block.embed_dim
        if block._qkv_same_embed_dim:
            out = [s for part in range(3) for s in _row_slices(block_name, block, "in_proj_weight", part * e, h, d)]
        else:
            out = [s for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
                   for s in _row_slices(block_name, block, p, 0, h, d)]
        if block.in_proj_bias is not None:
            out += [s for part in range(3) for s in _row_slices(block_name, block, "in_proj_bias", part * e, h, d)]
        return out

    def remove(self, block, units):
        drop = set(units)
        return HeadPrunedAttention.from_mha(block, [h for h in range(block.num_heads) if h not in drop])


class PrunedAttentionHeads(AttributeHeads):
    """The remaining heads of a `HeadPrunedAttention` (pruned again: iterative pruning, a second shrink)."""

    root = "out_proj"

    def slices(self, block_name, block):
        return [s for name in ("q_proj", "k_proj", "v_proj")
                for s in _projection_slices(f"{block_name}.{name}", getattr(block, name), block.num_heads,
                                            block.head_dim)]

    def remove(self, block, units):
        block.remove(units)


MULTIHEAD_ATTENTION_HEADS = MultiheadAttentionHeads()


class GroupedQueryHeads(BlockHandler):
    """Key/value heads of transformers' decoder attention that keeps its head size in the config
    (`head_dim`: Llama, Mistral, Qwen2 and the other grouped-query attention modules): key/value head g
    owns rows g*d..(g+1)*d of k_proj and v_proj and the rows of its `num_key_value_groups` query heads
    in q_proj (and their columns in o_proj), so one unit is a whole group of query heads with the
    key/value head they share. The modules read their widths from the projections, but the key/value
    cache every layer is given is sized by the config's head counts: so all layers keep the same number
    of heads (`even_key`), and the config is set to the counts left, which is what the artifact's
    config and the exported graphs' cache inputs then say."""

    unit = "heads"
    root = "q_proj"
    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def applies(cls, block: nn.Module) -> bool:
        config = getattr(block, "config", None)
        counts = [getattr(config, a, None) for a in ("num_attention_heads", "num_key_value_heads")]
        return (all(isinstance(getattr(block, n, None), nn.Linear) for n in cls.PROJECTIONS)
                and all(isinstance(c, int) and c > 0 for c in counts)
                and block.head_dim == config_head_size(config) and isinstance(getattr(block, "num_key_value_groups", None), int)
                and getattr(block, "is_causal", False) is True)

    def size(self, block):
        return block.k_proj.out_features // block.head_dim

    def unit_width(self, block):
        return block.head_dim * block.num_key_value_groups  # the o_proj columns one unit feeds

    def even_key(self, block):
        return ("num_key_value_heads", id(block.config))

    def _rows(self, block, units) -> tuple[list[int], list[int]]:
        """(query rows, key/value rows) of key/value heads `units`."""
        d, n = block.head_dim, block.num_key_value_groups
        return ([(g * n + r) * d + i for g in units for r in range(n) for i in range(d)],
                [g * d + i for g in units for i in range(d)])

    def slices(self, block_name, block):
        # a unit's query rows are contiguous: its num_key_value_groups query heads side by side
        kv, d = self.size(block), block.head_dim
        widths = {"q_proj": d * block.num_key_value_groups, "k_proj": d, "v_proj": d}
        return [s for name, width in widths.items()
                for s in _projection_slices(f"{block_name}.{name}", getattr(block, name), kv, width)]

    def remove(self, block, units):
        from transformers.pytorch_utils import prune_linear_layer

        drop = set(units)
        left = [g for g in range(self.size(block)) if g not in drop]
        query, key_value = (torch.tensor(rows, dtype=torch.long) for rows in self._rows(block, left))
        block.q_proj = prune_linear_layer(block.q_proj, query, dim=0)
        block.k_proj = prune_linear_layer(block.k_proj, key_value, dim=0)
        block.v_proj = prune_linear_layer(block.v_proj, key_value, dim=0)
        block.o_proj = prune_linear_layer(block.o_proj, query, dim=1)
        block.config.num_key_value_heads = len(left)
        block.config.num_attention_heads = len(left) * block.num_key_value_groups
        # said outright: a config without it (Mistral's, Qwen2's) derives it from the head count, which changed
        block.config.head_dim = block.head_dim


def config_head_size(config) -> int | None:
    """The head size a transformers config gives its attention: `head_dim` where it says one, else
    hidden_size / num_attention_heads, as the models derive it (Mistral, Qwen2 keep no `head_dim`)."""
    size = getattr(config, "head_dim", None)
    if isinstance(size, int) and size > 0:
        return size
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


GROUPED_QUERY_HEADS = GroupedQueryHeads()

HANDLERS: dict[str, BlockHandler] = {
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": GPT2Heads(),
    "transformers.models.gpt2.modeling_gpt2.GPT2MLP": GPT2MLPHidden(),
    "deploykit.prune.mha.HeadPrunedAttention": PrunedAttentionHeads(),
    **{f"espnet.nets.pytorch_backend.transformer.attention.{name}": ESPnetHeads()
       for name in ("MultiHeadedAttention", "RelPositionMultiHeadedAttention", "LegacyRelPositionMultiHeadedAttention")},
}


def handler_for(module: nn.Module) -> BlockHandler | None:
    """The handler of a block: by class path, else by the interface (`MultiheadAttentionHeads`,
    `TransformersHeads`, `ReshapedHeads`, `GroupedQueryHeads`: their `applies`)."""
    cls = type(module)
    handler = HANDLERS.get(class_path(cls))
    if handler is None and MultiheadAttentionHeads.applies(module):
        return MULTIHEAD_ATTENTION_HEADS
    if handler is None and cls.__module__.startswith("transformers."):
        if TransformersHeads.applies(module):
            return TRANSFORMERS_HEADS
        if ReshapedHeads.applies(module):
            return RESHAPED_HEADS
        if GroupedQueryHeads.applies(module):
            return GROUPED_QUERY_HEADS
    return handler


def heads_stay_because(module: nn.Module) -> str:
    """Why the heads of an attention module without a handler (or kept whole by it) cannot go."""
    if isinstance(module, nn.MultiheadAttention):
        return HeadPrunedAttention.supports(module) or "its heads go as units of the module, not by projection"
    if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
        return ("a decoder's heads size its key/value cache, which the exported graphs take in the shape the "
                "config's one head count gives every layer; deploykit prunes them where it knows the module's "
                "projections and the config's head counts (GPT-2, grouped-query decoders), the same number in every "
                "layer")
    return "deploykit has no handler that takes this attention module's heads apart"


def _reader(name: str, module: nn.Module, columns: list[tuple[int, int]]) -> Reader:
    """A layer reading (input column, unit) pairs."""
    return Reader(name, module, [c for c, _ in columns], [u for _, u in columns])


class BlockGroup(SliceGroup):
    def __init__(self, model: nn.Module, handler: BlockHandler, block_name: str, block: nn.Module, history: list):
        super().__init__()
        self.model, self.handler, self.block_name, self.block = model, handler, block_name, block
        self.root_name = f"{block_name}.{handler.root_of(block)}"
        self.size = handler.size(block)
        self.unit_width = handler.unit_width(block)
        self.slices = handler.slices(block_name, block)
        self.readers = handler.readers(block_name, block)
        self.even = handler.even_key(block)
        self._history = history

    def prune(self, channels: Sequence[int]) -> None:
        self.block = _remove(self.model, self.handler, self.block_name, self.block, list(channels))
        self._history.append([self.block_name, self.handler.unit, [int(c) for c in channels]])


def _remove(model: nn.Module, handler: BlockHandler, block_name: str, block: nn.Module,
            units: list[int]) -> nn.Module:
    """Remove `units` of `block`; the block now in its place (a new one where the handler replaces)."""
    new = handler.remove(block, units)
    if new is None:
        return block
    parent, _, leaf = block_name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
    return new


def block_groups(model: nn.Module, keep: Sequence[str], history: list) -> Iterator[BlockGroup]:
    """One group per handled block (not inside `keep`; not the model itself where the handler would
    replace it); removals are appended to `history`. Groups that must stay even (`BlockHandler.even_key`)
    say how many blocks share their key, kept ones included (`SliceGroup.even_members`)."""
    handled = [(name, module, handler) for name, module in model.named_modules()
               if (handler := handler_for(module)) is not None and not (handler.replaces and not name)]
    members = Counter(key for _, module, handler in handled if (key := handler.even_key(module)) is not None)
    for name, module, handler in handled:
        if not any(name == k or name.startswith(k + ".") for k in keep):
            group = BlockGroup(model, handler, name, module, history)
            group.even_members = members[group.even] if group.even is not None else 1
            yield group


def replay_blocks(model: nn.Module, history: list) -> None:
    for block_name, unit, units in history:
        block = model.get_submodule(block_name)
        handler = handler_for(block)
        if handler is None or handler.unit != unit or (handler.replaces and not block_name):
            raise ValueError(f"cannot replay {unit} removal on {block_name} ({type(block).__name__})")
        _remove(model, handler, block_name, block, units)
