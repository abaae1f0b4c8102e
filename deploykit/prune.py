"""Unstructured pruning on top of `torch.nn.utils.prune`, and stripping of its masks.

`prune_model` applies a `PruningPlan` to a model: it selects the prunable weights (Linear and Conv
layers, minus excluded ones and, by default, the output layer), hands them to the plan's `Pruner`, and
checks that the requested fraction really was zeroed; a pruner that silently prunes nothing is the
classic failure, so it is an error here. `strip_masks` then folds `weight_orig * weight_mask` into a
plain `weight` so that no trace of `torch.nn.utils.prune` is left.

How to add a pruner: write a class with an `apply(targets, amount, scope)` method that installs
`torch.nn.utils.prune` masks on the given (module, "weight") pairs, and register an instance with
``PRUNERS.add("name", MyPruner())``. `prune_model` does selection, seeding and verification around it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from .errors import UsageError
from .registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

SCOPES = ("global", "layer")
#: "magnitude:0.9" -> method "magnitude", amount 0.9
_SPEC = re.compile(r"^(?P<method>[a-z][a-z0-9_-]*):(?P<amount>[^:]+)$")

class Pruner(Protocol):
    def apply(self, targets: "Sequence[tuple[nn.Module, str]]", amount: float, scope: str) -> None:
        """Install pruning masks so that `amount` of the targets' weights are zero.

        With scope "global" the fraction holds over all targets together; with "layer", for each.
        """


PRUNERS: Registry[Pruner] = Registry("pruning method")


class MagnitudePruner:
    """Zero the weights of smallest absolute value (L1 unstructured)."""

    def apply(self, targets, amount, scope):  # noqa: D102 - see Pruner.apply
        from torch.nn.utils import prune

        if scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=amount)


class RandomPruner:
    """Zero weights chosen uniformly at random (the baseline every saliency pruner must beat)."""

    def apply(self, targets, amount, scope):
        from torch.nn.utils import prune

        if scope == "global":
            prune.global_unstructured(targets, pruning_method=prune.RandomUnstructured, amount=amount)
        else:
            for module, name in targets:
                prune.random_unstructured(module, name, amount=amount)


PRUNERS.add("magnitude", MagnitudePruner())
PRUNERS.add("random", RandomPruner())


@dataclass(frozen=True)
class PruningPlan:
    """What to prune and how much. Recorded verbatim in every manifest."""

    method: str = "magnitude"
    #: fraction of the prunable weights set to zero, in [0, 1)
    amount: float = 0.0
    scope: str = "global"
    #: fnmatch patterns on module names that are never pruned (e.g. "mlp.0", "encoder.*")
    exclude: tuple[str, ...] = ()
    #: leave the output layer dense, as the pruning studies did
    exclude_output: bool = True
    #: seed for random choices (random pruning, tie breaking)
    seed: int = 0

    def __post_init__(self) -> None:
        PRUNERS.get(self.method)  # raises with the list of known methods
        if not 0.0 <= self.amount < 1.0:
            raise UsageError(f"sparsity {self.amount:g} is outside [0, 1)")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown pruning scope {self.scope!r}; known: {', '.join(SCOPES)}")

    @classmethod
    def parse(cls, text: str, **options) -> "PruningPlan":
        """Parse "METHOD:SPARSITY" (e.g. "magnitude:0.9"); `options` fill the other fields."""
        method, amount = parse_prune_spec(text)
        return cls(method=method, amount=amount, **options)

    def label(self) -> str:
        return f"{self.method}:{self.amount:g}" if self.amount else "none"


def parse_prune_spec(text: str) -> tuple[str, float]:
    match = _SPEC.match(text.strip())
    if not match:
        raise UsageError(f"bad pruning spec {text!r}; expected METHOD:SPARSITY, e.g. magnitude:0.9")
    try:
        amount = float(match["amount"])
    except ValueError:
        raise UsageError(f"bad sparsity {match['amount']!r} in pruning spec {text!r}") from None
    PRUNERS.get(match["method"])
    if not 0.0 <= amount < 1.0:
        raise UsageError(f"sparsity {amount:g} is outside [0, 1)")
    return match["method"], amount


@dataclass(frozen=True)
class PruneResult:
    """Which weights a plan touched: names of pruned parameters and of excluded modules."""

    plan: PruningPlan
    pruned_parameters: tuple[str, ...]
    excluded_modules: tuple[str, ...]
    #: zeros the pruner was asked for vs zeros it made, over the pruned parameters
    requested_zeros: int = 0
    actual_zeros: int = 0


def prunable_modules(model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
    """Modules whose `weight` unstructured pruning applies to: Linear and Conv layers."""
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def detect_output_layers(model: "nn.Module", example_inputs: "Sequence[torch.Tensor]") -> list[str]:
    """The prunable module that runs last in a forward pass: the layer that produces the output."""
    import torch

    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
        for name, module in prunable_modules(model)
    ]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order[-1:]


def prune_model(
    model: "nn.Module",
    plan: PruningPlan,
    example_inputs: "Sequence[torch.Tensor]" = (),
    output_layers: Sequence[str] = (),
) -> PruneResult:
    """Apply `plan` to `model` in place, leaving `torch.nn.utils.prune` masks on it.

    `output_layers` names the output layer(s); when empty it is detected from a forward pass over
    `example_inputs`. Raises `UsageError` when the plan leaves nothing to prune, and `RuntimeError`
    when the pruner zeroed fewer weights than asked (a silent no-op is a bug, not a result).
    """
    import torch

    candidates = prunable_modules(model)
    excluded = {name for name, _ in candidates if any(fnmatch.fnmatchcase(name, p) for p in plan.exclude)}
    if plan.exclude_output:
        outputs = list(output_layers) or detect_output_layers(model, example_inputs)
        excluded.update(outputs)
    targets = [(name, module) for name, module in candidates if name not in excluded]
    result_names = tuple(f"{name}.weight" for name, _ in targets)
    if plan.amount == 0.0:
        return PruneResult(plan, result_names, tuple(sorted(excluded)))
    if not targets:
        raise UsageError(
            f"nothing to prune: all {len(candidates)} prunable layers are excluded by the plan"
        )

    weights = [(module, "weight") for _, module in targets]
    total = sum(module.weight.numel() for _, module in targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        PRUNERS.get(plan.method).apply(weights, plan.amount, plan.scope)
    if plan.scope == "global":
        requested = round(plan.amount * total)
    else:
        requested = sum(round(plan.amount * module.weight.numel()) for _, module in targets)
    # Count the masks, not the weights: weights that happened to be zero already must not hide a
    # pruner that did nothing.
    masked = sum(_masked_count(module) for _, module in targets)
    if masked != requested:
        raise RuntimeError(f"{plan.method} pruning masked {masked} weights where {requested} were requested")
    return PruneResult(plan, result_names, tuple(sorted(excluded)), requested, masked)


def _masked_count(module: "nn.Module") -> int:
    mask = getattr(module, "weight_mask", None)  # absent when the pruner left this module alone
    return 0 if mask is None else int((mask == 0).sum())


def strip_masks(model: "nn.Module") -> "nn.Module":
    """Fold every pruning mask into its weight and remove the hooks, `_orig` and `_mask` tensors."""
    from torch.nn.utils import prune

    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    leftovers = [name for name, _ in model.named_parameters() if name.endswith("_orig")]
    leftovers += [name for name, _ in model.named_buffers() if name.endswith("_mask")]
    if leftovers or prune.is_pruned(model):
        raise RuntimeError(f"mask stripping left pruning state behind: {leftovers}")
    return model
