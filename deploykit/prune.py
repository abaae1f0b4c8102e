"""Pruning: plans, the pruner registry, and stripping of `torch.nn.utils.prune` masks.

`prune_model` applies a `PruningPlan` to a model: it selects the prunable layers (Linear and Conv,
minus excluded ones and, by default, the output layer), resolves each layer's sparsity from the
plan's rules, hands them to the plan's `Pruner`, and checks that what was asked for was masked. A
pruner that silently prunes nothing is the classic failure, so a shortfall is an error here.
Every pruner leaves `torch.nn.utils.prune` masks; `strip_masks` folds them into plain weights.

How to add a pruner: write a class with ``apply(ctx: PruneContext) -> Outcome`` that installs masks
(``torch.nn.utils.prune.custom_from_mask`` is the general tool) on the layers in ``ctx.targets`` and
reports what it was asked for and what it masked, then ``PRUNERS.add("name", MyPruner())``.
`prune_model` does selection, rule resolution, seeding and verification around it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from .errors import UsageError
from .registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .hints import PruningHints
    from .spec import ModelSpec

SCOPES = ("global", "layer")
#: "magnitude:0.9" -> method "magnitude", amount 0.9
_SPEC = re.compile(r"^(?P<method>[a-z][a-z0-9_-]*):(?P<amount>[^:]+)$")


@dataclass(frozen=True)
class PruningPlan:
    """What to prune and how much. Recorded verbatim in every manifest."""

    method: str = "magnitude"
    #: fraction of each selected layer's weights (or channels, for structured methods) to zero, in [0, 1)
    amount: float = 0.0
    scope: str = "global"
    #: (module name pattern, sparsity) pairs; the first pattern that matches a layer sets its sparsity,
    #: e.g. ("encoder.*.feed_forward*", 0.5). Layers no rule matches get `amount`.
    rules: tuple[tuple[str, float], ...] = ()
    #: fnmatch patterns on module names that are never pruned (e.g. "mlp.0", "encoder.*")
    exclude: tuple[str, ...] = ()
    #: leave the output layer dense, as the pruning studies did
    exclude_output: bool = True
    #: seed for random choices (random pruning, tie breaking)
    seed: int = 0
    #: iterative methods (imp): prune-rewind-retrain rounds, each removing the same fraction of what
    #: remains, so that the last round reaches `amount`
    rounds: int = 1

    def __post_init__(self) -> None:
        # Manifests hand these back as JSON lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "rules", tuple((str(p), float(a)) for p, a in self.rules))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        PRUNERS.get(self.method)  # raises with the list of known methods
        for amount in (self.amount, *(a for _, a in self.rules)):
            _check_sparsity(amount)
        if self.scope not in SCOPES:
            raise UsageError(f"unknown pruning scope {self.scope!r}; known: {', '.join(SCOPES)}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise UsageError(f"rounds must be a positive integer, got {self.rounds!r}")

    @classmethod
    def parse(cls, text: str, **options: Any) -> "PruningPlan":
        """Parse "METHOD:SPARSITY" (e.g. "magnitude:0.9"); `options` fill the other fields."""
        method, amount = parse_prune_spec(text)
        return cls(method=method, amount=amount, **options)

    def amount_for(self, module_name: str) -> float:
        for pattern, amount in self.rules:
            if fnmatch.fnmatchcase(module_name, pattern):
                return amount
        return self.amount

    def is_empty(self) -> bool:
        return self.amount == 0 and all(a == 0 for _, a in self.rules)

    def label(self) -> str:
        if self.is_empty():
            return "none"
        return f"{self.method}:{self.amount:g}" + (f"+{len(self.rules)} rules" if self.rules else "")


def _check_sparsity(amount: float) -> float:
    if not 0.0 <= amount < 1.0:
        raise UsageError(f"sparsity {amount:g} is outside [0, 1)")
    return amount


def parse_prune_spec(text: str) -> tuple[str, float]:
    match = _SPEC.match(text.strip())
    if not match:
        raise UsageError(f"bad pruning spec {text!r}; expected METHOD:SPARSITY, e.g. magnitude:0.9")
    try:
        amount = float(match["amount"])
    except ValueError:
        raise UsageError(f"bad sparsity {match['amount']!r} in pruning spec {text!r}") from None
    PRUNERS.get(match["method"])
    return match["method"], _check_sparsity(amount)


def parse_rule(text: str) -> tuple[str, float]:
    """"encoder.*=0.5" -> ("encoder.*", 0.5)."""
    pattern, sep, amount = text.rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"bad rule {text!r}; expected PATTERN=SPARSITY, e.g. 'encoder.*=0.5'")
    try:
        return pattern, _check_sparsity(float(amount))
    except ValueError:
        raise UsageError(f"bad sparsity {amount!r} in rule {text!r}") from None


PLAN_KEYS = {"method", "sparsity", "scope", "rules", "exclude", "exclude_output", "seed", "rounds"}


def load_plan_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML plan: top-level method/sparsity/scope/exclude/exclude_output/seed and a [rules] table.

    Returns PruningPlan keyword arguments. Unknown keys are errors that name the key and the file.
    """
    from .fsutil import read_text

    path = Path(path)
    try:
        data = tomllib.loads(read_text(path, "plan file", UsageError))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"cannot read plan file {str(path)!r}: {exc}") from None
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise UsageError(f"plan file {str(path)!r}: unknown key {unknown[0]!r}; known: {', '.join(sorted(PLAN_KEYS))}")
    options = {k: v for k, v in data.items() if k not in ("sparsity", "rules")}
    if "sparsity" in data:
        options["amount"] = data["sparsity"]
    rules = data.get("rules", {})
    if not isinstance(rules, dict) or not all(isinstance(v, (int, float)) for v in rules.values()):
        raise UsageError(f"plan file {str(path)!r}: [rules] must map module patterns to sparsities")
    options["rules"] = tuple(rules.items())
    return options


@dataclass(frozen=True)
class PruneContext:
    """Everything a pruner may need; `targets` maps module name -> the sparsity it should get."""

    model: "nn.Module"
    plan: PruningPlan
    targets: dict[str, float]
    excluded: tuple[str, ...]
    example_inputs: "Sequence[torch.Tensor]"
    spec: "ModelSpec | None" = None

    def modules(self) -> "list[tuple[str, nn.Module, float]]":
        return [(name, self.model.get_submodule(name), amount) for name, amount in self.targets.items()]


@dataclass(frozen=True)
class Outcome:
    """What a pruner was asked for and what it masked, in its own unit ("weights" or "channels")."""

    unit: str
    requested: int
    masked: int
    details: dict[str, Any] = field(default_factory=dict)


class Pruner(Protocol):
    def apply(self, ctx: PruneContext) -> Outcome:
        """Install pruning masks on `ctx.targets` (global or per layer, by `ctx.plan.scope`)."""


PRUNERS: Registry[Pruner] = Registry("pruning method")


class UnstructuredPruner:
    """Zero individual weights of each target's `weight`: the smallest (L1) or random ones."""

    def __init__(self, method: str):
        self.method = method  # the torch.nn.utils.prune method name: "l1_unstructured" / "random_unstructured"

    def apply(self, ctx: PruneContext) -> Outcome:
        from torch.nn.utils import prune

        method_class = {"l1_unstructured": prune.L1Unstructured, "random_unstructured": prune.RandomUnstructured}[self.method]
        requested = 0
        by_amount: dict[float, list] = {}
        for _, module, amount in ctx.modules():
            by_amount.setdefault(amount, []).append(module)
        for amount, modules in by_amount.items():
            if ctx.plan.scope == "global":  # one threshold across the layers sharing this sparsity
                prune.global_unstructured([(m, "weight") for m in modules], pruning_method=method_class, amount=amount)
                requested += round(amount * sum(m.weight.numel() for m in modules))
            else:
                for module in modules:
                    getattr(prune, self.method)(module, "weight", amount=amount)
                    requested += round(amount * module.weight.numel())
        masked = sum(_masked_count(module, "weight") for _, module, _ in ctx.modules())
        return Outcome("weights", requested, masked)


PRUNERS.add("magnitude", UnstructuredPruner("l1_unstructured"))
PRUNERS.add("random", UnstructuredPruner("random_unstructured"))
for _name in ("l1-structured", "l2-structured", "fpgm", "random-structured"):
    PRUNERS.declare(_name, "deploykit.structured")
PRUNERS.declare("imp", "deploykit.imp")


@dataclass(frozen=True)
class PruneResult:
    """Which parameters a plan masked, which modules it left alone, and the verified outcome."""

    plan: PruningPlan
    pruned_parameters: tuple[str, ...]
    excluded_modules: tuple[str, ...]
    outcome: Outcome | None = None


#: prunable layer types outside torch, by class path (so that transformers is not imported here):
#: GPT-2's Conv1D is a Linear with its weight stored transposed; missing it, pruning GPT-2 prunes nothing
PRUNABLE_CLASS_PATHS = {"transformers.pytorch_utils.Conv1D"}


def prunable_modules(model: "nn.Module", hints: "PruningHints | None" = None) -> "list[tuple[str, nn.Module]]":
    """Modules pruning applies to: Linear, Conv and embedding layers (and transformers' Conv1D), and
    the layer types `hints` describe."""
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag, *(hints.layers if hints else ()))
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, kinds) or f"{type(m).__module__}.{type(m).__qualname__}" in PRUNABLE_CLASS_PATHS]


def tied_modules(model: "nn.Module") -> list[str]:
    """Prunable modules whose weight is shared with another module (GPT-2's embedding and LM head).

    Pruning one side of a tie would replace its weight and silently untie it, so these are excluded.
    """
    owners: dict[int, list[str]] = {}
    for name, module in prunable_modules(model):
        owners.setdefault(id(module.weight), []).append(name)
    return sorted(name for names in owners.values() if len(names) > 1 for name in names)


def detect_output_layers(model: "nn.Module", example_inputs: "Sequence[torch.Tensor]") -> list[str]:
    """The prunable module that runs last in a forward pass: the layer that produces the output."""
    from .hooks import observe_forward

    order: list[str] = []
    observe_forward(model, example_inputs, {module: lambda _a, _o, name=name: order.append(name)
                                            for name, module in prunable_modules(model)}, inference=False)
    return order[-1:]


def excluded_modules(
    model: "nn.Module", plan: PruningPlan, example_inputs: "Sequence[torch.Tensor]", output_layers: Sequence[str] = (),
    hints: "PruningHints | None" = None,
) -> list[str]:
    """Module names the plan never prunes: matches of `plan.exclude` and of the hints' ignored layers
    (any module: excluding a block keeps its output width too), and the output layer(s)."""
    patterns = (*plan.exclude, *(hints.ignored_layers if hints else ()))

    def matches(name: str) -> bool:  # the module or a block holding it
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), p) for i in range(1, len(parts) + 1) for p in patterns)

    excluded = {name for name, m in model.named_modules()
                if name and matches(name) and next(m.parameters(), None) is not None}
    excluded.update(tied_modules(model))
    if plan.exclude_output:
        excluded.update(output_layers or detect_output_layers(model, example_inputs))
    return sorted(excluded)


def prune_model(
    model: "nn.Module",
    plan: PruningPlan,
    example_inputs: "Sequence[torch.Tensor]" = (),
    output_layers: Sequence[str] = (),
    spec: "ModelSpec | None" = None,
) -> PruneResult:
    """Apply `plan` to `model` in place, leaving `torch.nn.utils.prune` masks on it.

    `output_layers` names the output layer(s); when empty it is detected from a forward pass over
    `example_inputs`. Raises `UsageError` when the plan leaves nothing to prune, and `RuntimeError`
    when the pruner masked other than what it was asked for.
    """
    import torch

    from .hints import hints_of

    hints = hints_of(spec)
    candidates = [name for name, _ in prunable_modules(model, hints)]
    excluded = excluded_modules(model, plan, example_inputs, output_layers, hints)
    targets = {name: plan.amount_for(name) for name in candidates if name not in excluded}
    targets = {name: amount for name, amount in targets.items() if amount > 0}
    if plan.is_empty():
        return PruneResult(plan, (), tuple(excluded))
    if not targets:
        raise UsageError(f"nothing to prune: the plan selects none of the {len(candidates)} prunable layers")

    ctx = PruneContext(model, plan, targets, tuple(excluded), tuple(example_inputs), spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        outcome = PRUNERS.get(plan.method).apply(ctx)
    if outcome.unit == "weights":  # recount from the masks: a pruner's own report is not evidence
        outcome = dataclasses.replace(outcome, masked=sum(_masked_count(m, "weight") for _, m, _ in ctx.modules()))
    if outcome.masked != outcome.requested:
        raise RuntimeError(
            f"{plan.method} pruning masked {outcome.masked} {outcome.unit} where {outcome.requested} were requested"
        )
    return PruneResult(plan, tuple(masked_parameters(model)), tuple(excluded), outcome)


def masked_parameters(model: "nn.Module") -> list[str]:
    """Names of parameters carrying a pruning mask, as they will be named once stripped."""
    return [name[: -len("_mask")] for name, _ in model.named_buffers() if name.endswith("_mask")]


def _masked_count(module: "nn.Module", name: str) -> int:
    mask = getattr(module, f"{name}_mask", None)  # absent when the pruner left this module alone
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
