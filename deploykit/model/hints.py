"""Pruning hints: what a model's author tells deploykit (and torch-pruning) about layers it cannot read.

A model from the user's code (`deploykit.model.entrypoint`) returns a `ModelSpec` with `pruning_hints`, so
nothing in deploykit needs editing for:

- **custom layer types** (`layers`): a layer computing, say, `F.linear(x, self.weight, self.bias)`
  is opaque to torch-pruning, which guesses its parameters' channel dimensions and may get them
  wrong (seen: it took a functional Linear's weight for one pruned along its inputs). A
  `LayerHandler` names the (parameter, dimension) pairs holding one output and one input channel;
  deploykit turns it into a torch-pruning pruner, reads the layer's channels for pruning and
  dead-channel detection, and treats the type as a prunable layer like Linear;
- **layers whose width must stay** (`ignored_layers`, name patterns, like --exclude): never pruned,
  and any channel group that would change their output width is left whole;
- **attention blocks** (`attention`, name patterns): modules whose projections are reshaped into
  heads of a fixed size; one channel of those projections cannot go alone, so their groups are
  reported as not removable instead of being cut into a shape the reshape rejects.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class LayerHandler:
    """Where one output channel and one input channel of a layer type live.

    `out` and `inp` are (parameter or buffer name, dimension) pairs, e.g. for a functional Linear
    `LayerHandler(out=(("weight", 0), ("bias", 0)), inp=(("weight", 1),))`. `out_size` / `in_size`
    name integer attributes the layer keeps its widths in (kept in step when channels go)."""

    out: tuple[tuple[str, int], ...]
    inp: tuple[tuple[str, int], ...] = ()
    out_size: str | None = None
    in_size: str | None = None

    def pruner(self) -> tp.pruner.function.BasePruningFunc:
        return _HandlerPruner(self)


class _HandlerPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's pruner protocol, driven by a LayerHandler."""

    def __init__(self, handler: LayerHandler):
        super().__init__()
        self.handler = handler

    def _remove(self, layer: nn.Module, idxs: Sequence[int], pairs, size_attribute: str | None) -> nn.Module:
        width = self._width(layer, pairs)
        keep = sorted(set(range(width)) - set(idxs))
        for name, dim in pairs:
            value = getattr(layer, name, None)
            if isinstance(value, nn.Parameter):
                setattr(layer, name, self._prune_parameter_and_grad(value, keep, dim))
            elif isinstance(value, torch.Tensor):
                setattr(layer, name, torch.index_select(value, dim, torch.tensor(keep, device=value.device)))
        if size_attribute is not None:
            setattr(layer, size_attribute, len(keep))
        return layer

    @staticmethod
    def _width(layer: nn.Module, pairs) -> int | None:
        for name, dim in pairs:
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                return value.shape[dim]
        return None

    def prune_out_channels(self, layer, idxs):
        return self._remove(layer, idxs, self.handler.out, self.handler.out_size)

    def prune_in_channels(self, layer, idxs):
        return self._remove(layer, idxs, self.handler.inp, self.handler.in_size)

    def get_out_channels(self, layer):
        return self._width(layer, self.handler.out)

    def get_in_channels(self, layer):
        return self._width(layer, self.handler.inp)


@dataclass(frozen=True)
class PruningHints:
    """Hints for structured pruning and dense-shrunk (see the module docstring)."""

    layers: Mapping[type, LayerHandler] = field(default_factory=dict)
    ignored_layers: tuple[str, ...] = ()
    attention: tuple[str, ...] = ()

    def handler_for(self, module: nn.Module) -> LayerHandler | None:
        for kind, handler in self.layers.items():
            if isinstance(module, kind):
                return handler
        return None

    def customized_pruners(self) -> dict[type, tp.pruner.function.BasePruningFunc]:
        return {kind: handler.pruner() for kind, handler in self.layers.items()}

    def is_attention(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.attention)


NO_HINTS = PruningHints()


def hints_of(spec) -> PruningHints:
    """A spec's hints, or none (for callers holding no spec)."""
    return getattr(spec, "pruning_hints", None) or NO_HINTS
