"""act-structured: channels scored by what they carry on calibration data, and the layers reading the
removed channels re-fitted by least squares, so the dense-shrunk model keeps its outputs as far as a
linear fit allows.

**Score.** A channel's importance is the energy it sends into the layers that read it (the readers
torch-pruning's dependency graph gives each group): for each reader, the squared norm of the reader's
weight column for that channel times the channel's mean square on the calibration inputs, summed over
readers: E[x_c^2] * ||W[:, c]||^2, the expected squared contribution of channel c to the readers' outputs
(FLAP's and Wanda's idea, per channel). Groups whose channels no Linear or Conv reads (the units
`deploykit.prune.blocks` handles: attention heads, GPT-2's MLP) are scored by their weights' L2 norm, and
the record says how many. Global ranking divides by each group's mean score, as the other structured
pruners do.

**Reconstruction** (`--reconstruct`, on by default). After the channels are masked, each layer reading
a removed channel (Linear, Conv in one group, GPT-2's Conv1D) is re-fitted in call order on the
calibration inputs: its weights on the channels it keeps, and its bias, by ridge-regularised least
squares (`RIDGE` of the mean diagonal, towards its own weights) of its output in the *unpruned* model on its input in the pruned
model (the layers before it already re-fitted). That is ThiNet's reconstruction with FLAP's bias
compensation, through the same groups dense-shrunk removes: the shipped model is the smaller dense model
with the re-fitted weights, and parity is checked against it. The manifest records each layer's output
error relative to its output's variance, before and after the fit; a fit that does not lower the error
on the calibration data is not kept.

Our own code: torch-pruning scores weights, not activations, and has no reconstruction; the papers'
code is written for LLaMA blocks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deploykit.core.hooks import class_path, run_forward
from deploykit.prune.base import PRUNERS, Outcome, PruneContext
from deploykit.prune.layerwise import CONV1D_PATH, as_matrix, first_calls, from_matrix, unfolded
from deploykit.prune.recover import apply_masks
from deploykit.prune.slices import SliceGroup
from deploykit.prune.structured import StructuredPruner

#: ridge term of the least-squares re-fit, as a share of the mean diagonal of its inputs' second moment
RIDGE = 1e-3


class ActivationCriterion:
    """Channel scores from the readers' activations (`ChannelEnergy`), weight L2 norms where no reader ran."""

    def __init__(self, energy: dict[str, torch.Tensor]):
        self.energy = energy  # reader module name -> mean square of each input column
        self.weight_scored: set[str] = set()

    def __call__(self, group: SliceGroup, normalise: bool) -> torch.Tensor:
        scores = torch.zeros(group.size, dtype=torch.float64)
        read = False
        for reader in group.readers:
            columns = _column_energy(reader.module)
            means = self.energy.get(reader.module_name)
            if columns is None or means is None:
                continue
            for column, root in zip(reader.columns, reader.roots):
                scores[root] += float(columns[column]) * float(means[column])
            read = True
        if not read:
            self.weight_scored.add(group.root_name)
            scores = group.unit_matrix().double().norm(dim=1)
        scores = scores.float()
        return scores / scores.mean().clamp_min(1e-12) if normalise else scores


def _column_energy(module: nn.Module) -> torch.Tensor | None:
    """Squared norm of the weights each input column (a Linear's feature, a Conv's channel) feeds."""
    weight = getattr(module, "weight", None)
    if weight is None or not weight.is_floating_point():
        return None
    w = weight.detach().float()
    if isinstance(module, nn.Linear):
        return (w ** 2).sum(dim=0)
    if class_path(type(module)) == CONV1D_PATH:
        return (w ** 2).sum(dim=1)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups == 1:
            return (w ** 2).transpose(0, 1).reshape(w.shape[1], -1).sum(dim=1)
        if _depthwise(module):  # channel c feeds filter c
            return (w ** 2).reshape(w.shape[0], -1).sum(dim=1)
    return None


def _input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of its columns: features (last axis) or channels (axis 1 of a Conv)."""
    x = x.detach().float()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return x.transpose(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def channel_energy(model: nn.Module, modules: dict[str, nn.Module], batches, centred: bool) -> dict[str, torch.Tensor]:
    """Mean square of each input column of `modules` over the calibration batches (one pass); `centred`:
    its variance instead (what is left once a re-fitted bias takes the mean)."""
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def observer(name):
        def hook(module, args) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            columns = _input_columns(module, args[0]).double()
            sums[name] = sums.get(name, 0) + columns.sum(dim=0)
            squares[name] = squares.get(name, 0) + (columns ** 2).sum(dim=0)
            rows[name] = rows.get(name, 0) + len(columns)
        return hook

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (squares[name] / rows[name] - (sums[name] / rows[name]) ** 2 * centred).clamp_min(0).float()
            for name in sums}


def _readable(module: nn.Module) -> bool:
    return _column_energy(module) is not None


class ActivationStructured:
    """Structured pruning by activation energy, then (by default) least-squares reconstruction."""

    structured = True
    calibrated = True
    reconstructs = True
    #: fewer calibration items than this give statistics too thin to prune by (one batch of the default 16)
    min_calibration_items = 8

    def apply(self, ctx: PruneContext) -> Outcome:
        readers = {name: m for name, m in ctx.model.named_modules() if _readable(m)}
        criterion = ActivationCriterion(channel_energy(ctx.model, readers, ctx.calibration.batches,
                                                       centred=ctx.plan.reconstructs))
        unpruned = copy.deepcopy(ctx.model) if ctx.plan.reconstructs else None
        outcome, groups, chosen = StructuredPruner(criterion).masked(ctx)
        details = {**outcome.details, "weight_scored_groups": sorted(criterion.weight_scored)}
        if unpruned is not None:
            details["reconstruction"] = reconstruct(ctx.model, unpruned, groups, chosen, ctx.calibration.batches)
        return Outcome(outcome.unit, outcome.requested, outcome.masked, details)


def reconstruct(model: nn.Module, unpruned: nn.Module, groups: list[SliceGroup], chosen: dict[str, list[int]],
                batches) -> dict[str, dict]:
    """Re-fit each layer reading a removed channel (a Linear, a one-group Conv, GPT-2's Conv1D: the readers
    `_column_energy` reads), in call order (module docstring); layer -> record."""
    dropped: dict[str, set[int]] = {}
    for group in groups:
        removed = set(chosen.get(group.root_name, ()))
        # a reader that loses the channel itself (a depthwise conv, a batch norm of the group) needs no re-fit
        for reader in (r for r in group.readers if _column_energy(r.module) is not None and not _depthwise(r.module)):
            columns = {c for c, r in zip(reader.columns, reader.roots) if r in removed}
            if columns:
                dropped.setdefault(reader.module_name, set()).update(columns)
    records: dict[str, dict] = {}
    for name in _call_order(model, list(dropped), batches[0]):
        records[name] = _refit(model, unpruned, name, model.get_submodule(name), sorted(dropped[name]), batches)
    return records


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == module.in_channels == module.out_channels


def _call_order(model: nn.Module, names: list[str], inputs) -> list[str]:
    first = first_calls(model, {name: model.get_submodule(name) for name in names}, inputs)
    return sorted(first, key=first.__getitem__)


def _rows_in(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer's weight matrix multiplies (a Conv's input unfolded)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return unfolded(module, x)
    return x.detach().float().reshape(-1, x.shape[-1])


def _rows_out(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    y = y.detach().float()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _refit(model, unpruned, name: str, module: nn.Module, dropped: list[int], batches) -> dict:
    """Least-squares re-fit of `module` (module docstring): its record."""
    teacher = unpruned.get_submodule(name)
    kernel = int(torch.tensor(module.kernel_size).prod()) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
    width = as_matrix(module, module.weight).shape[1]
    gone = torch.zeros(width, dtype=torch.bool)
    for column in dropped:  # a Conv's channel is `kernel` consecutive unfolded columns
        gone[column * kernel:(column + 1) * kernel] = True
    kept = (~gone).nonzero().squeeze(1)
    bias = module.bias is not None
    size = len(kept) + bias
    gram = torch.zeros(size, size, dtype=torch.float64)
    cross = None
    target_energy, target_sum, rows, error_before = 0.0, None, 0, 0.0
    captured: dict[str, list[torch.Tensor]] = {"x": [], "y": [], "now": []}

    def student_hook(m, args, output):
        captured["x"].append(_rows_in(m, args[0]))
        captured["now"].append(_rows_out(m, output))

    def teacher_hook(m, _args, output):
        captured["y"].append(_rows_out(m, output))

    handles = [module.register_forward_hook(student_hook), teacher.register_forward_hook(teacher_hook)]
    try:
        with torch.no_grad():
            for batch in batches:
                for key in captured:
                    captured[key].clear()
                run_forward(model, batch)
                run_forward(unpruned, batch)
                x = torch.cat(captured["x"])[:, kept].double()
                y = torch.cat(captured["y"]).double()
                now = torch.cat(captured["now"]).double()
                if bias:
                    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
                gram += x.t() @ x
                cross = x.t() @ y if cross is None else cross + x.t() @ y
                target_energy += float((y ** 2).sum())
                target_sum = y.sum(dim=0) if target_sum is None else target_sum + y.sum(dim=0)
                error_before += float(((now - y) ** 2).sum())
                rows += len(y)
    finally:
        for handle in handles:
            handle.remove()
    variance = target_energy - float((target_sum ** 2).sum()) / max(rows, 1)
    diagonal = torch.diagonal(gram)[:len(kept)]
    ridge = RIDGE * float(diagonal.mean()) if len(kept) else 0.0
    damped = gram.clone()
    damped[range(len(kept)), range(len(kept))] += ridge
    # the ridge pulls towards the layer's own weights, not towards zero: a column the calibration inputs
    # never excite (a unit that stayed dead on them) keeps its weight rather than losing it
    own = as_matrix(teacher, teacher.weight.detach()).double()[:, kept].t()
    prior = torch.zeros_like(cross)
    prior[:len(kept)] = ridge * own
    solution = torch.linalg.solve(damped, cross + prior)  # (kept [+1], out)
    # ||x s - y||^2 summed, from the accumulated moments: s'Gs - 2 tr(s'C) + ||y||^2
    error_after = float((solution * (gram @ solution)).sum() - 2 * (solution * cross).sum()) + target_energy
    record = {"reconstructed": False, "rows": rows, "columns_removed": len(dropped),
              "error_before": error_before / variance if variance > 0 else 0.0,
              "error_after": max(error_after, 0.0) / variance if variance > 0 else 0.0}
    if error_after >= error_before:
        record["why"] = "the fit did not lower the error on the calibration inputs"
        return record
    _write(module, kept, solution, bias)
    record["reconstructed"] = True
    return record


def _write(module: nn.Module, kept: torch.Tensor, solution: torch.Tensor, bias: bool) -> None:
    """Put the fitted columns (and bias) into the layer's weights (under its pruning mask, if it has one)."""
    weight = getattr(module, "weight_orig", module.weight)
    with torch.no_grad():
        matrix = torch.zeros_like(as_matrix(module, weight))
        matrix[:, kept] = solution[:len(kept)].t().to(matrix.dtype)
        weight.copy_(from_matrix(module, matrix, weight.shape))
        if bias:
            getattr(module, "bias_orig", module.bias).copy_(solution[-1].to(weight.dtype))
        apply_masks(module)  # a masked layer: its weight recomputed from the new _orig


PRUNERS.add("act-structured", ActivationStructured())
