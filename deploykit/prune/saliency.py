"""Saliency pruners: SNIP, GraSP and SynFlow (pruning at initialisation), as unstructured masks.

Each scores every weight of the target layers and masks the lowest-scoring ones: one ranking over all
targets that share a sparsity (`--scope global`, default) or one per layer. Counts are exact
(`round(sparsity * weights)` per ranking); ties go to the earlier weight, so a plan always gives the
same mask.

- **SNIP** (Lee et al. 2019): connection sensitivity |w * dL/dw|, gradients summed over the data hook's
  batches.
- **GraSP** (Wang et al. 2020): keeps the weights that preserve gradient flow. With g the loss gradient
  and H the Hessian, the reference implementation removes the weights with the largest -w * (H g),
  computed by double back-propagation on logits divided by a temperature of 200; here the importance
  is w * (H g) and the lowest go.
- **SynFlow** (Tanaka et al. 2020): data-free. The weights' absolute values, an all-ones input (one
  item, in float64), R = sum of the outputs, score |w * dR/dw|; 100 iterations, each masking to the
  sparsity of an exponential schedule (the last one reaches the plan's), so that no layer collapses.
  Integer inputs (token ids) are ones too, i.e. token 1.

SNIP and GraSP need data: the model spec's `data` hook (a few labelled batches) and its `loss`
(cross-entropy on the outputs by default). A model without one is refused, naming SynFlow as the
data-free choice. By default these methods prune linear and conv layers (`PruningPlan.layer_types`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

from deploykit.core.errors import UsageError
from deploykit.core.hooks import run_forward
from deploykit.core.outputs import flat_tensors
from deploykit.prune.base import PRUNERS, Outcome, PruneContext

#: labelled batches SNIP and GraSP draw from the data hook
DATA_BATCHES = 4
#: GraSP's softmax temperature on the logits (the reference implementation's T)
GRASP_TEMPERATURE = 200.0
#: SynFlow's scoring iterations (the paper's 100); a plan's `rounds` > 1 overrides
SYNFLOW_ITERATIONS = 100

Scores = dict[str, torch.Tensor]


def rankings(names: Sequence[str], amounts: dict[str, float], scope: str) -> list[list[str]]:
    """The layers ranked together: all those sharing a sparsity (global scope), or each alone."""
    groups: dict[object, list[str]] = defaultdict(list)
    for name in names:
        groups[name if scope == "layer" else amounts[name]].append(name)
    return list(groups.values())


def requested_weights(sizes: dict[str, int], amounts: dict[str, float], scope: str) -> int:
    """Weights a plan asks to prune: round(sparsity * size) per ranking."""
    return sum(round(amounts[names[0]] * sum(sizes[n] for n in names)) for names in rankings(sizes, amounts, scope))


def lowest_first_masks(scores: Scores, amounts: dict[str, float], scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks that drop the lowest `amount` of each ranking (`rankings`): exactly
    round(amount * size) weights per ranking; ties go to the earlier weight."""
    masks = {}
    for names in rankings(list(scores), amounts, scope):
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        count = round(amounts[names[0]] * flat.numel())
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:count]] = False
        offset = 0
        for n in names:
            size = scores[n].numel()
            masks[n] = keep[offset:offset + size].reshape(scores[n].shape)
            offset += size
    return masks


class SaliencyPruner:
    """Score the weights of `ctx.targets`, mask the lowest; subclasses give `scores`."""

    layer_types = ("linear", "conv", "custom")

    def scores(self, ctx: PruneContext) -> Scores:
        raise NotImplementedError

    def apply(self, ctx: PruneContext) -> Outcome:
        return _install(ctx, lowest_first_masks(self.scores(ctx), ctx.targets, ctx.plan.scope))


def _install(ctx: PruneContext, masks: dict[str, torch.Tensor], details: dict | None = None) -> Outcome:
    for name, module, _ in ctx.modules():
        prune.custom_from_mask(module, "weight", masks[name])
    sizes = {name: module.weight.numel() for name, module, _ in ctx.modules()}
    # what the plan asked for; prune_model counts what the installed masks hold and compares
    return Outcome("weights", requested_weights(sizes, ctx.targets, ctx.plan.scope), 0, details or {})


def _batches(ctx: PruneContext, method: str) -> Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    spec = ctx.spec
    if spec is None or spec.data is None:
        name = spec.name if spec is not None else "this model"
        raise UsageError(f"{method} scores weights on data, and {name} has no data hook (ModelSpec.data); "
                         "synflow is data-free, or use magnitude or random")
    batches = list(spec.data(DATA_BATCHES))
    if not batches:
        raise UsageError(f"{method}: the data hook of {spec.name} gave no batches")
    return batches


def _loss(ctx: PruneContext) -> Callable[[object, torch.Tensor], torch.Tensor]:
    return getattr(ctx.spec, "loss", None) or classification_loss


def classification_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (the first output, classes on the last axis) against class ids."""
    logits = flat_tensors(outputs)[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _summed_grads(model: nn.Module, names: Sequence[str], loss_of, batches, create_graph: bool = False):
    """Gradients of the summed batch losses w.r.t. the weights of `names` (zeros where unused)."""
    params = [model.get_submodule(name).weight for name in names]
    total = [torch.zeros_like(p) for p in params]
    for inputs, targets in batches:
        parts = torch.autograd.grad(loss_of(model, inputs, targets), params, create_graph=create_graph,
                                    allow_unused=True)
        total = [t + part if part is not None else t for t, part in zip(total, parts)]
    return total


class SNIP(SaliencyPruner):
    def scores(self, ctx: PruneContext) -> Scores:
        names = list(ctx.targets)
        loss = _loss(ctx)
        def loss_of(model, inputs, targets):
            return loss(run_forward(model, inputs), targets)

        with torch.enable_grad():
            grads = _summed_grads(ctx.model, names, loss_of, _batches(ctx, "snip"))
        return {name: (ctx.model.get_submodule(name).weight.detach() * g).abs() for name, g in zip(names, grads)}


class GraSP(SaliencyPruner):
    #: step of the finite-difference Hessian-vector product, along the unit gradient direction (float64)
    FD_STEP = 1e-4

    def scores(self, ctx: PruneContext) -> Scores:
        names = list(ctx.targets)
        loss = _loss(ctx)
        batches = _batches(ctx, "grasp")

        def tempered_loss(model, inputs, targets):
            outputs = run_forward(model, inputs)
            logits = flat_tensors(outputs)[0]
            return loss(logits / GRASP_TEMPERATURE, targets)

        with torch.enable_grad():
            g = [part.detach() for part in _summed_grads(ctx.model, names, tempered_loss, batches)]
            try:
                hg = self._hessian_product(ctx.model, names, tempered_loss, batches, g)
            except NotImplementedError:  # a layer without a double backward (EmbeddingBag)
                hg = self._hessian_product_by_differences(ctx.model, names, tempered_loss, batches, g)
        return {name: ctx.model.get_submodule(name).weight.detach() * h for name, h in zip(names, hg)}

    @staticmethod
    def _hessian_product(model, names, loss_of, batches, g):
        """H g by double back-propagation, batch by batch (the reference implementation's way)."""
        params = [model.get_submodule(name).weight for name in names]
        hg = [torch.zeros_like(p) for p in params]
        for inputs, targets in batches:
            grad = _summed_grads(model, names, loss_of, [(inputs, targets)], create_graph=True)
            z = sum((gi * fixed).sum() for gi, fixed in zip(grad, g))
            parts = torch.autograd.grad(z, params, allow_unused=True)
            hg = [h + part if part is not None else h for h, part in zip(hg, parts)]
        return hg

    @classmethod
    def _hessian_product_by_differences(cls, model, names, loss_of, batches, g):
        """H g as the central difference of gradients along g, in float64: for layers whose backward
        has no derivative of its own (EmbeddingBag's), so double back-propagation cannot run."""
        probe = copy.deepcopy(model).double()
        norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
        if norm == 0:
            return [torch.zeros_like(gi) for gi in g]
        direction = [gi.double() / norm for gi in g]
        doubled = [((tuple(t.double() if t.is_floating_point() else t for t in inputs)), targets)
                   for inputs, targets in batches]
        weights = [probe.get_submodule(name).weight for name in names]
        grads = {}
        for sign in (1, -1):
            with torch.no_grad():
                for w, d in zip(weights, direction):
                    w.add_(sign * cls.FD_STEP * d)
            grads[sign] = _summed_grads(probe, names, loss_of, doubled)
            with torch.no_grad():
                for w, d in zip(weights, direction):
                    w.sub_(sign * cls.FD_STEP * d)
        return [((plus - minus) * norm / (2 * cls.FD_STEP)).to(gi.dtype)
                for plus, minus, gi in zip(grads[1], grads[-1], g)]


class SynFlow:
    """Iterative: each round's scores depend on the previous round's masks."""

    layer_types = SaliencyPruner.layer_types

    def apply(self, ctx: PruneContext) -> Outcome:
        iterations = ctx.plan.rounds if ctx.plan.rounds > 1 else SYNFLOW_ITERATIONS
        probe = copy.deepcopy(ctx.model).double().eval()
        with torch.no_grad():
            for p in probe.parameters():
                p.abs_()
        originals = {name: probe.get_submodule(name).weight.detach().clone() for name in ctx.targets}
        ones = [torch.ones_like(t[:1], dtype=torch.float64 if t.is_floating_point() else t.dtype)
                for t in ctx.example_inputs]
        masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in originals.items()}
        for k in range(1, iterations + 1):
            with torch.no_grad():
                for name, w in originals.items():
                    probe.get_submodule(name).weight.copy_(w * masks[name])
            weights = [probe.get_submodule(name).weight for name in originals]
            with torch.enable_grad():
                outputs = run_forward(probe, ones)
                total = sum(o.sum() for o in flat_tensors(outputs) if o.is_floating_point())
                grads = torch.autograd.grad(total, weights)
            scores = {}
            for (name, w), g in zip(originals.items(), grads):
                score = (g * w * masks[name]).abs()
                scores[name] = torch.where(masks[name], score, torch.full_like(score, -torch.inf))  # stay pruned
            # the exponential schedule; the last iteration uses the plan's own amounts (no float drift)
            amounts = ctx.targets if k == iterations else {
                name: 1 - (1 - a) ** (k / iterations) for name, a in ctx.targets.items()}
            masks = lowest_first_masks(scores, amounts, ctx.plan.scope)
        return _install(ctx, masks, {"iterations": iterations})


PRUNERS.add("snip", SNIP())
PRUNERS.add("grasp", GraSP())
PRUNERS.add("synflow", SynFlow())
