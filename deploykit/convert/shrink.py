"""Dense-shrunk conversion: physically remove channels that are zero across their whole group.

After structured pruning and mask stripping, pruned channels are rows of zeros that still cost time.
`shrink` finds, group by group (torch-pruning's dependency graph: residual adds, BatchNorm,
concatenation, coupled heads), the channels whose every producing slice is zero and removes them from
all layers of the group. The output layer's width never changes.

The removal is recorded as torch-pruning's pruning history (root layer, out/in, indices), small and
JSON-friendly; `replay` applies it to a freshly built model so that the saved shrunk weights fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from deploykit.core.errors import DeployKitError
from deploykit.core.hooks import run_forward
from deploykit.model.hints import NO_HINTS, PruningHints
from deploykit.prune.blocks import replay_blocks
from deploykit.prune.channels import UnsupportedLayerError, channel_groups, dependency_graph, grouping_deadline
from deploykit.prune.slices import evened


@dataclass(frozen=True)
class ShrinkResult:
    model: nn.Module
    #: torch-pruning pruning history: [root module name, is out-channel pruning, root indices]
    history: list[list]
    #: removals inside composite blocks (deploykit.prune.blocks): [block name, unit, indices]
    block_history: list[list]
    #: root layer -> channels removed
    removed: dict[str, int]
    #: groups left dense in best-effort mode, with the reason
    skipped: list[str] = field(default_factory=list)


def shrink(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], keep: Sequence[str], best_effort: bool = False,
    hints: PruningHints = NO_HINTS, graph_timeout_s: float | None = None,
) -> ShrinkResult:
    """Remove dead channels of `model` in place; `keep` names layers whose output width must not change.

    A group holding dead channels next to a layer type deploykit cannot read raises
    `UnsupportedLayerError` naming it, or, with `best_effort`, is left dense with a warning. So does a
    removal after which the model no longer runs (a weight also used outside its module, as in a
    tied output projection `h @ embedding.weight.T`, which the dependency graph cannot see).
    """
    removed: dict[str, int] = {}
    skipped: list[str] = []
    blocks: list[list] = []
    even: list = []  # groups that must lose as many units as the others of their key: removed last, together
    with grouping_deadline(graph_timeout_s):  # the group search runs lazily, between the removals
        graph = dependency_graph(model, example_inputs, hints)
        for group in channel_groups(graph, model, keep=keep, block_history=blocks, hints=hints):
            if group.blocking:  # normalised across channels or split into heads: removal would change the outputs
                continue
            if group.even is not None:
                even.append(group)
                continue
            dead = group.dead_channels()
            if not dead:
                continue
            if group.unsupported:
                message = (f"cannot shrink the group of {group.root_name}: it contains "
                           f"{', '.join(group.unsupported)}, whose channel parameters deploykit cannot read")
                if not best_effort:
                    raise UnsupportedLayerError(message + " (use best effort to leave it dense)")
                warnings.warn(message + "; left dense", stacklevel=2)
                skipped.append(message)
                continue
            if len(dead) == group.size:
                dead = dead[1:]  # a layer cannot have zero channels: keep one (it outputs zeros)
            if dead:
                group.prune(dead)
                _check_runs(model, example_inputs, group)
                removed[group.root_name] = len(dead)
        # any dead units may go, so the fewest any group of a key has is what each of them loses
        going = evened({group.root_name: group.dead_channels()[:group.size - 1] for group in even}, even)
        for group in even:
            units = going[group.root_name]
            if units:
                group.prune(units)
                removed[group.root_name] = len(units)
        if even:
            _check_runs(model, example_inputs, even[-1])
    history = [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in graph.pruning_history()]
    return ShrinkResult(model, history, blocks, removed, skipped)


def _check_runs(model: nn.Module, example_inputs: Sequence[torch.Tensor], group) -> None:
    try:
        with torch.no_grad():
            run_forward(model, example_inputs)
    except DeployKitError:
        raise  # the time limit: not a broken model
    except Exception as exc:  # noqa: BLE001 - any failure means this removal broke the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedLayerError(
            f"removing channels of the group of {group.root_name} broke the forward pass ({type(exc).__name__}: "
            f"{first}): a weight of that group is used outside its module (tied, or applied functionally), "
            "or the module around it reshapes it (into attention heads: name that module in the model's "
            f"pruning hints, `attention`); exclude {group.root_name} with --exclude") from None


def replay(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], history: list[list], block_history: list[list] = (),
    hints: PruningHints = NO_HINTS,
) -> nn.Module:
    """Apply a recorded shrink to a freshly built `model`, so that its shapes match the saved weights.

    torch-pruning groups and composite blocks never share a layer, so the two histories replay
    independently.
    """

    if history:
        graph = dependency_graph(model, example_inputs, hints)
        graph.load_pruning_history([[name, is_out, list(idxs)] for name, is_out, idxs in history])
    replay_blocks(model, block_history)
    return model
