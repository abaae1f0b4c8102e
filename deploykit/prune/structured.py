"""Structured pruners: zero whole output channels (rows of Linear, filters of Conv) by coupled group.

Channels are scored per torch-pruning group (L1 or L2 norm, FPGM's distance to the geometric median,
or random), and the lowest-scoring ones are masked in *every* layer that produces them (the Linear or
Conv rows and biases, BatchNorm scale and shift, each residual branch), so the channel's output is
exactly zero and `dense-shrunk` can later remove it without changing the model's outputs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
import torch_pruning as tp
from torch.nn.utils import prune

from deploykit.core.errors import UsageError
from deploykit.model.hints import hints_of
from deploykit.prune.base import PRUNERS, Outcome, PruneContext
from deploykit.prune.blocks import heads_stay_because
from deploykit.prune.channels import (
    SliceGroup,
    UnsupportedLayerError,
    channel_groups,
    dependency_graph,
    grouping_deadline,
    head_projections,
)
from deploykit.prune.slices import evened


class Criterion:
    """Channel importance: torch-pruning's scorer for its groups, `units` over each unit's weights
    (rows of `SliceGroup.unit_matrix`) for the blocks it cannot see.

    Across groups raw norms are not comparable (layers differ in scale), so global ranking divides
    scores by their group mean, as torch-pruning's own global pruning does.
    """

    def __init__(self, local: tp.importance.Importance, normalised: tp.importance.Importance,
                 units: Callable[[torch.Tensor], torch.Tensor]):
        self.local, self.normalised, self.units = local, normalised, units

    def __call__(self, group: SliceGroup, normalise: bool) -> torch.Tensor:
        if group.group is not None:
            try:
                scores = (self.normalised if normalise else self.local)(group.group)
            except (IndexError, RuntimeError, ValueError) as exc:
                # torch-pruning's index mapping went wrong on this group (seen: GPT-NeoX's fused, head-
                # interleaved query_key_value maps to negative indices): its channels cannot be trusted
                raise UnsupportedLayerError(
                    f"torch-pruning cannot map the channels of the group of {group.root_name} ({type(exc).__name__}: "
                    f"{(str(exc).splitlines() or [''])[0][:120]}); a fused or head-interleaved projection does this: "
                    f"--exclude '{group.root_name}' keeps it whole, or prune with an unstructured method (magnitude, "
                    "random)") from None
            if scores is not None:
                return scores
            # torch-pruning scores no parameter of this group (its layers have no handler it scores
            # with, an LSTM say): the group's own producing slices are scored instead
        if not group.slices or {s.root for s in group.slices} != set(range(group.size)):
            raise UnsupportedLayerError(
                f"cannot score the channels of the group of {group.root_name}: no weight produces them that "
                f"deploykit or torch-pruning can read; exclude {group.root_name} with --exclude, or describe its "
                "layer with a LayerHandler hint")
        scores = self.units(group.unit_matrix())
        return scores / scores.mean().clamp_min(1e-12) if normalise else scores


class StructuredPruner:
    """Mask the lowest-importance channels of each group."""

    #: it removes whole channels: the widths it leaves are what `round_to` aligns
    structured = True

    def __init__(self, criterion: Criterion):
        self.criterion = criterion

    def apply(self, ctx: PruneContext) -> Outcome:
        return self.masked(ctx)[0]

    def masked(self, ctx: PruneContext) -> tuple[Outcome, list[SliceGroup], dict[str, list[int]]]:
        """Mask the chosen channels: the outcome, the groups pruned, and the root channels each lost."""
        hints = hints_of(ctx.spec)
        with grouping_deadline(ctx.plan.graph_timeout_s):
            graph = dependency_graph(ctx.model, ctx.example_inputs, hints)
            # an output's width never changes, --prune-output or not: the form would zero it, not remove it
            keep = (*ctx.excluded, *ctx.output_layers)
            groups = [g for g in channel_groups(graph, ctx.model, keep=keep, hints=hints)
                      if g.root_name in ctx.targets]
        # Channels feeding a LayerNorm or split into attention heads cannot be removed exactly, so
        # masking them would buy nothing.
        not_removable = {g.root_name: g.blocking for g in groups if g.blocking}
        for group in groups:  # every layer producing a blocked group's channels, not its root only
            for s in group.slices if group.blocking else ():
                not_removable.setdefault(s.module_name, group.blocking)
        projections = head_projections(ctx.model, hints)  # not group roots: whole heads only
        groups = [g for g in groups if not g.blocking]
        roots = {g.root_name for g in groups}  # a head block's root is one of its projections
        grouped_blocks = {id(g.block) for g in groups if getattr(g, "handler", None) is not None}
        not_removable.update({name: [f"a projection of an attention module whose heads stay: "
                                     f"{heads_stay_because(projections[module])}"]
                              for name, module in ctx.model.named_modules()
                              if name in ctx.targets and module in projections and name not in roots
                              and id(projections[module]) not in grouped_blocks})
        for group in groups:
            if group.unsupported:
                raise UnsupportedLayerError(
                    f"structured pruning cannot mask channels of {', '.join(group.unsupported)} "
                    f"(in the group of {group.root_name}); exclude it with --exclude (its width then stays, and "
                    "so does its group's), or describe its type with a LayerHandler hint"
                )
        ungrouped = sorted(set(ctx.targets) - {g.root_name for g in groups} - set(not_removable))
        if not groups:
            raise UsageError(
                "structured pruning found no removable channel group among the selected layers"
                + (f"; no torch-pruning group for: {', '.join(ungrouped)}" if ungrouped else "")
                + (f" ({', '.join(sorted(set(ungrouped) & set(ctx.output_layers)))} produce{'s' * (len(set(ungrouped) & set(ctx.output_layers)) == 1)} "
                   "an output, whose width structured pruning never changes)"
                   if set(ungrouped) & set(ctx.output_layers) else "")
                + ("; not removable: " + ", ".join(f"{name} ({reasons[0]})" for name, reasons in not_removable.items())
                   if not_removable else "")
            )
        chosen = self._choose(ctx, groups)
        masks = defaultdict(dict)
        for group in groups:
            picked = set(chosen[group.root_name])
            for s in group.slices:
                if s.root in picked:
                    mask = masks[s.module_name].setdefault(
                        s.param, torch.ones_like(getattr(s.module, s.param), dtype=torch.bool))
                    mask.select(s.dim, s.index).fill_(False)
        for module_name, params in masks.items():
            module = ctx.model.get_submodule(module_name)
            for param, mask in params.items():
                prune.custom_from_mask(module, param, mask)
        requested = sum(len(c) for c in chosen.values())
        masked = sum(len(set(chosen[g.root_name]) & set(g.dead_channels())) for g in groups)
        details = {"channels_masked": {name: len(c) for name, c in chosen.items()},
                   "skipped_normalised_groups": not_removable, "without_group": ungrouped,
                   "heads_kept": heads_kept(ctx, groups, chosen, projections)}
        return Outcome("channels", requested, masked, details), groups, chosen

    def _choose(self, ctx: PruneContext, groups: list[SliceGroup]) -> dict[str, list[int]]:
        """Root channels to prune per group, lowest scores first; every group keeps at least one
        channel, and with `round_to` a multiple of it (of channels: heads count their width); groups
        that must stay even lose the same number."""
        chosen = evened(self._lowest(ctx, groups), groups)
        # units a multiple of round_to channels wide: a head of 64 channels is aligned to 8 already
        multiples = {g.root_name: ctx.plan.round_to // math.gcd(ctx.plan.round_to, g.unit_width) for g in groups}
        sizes = {g.root_name: g.size for g in groups}
        return {name: aligned(channels, sizes[name], multiples[name]) for name, channels in chosen.items()}

    def _lowest(self, ctx: PruneContext, groups: list[SliceGroup]) -> dict[str, list[int]]:
        chosen: dict[str, list[int]] = {}
        if ctx.plan.scope == "layer":
            for group in groups:
                n = min(round(ctx.targets[group.root_name] * group.size), group.size - 1)
                scores = self.criterion(group, normalise=False)
                chosen[group.root_name] = torch.argsort(scores)[:n].tolist()
            return chosen
        by_amount = defaultdict(list)
        for group in groups:
            by_amount[ctx.targets[group.root_name]].append(group)
        for amount, members in by_amount.items():
            scored = [(float(score), group.root_name, c)
                      for group in members for c, score in enumerate(self.criterion(group, normalise=True))]
            budget = round(amount * sum(g.size for g in members))
            sizes = {g.root_name: g.size for g in members}
            for group in members:
                chosen[group.root_name] = []
            for _, name, channel in sorted(scored):
                if budget == 0:
                    break
                if len(chosen[name]) < sizes[name] - 1:
                    chosen[name].append(channel)
                    budget -= 1
        return chosen


def heads_kept(ctx: PruneContext, groups: list[SliceGroup], chosen: dict[str, list[int]],
               projections: dict) -> dict[str, str]:
    """Each layer of a group that lost nothing although the plan asked for some (the projections of an
    attention that kept its heads, the layers of a channel group) -> why: said where the export lists
    the weights it left dense, so that nothing is kept silently."""
    found = {}
    for group in groups:
        if chosen.get(group.root_name) or not ctx.targets.get(group.root_name) or group.blocking:
            continue
        handler = getattr(group, "handler", None)
        heads = handler is not None and handler.unit == "heads"
        units = "heads" if heads else "channels"
        if ctx.plan.scope == "layer":
            why = (f"{ctx.targets[group.root_name]:g} of its {group.size} {units} rounds to none"
                   + (f" (--round-to {ctx.plan.round_to})" if ctx.plan.round_to > 1 else ""))
        else:
            why = (f"under the global plan none of its {group.size} {units} scored below the threshold the others set"
                   + (", and every layer keeps the same number of heads (the key/value cache), so the layer that "
                      "lost fewest sets the count" if heads and group.even is not None else "")
                   + (f"; --scope layer removes the plan's share of {units} in each layer"))
        if heads:
            layers = {s.module_name for s in group.slices} | {name for name, module in ctx.model.named_modules()
                                                             if projections.get(module) is group.block}
            for name in layers:
                found[name] = f"{group.block_name} kept its {group.size} heads: {why}"
        else:
            for name in {s.module_name for s in group.slices}:
                found.setdefault(name, f"its group ({group.root_name}) kept its {group.size} channels: {why}")
    return found


def aligned(chosen: list[int], size: int, multiple: int) -> list[int]:
    """The first of `chosen` (lowest scores first) that leave a multiple of `multiple` of the `size`
    units: rounding the kept count up, so alignment never prunes more than asked. A group smaller
    than `multiple` keeps all its units."""
    if multiple <= 1:
        return chosen
    keep = -(-(size - len(chosen)) // multiple) * multiple  # ceil to a multiple
    return chosen[:max(size - keep, 0)] if keep <= size else []


def _magnitude(p: int) -> Criterion:
    return Criterion(
        tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None),
        tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean"),
        lambda units: units.norm(p=p, dim=1),
    )


PRUNERS.add("l1-structured", StructuredPruner(_magnitude(1)))
PRUNERS.add("l2-structured", StructuredPruner(_magnitude(2)))
PRUNERS.add("fpgm", StructuredPruner(Criterion(
    tp.importance.FPGMImportance(p=2, normalizer=None),
    tp.importance.FPGMImportance(p=2, normalizer="mean"),
    lambda units: torch.cdist(units, units).sum(dim=1),  # distance to all others: near the median = redundant
)))
PRUNERS.add("random-structured", StructuredPruner(Criterion(
    tp.importance.RandomImportance(), tp.importance.RandomImportance(), lambda units: torch.rand(len(units)),
)))
