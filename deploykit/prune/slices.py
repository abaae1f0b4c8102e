"""The unit of structured pruning as pruners and the shrinker see it: a group of units (channels, heads),
each produced by parameter slices.

Its own module because both sources of groups build on it: torch-pruning's dependency graph
(`deploykit.prune.channels`) and the block handlers for layers torch-pruning cannot see
(`deploykit.prune.blocks`), which `channels` also gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Slice:
    """One parameter slice producing channel `root` of a group: `module.<param>[..., index, ...]` along `dim`."""

    module_name: str
    module: nn.Module
    param: str
    dim: int
    index: int
    root: int


@dataclass(frozen=True)
class Reader:
    """A layer reading a group's units as its input: its input `columns` (channels of a Conv, features of a
    Linear) carry root units `roots` (pairwise). Activation-aware scores and reconstruction use them."""

    module_name: str
    module: nn.Module
    columns: list[int]
    roots: list[int]


class SliceGroup:
    """Units (channels, heads) of a group, each produced by parameter slices; the interface pruners
    and the shrinker use. Subclasses fill `slices` and implement `prune`."""

    root_name: str
    size: int
    #: torch-pruning's group, for its importance scorers; None for groups it does not model
    group = None
    #: channels one unit spans in the layers it feeds (1 for a channel, the head size for a head): what
    #: channel alignment (`round_to`) counts
    unit_width = 1
    #: groups with the same key keep the same number of units (one config value sizes them all: a
    #: decoder's cache heads); None where each group keeps its own count
    even: object = None
    #: how many groups share `even` in the model, those kept whole included
    even_members = 1

    def __init__(self) -> None:
        self.slices: list[Slice] = []
        #: the layers reading the units (torch-pruning's in-channel dependencies; a block handler's own, such as
        #: an attention's output projection; empty where neither says)
        self.readers: list[Reader] = []
        self.unsupported: list[str] = []
        self.blocking: list[str] = []

    def dead_channels(self) -> list[int]:
        """Root units whose every producing slice is exactly zero (their output is identically 0)."""
        alive = set()
        for s in self.slices:
            if s.root not in alive and bool(getattr(s.module, s.param).select(s.dim, s.index).any()):
                alive.add(s.root)
        return [c for c in range(self.size) if c not in alive]

    def unit_matrix(self) -> torch.Tensor:
        """(size, features): each unit's producing values, for importance criteria."""
        rows: dict[int, list[torch.Tensor]] = {c: [] for c in range(self.size)}
        for s in self.slices:
            rows[s.root].append(getattr(s.module, s.param).detach().select(s.dim, s.index).reshape(-1))
        return torch.stack([torch.cat(rows[c]) for c in range(self.size)])

    def prune(self, channels: Sequence[int]) -> None:
        raise NotImplementedError


def evened(chosen: dict[str, Sequence[int]], groups: Sequence[SliceGroup]) -> dict[str, list[int]]:
    """`chosen` (root name -> units, first the ones to go first) cut so that groups sharing an `even`
    key lose the same number of units: the fewest any of them loses, none where one of them is not
    among `groups` (kept whole: excluded, or given sparsity 0)."""
    out = {name: list(units) for name, units in chosen.items()}
    by_key: dict[object, list[SliceGroup]] = {}
    for group in groups:
        if group.even is not None:
            by_key.setdefault(group.even, []).append(group)
    for members in by_key.values():
        complete = len(members) == members[0].even_members
        count = min(len(out.get(g.root_name, ())) for g in members) if complete else 0
        for group in members:
            out[group.root_name] = out.get(group.root_name, [])[:count]
    return out
