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

How to add a handler: subclass `BlockHandler` with `unit`, `root` (the layer whose name selects the
unit's sparsity in a plan; `root_of` where it depends on the block), `slices` and `remove`, and list it
in `HANDLERS` under the block's class path (or test its interface in `handler_for`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from deploykit.prune.slices import Slice, SliceGroup


class BlockHandler:
    unit = ""
    root = ""

    def size(self, block: nn.Module) -> int:
        raise NotImplementedError

    def slices(self, block_name: str, block: nn.Module) -> list[Slice]:
        raise NotImplementedError

    def remove(self, block: nn.Module, units: Sequence[int]) -> None:
        raise NotImplementedError

    def unit_width(self, block: nn.Module) -> int:
        """Channels one unit spans (a head: its size)."""
        return 1

    def root_of(self, block: nn.Module) -> str:
        """The path, in the block, of the layer whose name selects the unit's sparsity in a plan."""
        return self.root


def _column_slices(name: str, conv1d: nn.Module, columns: Sequence[tuple[int, int]]) -> list[Slice]:
    """Slices of a transformers Conv1D producing output columns: (column, root unit) pairs."""
    out = []
    for column, root in columns:
        out.append(Slice(name, conv1d, "weight", 1, column, root))  # Conv1D weight is (in, out)
        if conv1d.bias is not None:
            out.append(Slice(name, conv1d, "bias", 0, column, root))
    return out


class GPT2Heads(BlockHandler):
    """Attention heads of transformers' GPT2Attention: head h owns columns h*d..(h+1)*d of q, k and v."""

    unit = "heads"
    root = "c_attn"

    def size(self, block):
        return block.num_heads

    def unit_width(self, block):
        return block.head_dim

    def slices(self, block_name, block):
        d, width = block.head_dim, block.split_size
        columns = [(part * width + h * d + i, h) for h in range(block.num_heads) for part in range(3) for i in range(d)]
        return _column_slices(f"{block_name}.c_attn", block.c_attn, columns)

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
HEAD_SIZE = ("attention_head_size", "head_dim", "dim_per_head")


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
    `pruned_heads` set: BERT, RoBERTa, ELECTRA, ViT, DeiT, DistilBERT, ... found by that interface, not
    by class): head h owns rows h*d..(h+1)*d of the query, key and value projections. Removal is the
    module's own `prune_heads`, which also shrinks the output projection's input and its head count.
    T5's attention is left whole: its `prune_heads` keeps the relative-position bias at the old head
    count, and the layers share that bias."""

    unit = "heads"

    @staticmethod
    def applies(block: nn.Module) -> bool:
        return (callable(getattr(block, "prune_heads", None)) and isinstance(getattr(block, "pruned_heads", None), set)
                and getattr(block, "relative_attention_bias", None) is None and _heads_layout(block) is not None)

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
        out = []
        for name in names:
            linear = getattr(holder, name)
            full = f"{block_name}.{path}.{name}" if path else f"{block_name}.{name}"
            for h in range(heads):
                for row in range(h * d, (h + 1) * d):
                    out.append(Slice(full, linear, "weight", 0, row, h))
                    if linear.bias is not None:
                        out.append(Slice(full, linear, "bias", 0, row, h))
        return out

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
        d = block.head_dim
        out = []
        for name in self.PROJECTIONS:
            linear = getattr(block, name)
            for h in range(self.size(block)):
                for row in range(h * d, (h + 1) * d):
                    out.append(Slice(f"{block_name}.{name}", linear, "weight", 0, row, h))
                    if linear.bias is not None:
                        out.append(Slice(f"{block_name}.{name}", linear, "bias", 0, row, h))
        return out

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

HANDLERS: dict[str, BlockHandler] = {
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": GPT2Heads(),
    "transformers.models.gpt2.modeling_gpt2.GPT2MLP": GPT2MLPHidden(),
}


def handler_for(module: nn.Module) -> BlockHandler | None:
    """The handler of a block: by class path, else by the interface (`TransformersHeads.applies`,
    `ReshapedHeads.applies`)."""
    cls = type(module)
    handler = HANDLERS.get(f"{cls.__module__}.{cls.__qualname__}")
    if handler is None and cls.__module__.startswith("transformers."):
        if TransformersHeads.applies(module):
            return TRANSFORMERS_HEADS
        if ReshapedHeads.applies(module):
            return RESHAPED_HEADS
    return handler


class BlockGroup(SliceGroup):
    def __init__(self, handler: BlockHandler, block_name: str, block: nn.Module, history: list):
        super().__init__()
        self.handler, self.block_name, self.block = handler, block_name, block
        self.root_name = f"{block_name}.{handler.root_of(block)}"
        self.size = handler.size(block)
        self.unit_width = handler.unit_width(block)
        self.slices = handler.slices(block_name, block)
        self._history = history

    def prune(self, channels: Sequence[int]) -> None:
        self.handler.remove(self.block, list(channels))
        self._history.append([self.block_name, self.handler.unit, [int(c) for c in channels]])


def block_groups(model: nn.Module, keep: Sequence[str], history: list) -> Iterator[BlockGroup]:
    """One group per handled block (not inside `keep`); removals are appended to `history`."""
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is not None and not any(name == k or name.startswith(k + ".") for k in keep):
            yield BlockGroup(handler, name, module, history)


def replay_blocks(model: nn.Module, history: list) -> None:
    for block_name, unit, units in history:
        block = model.get_submodule(block_name)
        handler = handler_for(block)
        if handler is None or handler.unit != unit:
            raise ValueError(f"cannot replay {unit} removal on {block_name} ({type(block).__name__})")
        handler.remove(block, units)
