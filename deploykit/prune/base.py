"""Pruning: plans, the pruner registry, and stripping of `torch.nn.utils.prune` masks.

`prune_model` applies a `PruningPlan` to a model: it selects the prunable layers (Linear and Conv,
minus excluded ones and, by default, the output layer), resolves each layer's sparsity from the
plan's rules, hands them to the plan's `Pruner`, and checks that what was asked for was masked. A
pruner that silently prunes nothing is the classic failure, so a shortfall is an error here.
Every pruner leaves `torch.nn.utils.prune` masks; `strip_masks` folds them into plain weights.

How to add a pruner: write a class with ``apply(ctx: PruneContext) -> Outcome`` that installs masks
(``torch.nn.utils.prune.custom_from_mask`` is the general tool) on the layers in ``ctx.targets`` and
reports what it was asked for and what it masked, then ``PRUNERS.add("name", MyPruner())``.
`prune_model` does selection, rule resolution, seeding and verification around it. A pruner that runs
the model on calibration data says so (``calibrated = True``) and reads ``ctx.calibration``:
`prune_model` loads it (`deploykit.model.calibration`), keeps the unpruned model beside it, and after
pruning measures the outputs' agreement with it and runs `--recover` (`deploykit.prune.recover`).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from deploykit.core.errors import UsageError
from deploykit.core.registry import Registry
from deploykit.core.tomlfile import check_value, read_toml
from deploykit.model.calibration import DEFAULT_SAMPLES, calibration_data
from deploykit.prune.patterns import Pattern, normalised, parse_pattern

if TYPE_CHECKING:
    import torch
    from torch import nn

    from deploykit.model.calibration import Calibration
    from deploykit.model.hints import PruningHints
    from deploykit.model.spec import ModelSpec

SCOPES = ("global", "layer")
#: most prune-rewind-retrain rounds (imp) or scoring iterations (synflow) a plan may ask for
MAX_ROUNDS = 1000
#: kinds of prunable layer a plan can select (`layer_type`); "custom" are the layer types of pruning hints
LAYER_TYPES = ("linear", "conv", "embedding", "custom")
#: "magnitude:0.9" -> method "magnitude", amount 0.9; "grasp:c2" (or "grasp:c=2") -> compression 2
_SPEC = re.compile(r"^(?P<method>[a-z][a-z0-9_-]*):(?P<amount>[^:]+)$")
_COMPRESSION = re.compile(r"^c=?(?P<c>.+)$")
#: the methods that take a pattern (N:M, blocks), and those that prune from calibration data (said in errors)
PATTERN_METHODS = ("magnitude", "random", "wanda", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt", "act-structured")
#: the layer kinds a plan with a pattern prunes unless it names others (embeddings take no pattern)
PATTERN_LAYER_TYPES = ("linear", "conv")
MIN_CALIBRATION_SAMPLES = 1
MAX_CALIBRATION_SAMPLES = 100_000
MAX_RECOVER_STEPS = 100_000


def sparsity_of_compression(compression: float) -> float:
    """The AG News study's convention: compression c keeps 10^-c of the prunable weights."""
    return 1.0 - 10.0 ** -compression


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
    #: remains, so that the last round reaches `amount`; synflow: its scoring iterations (when > 1)
    rounds: int = 1
    #: the AG News study's convention: keep 10^-compression of the prunable weights (1 keeps 10%, 2 keeps
    #: 1%); when set, `amount` is 1 - 10^-compression
    compression: float | None = None
    #: kinds of layer to prune (LAYER_TYPES); empty: the method's default (saliency methods take linear
    #: and conv layers, as the AG News study pruned; the others every kind)
    layer_types: tuple[str, ...] = ()
    #: prune the model's initial weights, then train it with the masks in force (the spec's training
    #: hook): the protocol pruning-at-initialisation methods (snip, grasp, synflow) were designed for
    at_init: bool = False
    #: let the plan prune a layer to 100% (nothing then passes through it); refused by default, since
    #: a global threshold silently emptying a small-magnitude layer is a broken model, not a sparse one
    allow_layer_collapse: bool = False
    #: structured methods: the channels (or heads) each group keeps are a multiple of this (pruning
    #: rounds down to fewer removals), so that kernels see aligned widths; torch-pruning's `round_to`
    round_to: int = 1
    #: structured methods and dense-shrunk: seconds torch-pruning's dependency graph and group search
    #: may take before the export stops saying so (some graphs take many minutes)
    graph_timeout_s: float = 300.0
    #: "N:M": at most N nonzero weights in every M consecutive ones along a layer's input (NVIDIA's 2:4;
    #: the sparsity is then 1 - N/M); "RxC": blocks of R outputs by C inputs removed whole; "" for
    #: unstructured (`deploykit.prune.patterns`). For the pruners that take one (`patterns`)
    pattern: str = ""
    #: (module name pattern, pattern) pairs: the first that matches a layer sets its pattern ("" or "none":
    #: unstructured), e.g. ("h.*.mlp.*", "8x8"); layers no rule matches get `pattern`
    pattern_rules: tuple[tuple[str, str], ...] = ()
    #: calibration data for the pruners that run the model (`Pruner.calibrated`) and for recovery: None
    #: (the model's own: its spec's hook, or a zoo model's task), a .npz/.safetensors file, an entry point
    #: giving batches (`data.py:batches`), or "random" (`deploykit.model.calibration`)
    calibration: str | None = None
    #: calibration items (sequences, images, utterances) those pruners and recovery run on
    calibration_samples: int = DEFAULT_SAMPLES
    #: act-structured: re-fit the layers reading removed channels by least squares on the calibration
    #: inputs; None: the method's default (on)
    reconstruct: bool | None = None
    #: distil the pruned model from the unpruned one for this many steps on the calibration data, masks
    #: (and so the shrunk shapes) kept; 0: no recovery
    recover_steps: int = 0

    def __post_init__(self) -> None:
        # Manifests hand these back as JSON lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "rules", tuple((str(p), float(a)) for p, a in self.rules))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "pattern", normalised(self.pattern))
        object.__setattr__(self, "pattern_rules", tuple((str(p), normalised(v)) for p, v in self.pattern_rules))
        PRUNERS.get(self.method)  # raises with the list of known methods
        if self.compression is not None:
            if not 0 < self.compression <= 6:
                raise UsageError(f"compression {self.compression:g} is outside (0, 6] (c keeps 10^-c of the weights)")
            object.__setattr__(self, "amount", sparsity_of_compression(self.compression))
        if self.at_init and self.method == "imp":
            raise UsageError("imp retrains between its rounds itself; at_init applies to one-shot methods")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UsageError(f"unknown layer type {unknown[0]!r}; known: {', '.join(LAYER_TYPES)}")
        for amount in (self.amount, *(a for _, a in self.rules)):
            _check_sparsity(amount)
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or not 1 <= self.round_to <= 1024:
            raise UsageError(f"round_to must be an integer in [1, 1024], got {self.round_to!r}")
        if not isinstance(self.graph_timeout_s, (int, float)) or not 0 < self.graph_timeout_s <= 86_400:
            raise UsageError(f"graph timeout must be a number of seconds in (0, 86400], got {self.graph_timeout_s!r}")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown pruning scope {self.scope!r}; known: {', '.join(SCOPES)}")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or not 1 <= self.rounds <= MAX_ROUNDS:
            raise UsageError(f"rounds must be an integer in [1, {MAX_ROUNDS}], got {self.rounds!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        for name in ("exclude_output", "at_init", "allow_layer_collapse"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.method, str) or not all(isinstance(p, str) for p in (*self.exclude, *self.layer_types)):
            raise UsageError("method, exclude and layer_types must be strings")
        self._check_calibration_options()

    def _check_calibration_options(self) -> None:
        """The pattern, calibration, reconstruction and recovery options: each where it applies."""
        pruner = PRUNERS.get(self.method)
        patterns = [("--pattern", self.pattern)] + [(f"pattern rule {name!r}", text) for name, text in self.pattern_rules]
        for where, text in patterns:
            pattern = parse_pattern(text)
            if pattern is None:
                continue
            if not getattr(pruner, "patterns", False):
                raise UsageError(f"{where} {text} applies to {', '.join(PATTERN_METHODS)}, not {self.method}")
            if pattern.implied_sparsity is not None and where == "--pattern":
                for amount in (self.amount, *(a for _, a in self.rules)):
                    if amount and abs(amount - pattern.implied_sparsity) > 1e-9:
                        raise UsageError(f"pattern {text} keeps {pattern.first} of every {pattern.second} weights, a "
                                         f"sparsity of {pattern.implied_sparsity:g}; the plan asks {amount:g} (give "
                                         f"{self.method}:{pattern.implied_sparsity:g})")
        if not isinstance(self.calibration_samples, int) or isinstance(self.calibration_samples, bool) or not (
                MIN_CALIBRATION_SAMPLES <= self.calibration_samples <= MAX_CALIBRATION_SAMPLES):
            raise UsageError(f"calibration samples must be an integer in [{MIN_CALIBRATION_SAMPLES}, "
                             f"{MAX_CALIBRATION_SAMPLES}], got {self.calibration_samples!r}")
        if not isinstance(self.recover_steps, int) or isinstance(self.recover_steps, bool) or not (
                0 <= self.recover_steps <= MAX_RECOVER_STEPS):
            raise UsageError(f"recover steps must be an integer in [0, {MAX_RECOVER_STEPS}], got {self.recover_steps!r}")
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise UsageError(f"reconstruct must be true or false, got {self.reconstruct!r}")
        if self.reconstruct and not getattr(pruner, "reconstructs", False):
            raise UsageError(f"--reconstruct applies to act-structured, not {self.method}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise UsageError(f"calibration must be a file path or 'random', got {self.calibration!r}")
        least = getattr(pruner, "min_calibration_items", 0) if not self.is_empty() else 0
        if self.calibration_samples < least:
            raise UsageError(f"{self.method} needs at least {least} calibration items for its statistics; "
                             f"--calibration-samples is {self.calibration_samples}")
        if self.recover_steps and self.at_init:
            raise UsageError("--recover distils a pruned trained model; --at-init trains the pruned model itself")
        if self.calibration is not None and not (self.uses_calibration or self.is_empty()):
            raise UsageError(f"--calibration applies to {', '.join(CALIBRATED_METHODS)} and --recover; {self.method} "
                             "prunes without data")

    def pattern_for(self, module_name: str) -> Pattern | None:
        """The pattern of a layer: the first pattern rule matching its name, else the plan's."""
        for name, text in self.pattern_rules:
            if fnmatch.fnmatchcase(module_name, name):
                return parse_pattern(text)
        return parse_pattern(self.pattern)

    @property
    def has_pattern(self) -> bool:
        return bool(self.pattern) or any(text for _, text in self.pattern_rules)

    @property
    def uses_calibration(self) -> bool:
        """Whether pruning by this plan runs the model on calibration data (its pruner, or recovery)."""
        return not self.is_empty() and (getattr(PRUNERS.get(self.method), "calibrated", False) or self.recover_steps > 0)

    @property
    def reconstructs(self) -> bool:
        """Whether the plan re-fits layers after removing channels (act-structured's default)."""
        return getattr(PRUNERS.get(self.method), "reconstructs", False) and self.reconstruct is not False

    @classmethod
    def parse(cls, text: str, **options: Any) -> "PruningPlan":
        """Parse "METHOD:SPARSITY" (e.g. "magnitude:0.9") or "METHOD:cC" (compression, e.g. "grasp:c2");
        `options` fill the other fields."""
        return cls(**{**options, **parse_prune_spec(text)})

    def amount_for(self, module_name: str) -> float:
        for pattern, amount in self.rules:
            if fnmatch.fnmatchcase(module_name, pattern):
                return amount
        return self.amount

    def is_empty(self) -> bool:
        return self.amount == 0 and all(a == 0 for _, a in self.rules)

    def label(self) -> str:
        """"method:sparsity" with what else sets the variant apart: "+N rules", a scope other than
        global, an alignment ("l1-structured:0.5,layer,round-to 8"); "none" when nothing is pruned."""
        if self.is_empty():
            return "none"
        amount = f"c{self.compression:g}" if self.compression is not None else f"{self.amount:g}"
        return (f"{self.method}:{amount}" + (f"+{len(self.rules)} rules" if self.rules else "")
                + (f",{self.pattern}" if self.pattern else "")
                + (f"+{len(self.pattern_rules)} pattern rules" if self.pattern_rules else "")
                + (f",{self.scope}" if self.scope != "global" else "")
                + (f",round-to {self.round_to}" if self.round_to > 1 else "")
                + (",no reconstruct" if self.reconstruct is False and getattr(PRUNERS.get(self.method), "reconstructs",
                                                                              False) else "")
                + (f",recover {self.recover_steps}" if self.recover_steps else ""))

    def described(self) -> str:
        """The label, with the scope said where the label leaves it out ("magnitude:0.9 (global)")."""
        scoped = getattr(PRUNERS.get(self.method), "scoped", True)  # wanda and sparsegpt prune each layer alone
        return self.label() + (" (global)" if self.scope == "global" and scoped and not self.is_empty() else "")


def _check_sparsity(amount: float) -> float:
    if not 0.0 <= amount < 1.0:
        raise UsageError(f"sparsity {amount:g} is outside [0, 1)")
    return amount


def parse_prune_spec(text: str) -> dict[str, Any]:
    """PruningPlan fields of "METHOD:SPARSITY" or "METHOD:cC" (compression C)."""
    match = _SPEC.match(text.strip())
    if not match:
        raise UsageError(f"bad pruning spec {text!r}; expected METHOD:SPARSITY or METHOD:cCOMPRESSION, e.g. "
                         "magnitude:0.9 or grasp:c2")
    compression = _COMPRESSION.match(match["amount"])
    value = compression["c"] if compression else match["amount"]
    try:
        number = float(value)
    except ValueError:
        what = "compression" if compression else "sparsity"
        raise UsageError(f"bad {what} {value!r} in pruning spec {text!r}") from None
    PRUNERS.get(match["method"])
    if compression:
        return {"method": match["method"], "compression": number}
    return {"method": match["method"], "amount": _check_sparsity(number)}


def parse_rule(text: str) -> tuple[str, float]:
    """"encoder.*=0.5" -> ("encoder.*", 0.5)."""
    pattern, sep, amount = text.rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"bad rule {text!r}; expected PATTERN=SPARSITY, e.g. 'encoder.*=0.5'")
    try:
        return pattern, _check_sparsity(float(amount))
    except ValueError:
        raise UsageError(f"bad sparsity {amount!r} in rule {text!r}") from None


def parse_pattern_rule(text: str) -> tuple[str, str]:
    """"h.*.mlp.*=8x8" -> ("h.*.mlp.*", "8x8"); "fc1=none" leaves fc1 unstructured."""
    name, sep, pattern = text.rpartition("=")
    if not sep or not name:
        raise UsageError(f"bad pattern rule {text!r}; expected NAME_PATTERN=N:M|RxC|none, e.g. 'h.*.mlp.*=8x8'")
    return name, normalised(pattern)


#: plan file key -> the TOML kind its value must be (`deploykit.core.tomlfile.check_value`)
PLAN_KEYS = {"method": "string", "sparsity": "number", "compression": "number", "scope": "string",
             "rules": "table of numbers", "exclude": "list of strings", "exclude_output": "boolean",
             "seed": "integer", "rounds": "integer", "layer_types": "list of strings", "at_init": "boolean",
             "allow_layer_collapse": "boolean", "round_to": "integer", "graph_timeout_s": "number",
             "pattern": "string", "pattern_rules": "table of strings", "calibration": "string",
             "calibration_samples": "integer", "reconstruct": "boolean", "recover_steps": "integer"}


def load_plan_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML plan: top-level method/sparsity/scope/exclude/exclude_output/seed and a [rules] table.

    Returns PruningPlan keyword arguments. Unknown keys, and values of the wrong type (a string for a
    boolean, a boolean for a number), are errors naming the key, its line and the file.
    """

    path = Path(path)
    data, text = read_toml(path, "plan file")
    unknown = sorted(set(data) - set(PLAN_KEYS))
    if unknown:
        raise UsageError(f"plan file {str(path)!r}: unknown key {unknown[0]!r}; known: {', '.join(sorted(PLAN_KEYS))}")
    for key, value in data.items():
        check_value(value, PLAN_KEYS[key], key, path, text)
    options = {k: v for k, v in data.items() if k not in ("sparsity", "rules")}
    if "sparsity" in data:
        options["amount"] = data["sparsity"]
    options["rules"] = tuple(data.get("rules", {}).items())
    if "pattern_rules" in data:
        options["pattern_rules"] = tuple(data["pattern_rules"].items())
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
    #: weights outside the prunable modules (`reached_weights`: "module.parameter" -> sparsity), for
    #: pruners that reach any parameter (`Pruner.reaches_parameters`)
    extra: dict[str, float] = field(default_factory=dict)
    #: the layers producing the model's outputs (excluded or not): structured pruning never changes their width
    output_layers: tuple[str, ...] = ()
    #: the calibration inputs, for pruners that run the model (`Pruner.calibrated`)
    calibration: "Calibration | None" = None

    def modules(self) -> "list[tuple[str, nn.Module, float]]":
        return [(name, self.model.get_submodule(name), amount) for name, amount in self.targets.items()]

    def named_weights(self) -> list[tuple[str, str, float]]:
        """(module name, parameter name, sparsity) of every weight to prune, as `weights`."""
        return [(name, "weight", amount) for name, amount in self.targets.items()] + [
            (name.rpartition(".")[0], name.rpartition(".")[2], amount) for name, amount in self.extra.items()]

    def weights(self) -> "list[tuple[nn.Module, str, float]]":
        """(module, parameter name, sparsity) of every weight to prune: the targets' `weight`, then the extras."""
        extra = [(self.model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], amount)
                 for name, amount in self.extra.items()]
        return [(module, "weight", amount) for _, module, amount in self.modules()] + extra


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
    """Zero individual weights of each target's `weight` and of the extra weights (packed attention
    projections, RNN and custom layers' weights): the smallest (L1) or random ones; under a pattern
    (`--pattern 2:4`, `8x8`), groups or blocks of them (`deploykit.prune.tiles`), the blocks of layers
    sharing a sparsity ranked together under the global scope."""

    #: zeroing single entries is exact for any weight a layer multiplies by, whoever reads it
    reaches_parameters = True
    patterns = True

    def __init__(self, method: str):
        self.method = method  # the torch.nn.utils.prune method name: "l1_unstructured" / "random_unstructured"

    def apply(self, ctx: PruneContext) -> Outcome:
        from torch.nn.utils import prune

        method_class = {"l1_unstructured": prune.L1Unstructured, "random_unstructured": prune.RandomUnstructured}[self.method]
        requested = 0
        by_amount: dict[tuple, list] = {}
        for module_name, name, amount in ctx.named_weights():
            pattern = ctx.plan.pattern_for(module_name)
            by_amount.setdefault((amount, pattern), []).append((module_name, name))
        for (amount, pattern), named in by_amount.items():
            if pattern is not None:
                requested += self._prune_patterned(ctx, named, amount, pattern)
                continue
            weights = [(ctx.model.get_submodule(module_name), name) for module_name, name in named]
            if ctx.plan.scope == "global":  # one threshold across the layers sharing this sparsity
                prune.global_unstructured(weights, pruning_method=method_class, amount=amount)
                requested += round(amount * sum(getattr(m, n).numel() for m, n in weights))
            else:
                for module, name in weights:
                    getattr(prune, self.method)(module, name, amount=amount)
                    requested += round(amount * getattr(module, name).numel())
        masked = sum(_masked_count(module, name) for module, name, _ in ctx.weights())
        return Outcome("weights", requested, masked)

    def _prune_patterned(self, ctx: PruneContext, named: list, amount: float, pattern: "Pattern") -> int:
        """Mask `named` weights by N:M groups or blocks of the lowest magnitudes (or random scores); returns
        how many weights the pattern drops (blocks: the count nearest `amount` the tiles allow)."""
        import torch

        from deploykit.prune.layerwise import weight_views  # torch side
        from deploykit.prune.tiles import block_keep, pattern_keep  # torch side

        views = weight_views(ctx.model, named)
        scored = [(view, view.matrix().abs() if self.method == "l1_unstructured" else torch.rand(view.matrix().shape))
                  for view in views]
        if pattern.is_block and ctx.plan.scope == "global":
            keeps, count = block_keep(scored, pattern.shape, amount)
        else:
            kept = [pattern_keep(view, scores, amount, pattern) for view, scores in scored]
            keeps, count = [keep for keep, _ in kept], sum(c for _, c in kept)
        for view, keep in zip(views, keeps):
            view.install(keep)
        return count


PRUNERS.add("magnitude", UnstructuredPruner("l1_unstructured"))
PRUNERS.add("random", UnstructuredPruner("random_unstructured"))
for _name in ("l1-structured", "l2-structured", "fpgm", "random-structured"):
    PRUNERS.declare(_name, "deploykit.prune.structured")
PRUNERS.declare("imp", "deploykit.prune.imp")
for _name in ("snip", "grasp", "synflow"):
    PRUNERS.declare(_name, "deploykit.prune.saliency")
for _name in ("wanda", "sparsegpt"):
    PRUNERS.declare(_name, "deploykit.prune.oneshot")
PRUNERS.declare("act-structured", "deploykit.prune.activation")


@dataclass(frozen=True)
class PruneResult:
    """Which parameters a plan masked, which modules it left alone, and the verified outcome."""

    plan: PruningPlan
    pruned_parameters: tuple[str, ...]
    excluded_modules: tuple[str, ...]
    outcome: Outcome | None = None
    #: layers the plan pruned to 100% (only with `allow_layer_collapse`)
    collapsed_layers: tuple[str, ...] = ()
    #: excluded module -> why (the output it produces, the --exclude pattern, a tie)
    exclusion_reasons: dict[str, str] = field(default_factory=dict)
    #: the layers producing the model's outputs (the spec's, else found on the graph), excluded or not:
    #: what dense-shrunk keeps the width of
    output_layers: tuple[str, ...] = ()


#: prunable layer types outside torch, by class path (so that transformers is not imported here):
#: GPT-2's Conv1D is a Linear with its weight stored transposed; missing it, pruning GPT-2 prunes nothing
PRUNABLE_CLASS_PATHS = {"transformers.pytorch_utils.Conv1D"}


def layer_type(module: "nn.Module", hints: "PruningHints | None" = None) -> str:
    """Which of LAYER_TYPES a prunable module is."""
    from torch import nn

    if hints is not None and hints.handler_for(module) is not None:
        return "custom"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return "linear"  # nn.Linear, transformers' Conv1D


def prunable_modules(model: "nn.Module", hints: "PruningHints | None" = None) -> "list[tuple[str, nn.Module]]":
    """Modules pruning applies to: Linear, Conv and embedding layers (and transformers' Conv1D), and
    the layer types `hints` describe."""
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag, *(hints.layers if hints else ()))
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, kinds) or f"{type(m).__module__}.{type(m).__qualname__}" in PRUNABLE_CLASS_PATHS]


def is_weight(name: str, parameter) -> bool:
    """A parameter a layer multiplies its input by: float, two or more dimensions, named as a weight
    (`weight`, `in_proj_weight`, `weight_ih_l0`); not positions, tokens or scales (ViT's
    `position_embeddings`, `cls_token`), whose zeros would change what they encode."""
    return parameter.is_floating_point() and parameter.dim() >= 2 and "weight" in name


def reached_weights(model: "nn.Module", hints: "PruningHints | None" = None) -> "dict[str, str]":
    """Weights outside the prunable modules that unstructured pruning reaches, "module.parameter" ->
    layer type: packed projections a layer reads itself (`nn.MultiheadAttention.in_proj_weight`) and
    recurrent weights count as linear, any other module's weight as custom. A weight shared with
    another parameter (tied) is left out: pruning one side would untie it."""
    from torch import nn

    prunable = {name for name, _ in prunable_modules(model, hints)}
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    found = {}
    for module_name, module in model.named_modules():
        if module_name in prunable:
            continue
        kind = "linear" if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) else "custom"
        for local, parameter in module.named_parameters(recurse=False):
            if is_weight(local, parameter) and owners[id(parameter)] == 1:
                found[f"{module_name}.{local}" if module_name else local] = kind
    return found


def unpruned_weights(model: "nn.Module", result: PruneResult, hints: "PruningHints | None" = None) -> dict[str, str]:
    """Every weight (a float parameter of two or more dimensions) the plan left alone, with why: so that
    a sparsity short of the one asked for is explained where it is shown (an attention's packed
    `in_proj_weight`, a custom layer's parameter, an excluded or filtered layer). Empty for a plan
    that prunes nothing."""
    plan = result.plan
    if plan.is_empty():
        return {}
    prunable = dict(prunable_modules(model, hints))
    extra = reached_weights(model, hints)
    reaches = getattr(PRUNERS.get(plan.method), "reaches_parameters", False)
    excluded, pruned = set(result.excluded_modules), set(result.pruned_parameters)
    # structured pruners say which groups could not lose channels, and which attention kept its heads, and why
    details = result.outcome.details if result.outcome is not None else {}
    blocked = {**details.get("skipped_normalised_groups", {}),
               **{name: [why] for name, why in details.get("heads_kept", {}).items()}}
    found = {}
    for module_name, module in model.named_modules():
        for raw, parameter in module.named_parameters(recurse=False):
            local = raw.removesuffix("_orig")  # a masked model keeps its weight as weight_orig
            name = f"{module_name}.{local}" if module_name else local
            if name in pruned or parameter.dim() < 2 or not parameter.is_floating_point():
                continue
            kind = (layer_type(module, hints) if module_name in prunable and local == "weight"
                    else extra.get(name))
            if module_name in excluded:
                found[name] = "excluded: " + result.exclusion_reasons.get(module_name, "by the plan")
            elif kind is None:
                found[name] = (f"a parameter of {type(module).__name__} that is not a layer's weight (positions, "
                               "tokens, a weight shared with another): the pruners leave it")
            elif (module_name not in prunable or local != "weight") and not (
                    reaches and _reaches(PRUNERS.get(plan.method), module, local, plan)):
                found[name] = (f"a weight {type(module).__name__} reads itself: {plan.method} prunes layers' weights; "
                               "magnitude and random prune it entry by entry")
            elif plan.layer_types and kind not in plan.layer_types:
                found[name] = f"a {kind} layer; the plan prunes {', '.join(plan.layer_types)} layers"
            elif module_name in details.get("heads_kept", {}):
                found[name] = details["heads_kept"][module_name]
            elif module_name in blocked:
                found[name] = f"its channels cannot be removed: {blocked[module_name][0]}"
            elif module_name in details.get("without_group", ()):
                found[name] = ("no channel group is rooted at it: its output channels belong to another layer's group "
                               "(pruned with that one) or to a width that stays (a residual stream that reaches an output)")
            else:
                found[name] = "the plan gives it sparsity 0 (a rule)" if plan.rules else "left dense by the pruner"
    return found


def tied_modules(model: "nn.Module") -> list[str]:
    """Prunable modules whose weight is shared with another module (GPT-2's embedding and LM head).

    Pruning one side of a tie would replace its weight and silently untie it, so these are excluded.
    """
    owners: dict[int, list[str]] = {}
    for name, module in prunable_modules(model):
        owners.setdefault(id(module.weight), []).append(name)
    return sorted(name for names in owners.values() if len(names) > 1 for name in names)


#: flattened output names of state a model hands back to be fed to its next call (attention caches):
#: not answers, so the layers that write them are not output layers (their widths follow the cache rules)
STATE_OUTPUTS = ("past_key_values", "present", "presents")


def output_layers_by_output(model: "nn.Module", example_inputs: "Sequence[torch.Tensor]",
                            hints: "PruningHints | None" = None) -> dict[str, list[str]]:
    """Each output of the model (flattened name) -> the layers that produce it, found on the autograd
    graph of one forward pass (`deploykit.core.hooks.output_producers`): every head of a model with
    several, wherever it runs. A layer that reads its weights itself (nn.MultiheadAttention, an RNN)
    counts as one layer. Where the graph cannot be followed (no output has autograd history), the
    prunable module that runs last, under the name "output"."""
    from torch import nn

    from deploykit.core.hooks import (  # torch side: plans are read by the torch-free CLI
        observe_forward,
        output_producers,
    )

    layers = dict(prunable_modules(model, hints))
    layers.update((name, m) for name, m in model.named_modules()
                  if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and not any(
                      name.startswith(f"{outer}.") for outer in layers))
    found = output_producers(model, example_inputs, layers)
    if found is not None:
        return {name: producers for name, producers in found.items()
                if name.split(".")[0] not in STATE_OUTPUTS and producers}
    order: list[str] = []
    observe_forward(model, example_inputs, {module: lambda _a, _o, name=name: order.append(name)
                                            for name, module in prunable_modules(model, hints)}, inference=False)
    return {"output": order[-1:]} if order else {}


def detect_output_layers(model: "nn.Module", example_inputs: "Sequence[torch.Tensor]",
                         hints: "PruningHints | None" = None) -> list[str]:
    """The layers that produce any of the model's outputs (`output_layers_by_output`), each once."""
    by_output = output_layers_by_output(model, example_inputs, hints)
    return sorted({layer for layers in by_output.values() for layer in layers})


def producers_of_outputs(model: "nn.Module", example_inputs: "Sequence[torch.Tensor]", output_layers: Sequence[str] = (),
                         hints: "PruningHints | None" = None) -> dict[str, list[str]]:
    """Output name -> the layers producing it: `output_layers` where the model's spec names them (under
    the name ""), else found on the graph (`output_layers_by_output`)."""
    if output_layers:
        return {"": list(output_layers)}
    return output_layers_by_output(model, example_inputs, hints)


def excluded_modules(
    model: "nn.Module", plan: PruningPlan, example_inputs: "Sequence[torch.Tensor]", output_layers: Sequence[str] = (),
    hints: "PruningHints | None" = None, producers: "dict[str, list[str]] | None" = None,
) -> dict[str, str]:
    """Modules the plan never prunes, each with why: matches of `plan.exclude` and of the hints' ignored
    layers (any module: excluding a block keeps its output width too), weights tied to another, and
    the layers producing the model's outputs (`producers`, else `producers_of_outputs`)."""
    reasons: dict[str, str] = {}
    if plan.exclude_output:
        if producers is None:
            producers = producers_of_outputs(model, example_inputs, output_layers, hints)
        for output, layers in producers.items():
            for name in layers:
                said = f"produces the output {output!r}" if output else "the model's output layer (its spec names it)"
                reasons[name] = (reasons[name] + f", {output!r}" if name in reasons and output
                                 else f"{said} (--prune-output prunes it)")
    for name in tied_modules(model):
        reasons[name] = "its weight is tied to another layer's (pruning one would untie them)"
    for label, patterns in (("--exclude", plan.exclude), ("the model's hints", hints.ignored_layers if hints else ())):
        for name, module in model.named_modules():
            pattern = _matching_pattern(name, patterns) if name else None
            if pattern is not None and next(module.parameters(), None) is not None:
                reasons[name] = f"{label} {pattern!r}"
    return dict(sorted(reasons.items()))


def _matching_pattern(name: str, patterns: Sequence[str]) -> str | None:
    """The first pattern that matches the module or a block holding it."""
    parts = name.split(".")
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            return pattern
    return None


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

    from deploykit.core.hooks import is_scripted  # torch side: plans are read by the torch-free CLI
    from deploykit.model.hints import hints_of  # torch side

    if is_scripted(model):
        if not plan.is_empty():
            raise UsageError(f"{plan.described()} cannot prune a TorchScript module ({type(model).__name__} from "
                             "torch.jit.script or torch.jit.load): its code is compiled and its layers cannot be masked or "
                             "replaced; prune the Python model it was scripted from, or export this one unpruned "
                             "(--prune none)")
        return PruneResult(plan, (), ())
    hints = hints_of(spec)
    pruner = PRUNERS.get(plan.method)
    kinds = plan.layer_types or (PATTERN_LAYER_TYPES if plan.has_pattern else getattr(pruner, "layer_types", LAYER_TYPES))
    prunable = prunable_modules(model, hints)
    candidates = [name for name, module in prunable if layer_type(module, hints) in kinds]
    producers = producers_of_outputs(model, example_inputs, output_layers, hints)
    outputs = tuple(sorted({name for layers in producers.values() for name in layers}))
    reasons = excluded_modules(model, plan, example_inputs, output_layers, hints, producers)
    excluded = list(reasons)
    targets = {name: plan.amount_for(name) for name in candidates if name not in excluded}
    targets = {name: amount for name, amount in targets.items() if amount > 0}
    extra = {}
    if getattr(pruner, "reaches_parameters", False):
        extra = {name: plan.amount_for(module) for name, kind in reached_weights(model, hints).items()
                 if kind in kinds and (module := name.rpartition(".")[0]) not in excluded
                 and _reaches(pruner, model.get_submodule(module), name.rpartition(".")[2], plan)}
        extra = {name: amount for name, amount in extra.items() if amount > 0}
    if plan.has_pattern and not plan.is_empty():
        from deploykit.prune.tiles import pattern_exclusions  # torch side

        too_small = pattern_exclusions(model, plan, [(name, "weight") for name in targets]
                                       + [tuple(name.rpartition(".")[::2]) for name in extra])
        reasons.update(too_small)
        excluded += list(too_small)
        targets = {name: amount for name, amount in targets.items() if name not in too_small}
        extra = {name: amount for name, amount in extra.items() if name.rpartition(".")[0] not in too_small}
    if plan.is_empty():
        return PruneResult(plan, (), tuple(excluded), exclusion_reasons=reasons, output_layers=outputs)
    if not targets and not extra:
        readers = sorted({name.rpartition(".")[0] for name in reached_weights(model, hints)} - set(excluded))
        kept = (f"the layers producing outputs ({', '.join(outputs[:4])}{', ...' if len(outputs) > 4 else ''}) excluded"
                if plan.exclude_output else "the output layers included")
        raise UsageError(f"nothing to prune: the plan selects none of the {len(prunable)} prunable layers "
                         f"({plan.method} prunes {', '.join(kinds)} layers, {kept}; see --layer-types and --prune-output)"
                         + (f"; {', '.join(readers[:3])} {'hold' if len(readers) > 1 else 'holds'} weights {plan.method} "
                            "does not prune (recurrent or packed attention weights): magnitude or random prune them entry "
                            "by entry" if readers else ""))

    calibration = teacher = None
    if plan.uses_calibration:
        calibration = _calibration(plan, spec)
        teacher = copy.deepcopy(model)  # the outputs pruning is measured, and recovery distilled, against
    ctx = PruneContext(model, plan, targets, tuple(excluded), tuple(example_inputs), spec, extra, outputs, calibration)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(pruning_seed(plan.seed))
        outcome = pruner.apply(ctx)
    if outcome.unit == "weights":  # recount from the masks: a pruner's own report is not evidence
        outcome = dataclasses.replace(outcome, masked=sum(_masked_count(m, name) for m, name, _ in ctx.weights()))
    if outcome.masked != outcome.requested:
        raise RuntimeError(
            f"{plan.method} pruning masked {outcome.masked} {outcome.unit} where {outcome.requested} were requested"
        )
    collapsed = [name for name, module, _ in ctx.modules() if _fully_masked(module, "weight")]
    collapsed += [name for name in extra if _fully_masked(model.get_submodule(name.rpartition(".")[0]),
                                                          name.rpartition(".")[2])]
    if collapsed and not plan.allow_layer_collapse:
        raise UsageError(f"{plan.described()} prunes {len(collapsed)} layer{'s' * (len(collapsed) > 1)} to "
                         f"100%, so nothing passes through {'them' if len(collapsed) > 1 else 'it'}: "
                         f"{', '.join(collapsed[:5])}{', ...' if len(collapsed) > 5 else ''}; lower the sparsity, prune "
                         f"per layer (--scope layer), --exclude {'them' if len(collapsed) > 1 else 'it'}, or pass "
                         "--allow-layer-collapse")
    if calibration is not None:
        outcome = dataclasses.replace(outcome, details={
            **outcome.details, **_after_pruning(model, teacher, plan, calibration, example_inputs)})
    return PruneResult(plan, tuple(masked_parameters(model)), tuple(excluded), outcome, tuple(collapsed), reasons,
                       outputs)


def _calibration(plan: PruningPlan, spec: "ModelSpec | None") -> "Calibration":
    if spec is None:
        raise UsageError(f"{plan.method} prunes from calibration data: give the model's spec (prune_model(..., spec=))")
    what = f"--recover {plan.recover_steps}" if not getattr(PRUNERS.get(plan.method), "calibrated", False) else plan.method
    return calibration_data(spec, plan.calibration, plan.calibration_samples, what)


def _after_pruning(model, teacher, plan: PruningPlan, calibration: "Calibration", example_inputs) -> dict:
    """The calibration record, the recovery (`--recover`), and the outputs' agreement with the unpruned
    model on the held-out items (example inputs where there are none)."""
    from deploykit.prune.recover import distil, output_agreement  # torch side

    measured_on = calibration.held_out or (tuple(example_inputs),)
    details: dict[str, Any] = {"calibration": calibration.record()}
    if plan.recover_steps:
        details["agreement_before_recovery"] = output_agreement(teacher, model, measured_on)
        details["recovery"] = distil(model, teacher, calibration.batches, plan.recover_steps, measured_on)
    details["agreement"] = output_agreement(teacher, model, measured_on)
    details["agreement_on"] = (f"{sum(int(b[0].shape[0]) for b in calibration.held_out)} held-out calibration items"
                               if calibration.held_out else "the example inputs (the calibration source has no items "
                               "beyond those pruned on)")
    return details


def _reaches(pruner: Pruner, module: "nn.Module", param: str, plan: PruningPlan | None = None) -> bool:
    """Whether a pruner that reaches parameters outside layers (`reaches_parameters`) takes this one: all of
    them, unless it says which (`reaches(module, param)`: wanda and sparsegpt take attention projections only);
    under a pattern, the attention projections only (the weights a pattern's (out, in) view describes)."""
    from torch import nn

    if plan is not None and plan.has_pattern:
        return isinstance(module, nn.MultiheadAttention)
    reaches = getattr(pruner, "reaches", None)
    return reaches is None or reaches(module, param)


def _fully_masked(module: "nn.Module", name: str) -> bool:
    mask = getattr(module, f"{name}_mask", None)
    return mask is not None and mask.numel() > 0 and not bool(mask.any())


def pruning_seed(seed: int) -> int:
    """The torch seed random pruners draw from, derived from the plan's seed.

    Not the plan's seed itself: models are initialised from `torch.manual_seed(spec.seed)` (0 for the
    zoo), and a pruner drawing `rand_like(weight)` from the same stream gets the very numbers the
    weights were drawn from, so "random" pruning at seed 0 removed the most negative initial weights
    (measured: LeNet-300-100 pruned at initialisation then trained stayed at chance, 0.078)."""
    digest = hashlib.sha256(f"deploykit-pruning:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
