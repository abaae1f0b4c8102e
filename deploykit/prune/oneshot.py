"""Calibration-aware one-shot pruners: Wanda and SparseGPT, unstructured or N:M, no retraining.

- **Wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  a weight's score is |W_ij| * ||X_j||, its magnitude times the norm of its input feature over the
  calibration rows; the lowest go in each output row (the paper's per-output comparison group), or,
  with an N:M pattern, the lowest M - N of every M consecutive weights of a row, or with a block
  pattern the blocks of the lowest score norm over the layer (`deploykit.prune.tiles`). No weight
  changes.
- **SparseGPT** (Frantar & Alistarh 2023): with H = X^T X of the layer's calibration inputs (dampened by
  1% of its mean diagonal, `DAMPENING`, times inputs / rows where the rows are fewer), columns are processed left to right in blocks of
  `BLOCK_SIZE`; in each block the weights with the lowest w^2 / [H^-1]_jj^2 are chosen (N:M: per M
  columns; blocks RxC: the tiles of the lowest norm of those saliencies), and each pruned weight's error is spread over the row's later columns through the inverse
  Hessian's Cholesky factor (the optimal brain surgeon update), so the layer's output on the
  calibration inputs is kept as far as the remaining weights allow. Its reference implementation's
  algorithm, counts made exact: each block prunes round(sparsity * its weights).

Both run layer by layer in the order the model calls its layers, each on the inputs the model pruned so
far gives it (`deploykit.prune.layerwise`, which also says why this is our own code). They prune Linear,
Conv1d/Conv2d (as their unfolded matrices; N:M along the input channels at each kernel position),
GPT-2's Conv1D and nn.MultiheadAttention's packed projection; embeddings and recurrent weights are left
to magnitude and random. Every layer gets its plan sparsity (rules apply): their scores are per layer,
not comparable across layers, so `--scope` does not change them.
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.core.errors import UsageError
from deploykit.prune.base import PRUNERS, Outcome, PruneContext
from deploykit.prune.layerwise import ColumnNorms, SecondMoment, WeightView, call_order, gather, weight_views
from deploykit.prune.patterns import Pattern
from deploykit.prune.tiles import expand_tiles, lowest_tiles, pattern_keep, tile_grid

#: SparseGPT's columns per block (the reference's 128; a multiple of M under an N:M pattern)
BLOCK_SIZE = 128
#: SparseGPT's dampening: this share of the mean diagonal of H added to its diagonal
DAMPENING = 0.01


class LayerwisePruner:
    """Prune each selected weight in call order from its calibration statistics (`prune_view`)."""

    calibrated = True
    patterns = True
    #: each layer gets its own sparsity: --scope does not apply
    scoped = False
    #: fewer calibration items than this give statistics too thin to prune by (one batch of the default 16)
    min_calibration_items = 8
    #: nn.MultiheadAttention's packed projection is reached (`reaches`); recurrent and custom weights are not
    reaches_parameters = True
    layer_types = ("linear", "conv")

    def reaches(self, module: nn.Module, _param: str) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def apply(self, ctx: PruneContext) -> Outcome:
        calibration = ctx.calibration
        weights = [(name, "weight") for name in ctx.targets] + [tuple(n.rsplit(".", 1)) for n in ctx.extra]
        amounts = {**{f"{name}.weight": a for name, a in ctx.targets.items()}, **ctx.extra}
        views = weight_views(ctx.model, weights)
        requested, layers = 0, {}
        for view in call_order(ctx.model, views, calibration.batches[0]):
            pattern = ctx.plan.pattern_for(view.name.rpartition(".")[0])  # checked against the layer by prune_model
            count, record = self.prune_view(ctx.model, view, amounts[view.name], pattern, calibration.batches)
            requested += count
            layers[view.name] = record
        return Outcome("weights", requested, 0, {"layers": layers,
                                                 "warnings": calibration_warnings(ctx.plan.method, layers)})

    def prune_view(self, model, view: WeightView, amount: float, pattern, batches) -> tuple[int, dict]:
        raise NotImplementedError


def _coverage(stats: list, powers: list[torch.Tensor]) -> dict:
    """A layer's calibration rows, its inputs, and how many of them the rows never excited."""
    return {"rows": stats[0].rows, "inputs": sum(len(p) for p in powers),
            "unseen_inputs": sum(int((p == 0).sum()) for p in powers)}


def calibration_warnings(method: str, layers: dict[str, dict]) -> list[str]:
    """What makes a layer's statistics thin: inputs the calibration items never excited, fewer rows than
    inputs (its second moment then has no full rank: sparsegpt's update fits those rows)."""
    warnings = []
    unseen = {name: r for name, r in layers.items() if r.get("unseen_inputs")}
    if unseen:
        worst = max(unseen, key=lambda name: unseen[name]["unseen_inputs"] / unseen[name]["inputs"])
        warnings.append(f"{len(unseen)} layer{'s' * (len(unseen) > 1)} had inputs the calibration items never excited "
                        f"(most: {worst}, {unseen[worst]['unseen_inputs']:,} of {unseen[worst]['inputs']:,}): "
                        + f"{method} prunes their weights first (no evidence that they matter); a model with sparse inputs "
                        "(a bag of words) meets them at inference: more or more varied calibration items "
                        "(--calibration-samples) cover more")
    thin = {name: r for name, r in layers.items() if r["rows"] < r["inputs"]}
    if thin and method == "sparsegpt":
        name = next(iter(thin))
        warnings.append(f"{len(thin)} layer{'s' * (len(thin) > 1)} saw fewer calibration rows than inputs (first: "
                        f"{name}, {thin[name]['rows']:,} rows for {thin[name]['inputs']:,} inputs): sparsegpt's update "
                        "fits those rows more than the task (its dampening grows to make up); give at least that many "
                        "items (--calibration-samples)")
    return warnings


def lowest_per_row(scores: torch.Tensor, amount: float) -> tuple[torch.Tensor, int]:
    """Keep-mask dropping round(amount * width) of the lowest scores of each row, and how many it drops."""
    rows, width = scores.shape
    count = round(amount * width)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :count], False)
    return keep, rows * count


class Wanda(LayerwisePruner):
    def prune_view(self, model, view, amount, pattern, batches):
        stats = gather(model, view, batches, ColumnNorms, ColumnNorms.add)
        weight = view.matrix()
        scores = torch.zeros_like(weight)
        for (r0, r1, c0, c1), norms in zip(view.parts, stats):
            scores[r0:r1, c0:c1] = weight[r0:r1, c0:c1].abs() * norms.norms()[None, :]
        if pattern is not None:  # N:M groups per row; blocks by the L2 norm of their scores, over the layer
            keep, total = pattern_keep(view, scores, amount, pattern)
        else:  # the paper's comparison group: each output row
            keep, total = torch.ones_like(weight, dtype=torch.bool), 0
            for r0, r1, c0, c1 in view.parts:
                keep[r0:r1, c0:c1], count = lowest_per_row(scores[r0:r1, c0:c1], amount)
                total += count
        view.install(keep)
        return total, _coverage(stats, [n.sums for n in stats])


class SparseGPT(LayerwisePruner):
    def prune_view(self, model, view, amount, pattern, batches):
        stats = gather(model, view, batches, SecondMoment, SecondMoment.add)
        weight = view.matrix()
        keep = torch.ones_like(weight, dtype=torch.bool)
        total, error, energy = 0, 0.0, 0.0
        order = view.channel_order() if pattern is not None and not pattern.is_block else None
        for (r0, r1, c0, c1), moment in zip(view.parts, stats):
            original, hessian = weight[r0:r1, c0:c1].clone(), moment.mean()
            if order is not None:  # N:M groups run along channels: reorder the columns, and back after
                original, hessian = original[:, order], hessian[order][:, order]
            # fewer rows than inputs: the second moment has no full rank, and the update would fit those
            # rows; dampening grows with inputs / rows, as a covariance estimate is shrunk (measured on
            # mlp-sst2-trained at 0.5, 128 items for 5,000 inputs: accuracy 0.73 at 1%, 0.90 shrunk)
            dampening = DAMPENING * max(1.0, (c1 - c0) / max(moment.rows, 1))
            updated, kept, count = sparsegpt(original, hessian, amount, pattern, dampening=dampening)
            if order is not None:
                back = torch.argsort(order)
                updated, kept = updated[:, back], kept[:, back]
                original, hessian = weight[r0:r1, c0:c1].clone(), moment.mean()
            weight[r0:r1, c0:c1], keep[r0:r1, c0:c1] = updated, kept
            total += count
            delta = original - updated
            error += float(torch.einsum("ij,jk,ik->", delta, hessian, delta))
            energy += float(torch.einsum("ij,jk,ik->", original, hessian, original))
        view.write(weight)
        view.install(keep)
        # the layer's output error on the calibration inputs, relative to its output: what the update kept
        return total, {**_coverage(stats, [m.matrix.diagonal() for m in stats]),
                       "relative_output_error": error / energy if energy > 0 else 0.0}


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, amount: float, pattern: Pattern | None,
              block_size: int = BLOCK_SIZE, dampening: float = DAMPENING) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SparseGPT on one (rows, columns) weight with its inputs' second moment `hessian`: the updated
    weight (zeros where pruned), its keep-mask, and how many weights it pruned."""
    weight, hessian = weight.contiguous().clone(), hessian.contiguous().clone()
    rows, columns = weight.shape
    # inputs the calibration items never excite: the reference implementation zeroes their weights outside the
    # mask (an LLM's dead features); here they are pruned first, within the mask, so the count stays what was
    # asked (as Wanda's zero score does), and H gets an average diagonal there so that it can be factored
    diagonal = torch.diag(hessian)
    dead = diagonal == 0
    hessian[dead, dead] = float(diagonal[~dead].mean()) if bool((~dead).any()) else 1.0
    inverse = _inverse_cholesky(hessian, dampening)
    if pattern is not None:  # chunks hold whole N:M groups, and whole block columns
        block_size = max(block_size // pattern.second, 1) * pattern.second
    keep = torch.ones_like(weight, dtype=torch.bool)
    total = 0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block, inv = weight[:, i1:i2].clone(), inverse[i1:i2, i1:i2]
        quantised, errors = torch.zeros_like(block), torch.zeros_like(block)
        diagonal = torch.diag(inv)
        pruned = torch.zeros(block.shape, dtype=torch.bool)
        if pattern is None:
            scores = torch.where(dead[None, i1:i2], -1.0, block ** 2 / diagonal[None, :] ** 2)
            count = round(amount * scores.numel())
            pruned.view(-1)[torch.argsort(scores.reshape(-1), stable=True)[:count]] = True
            total += count
        elif pattern.is_block:  # the chunk's tiles by the L2 norm of their weights' saliencies, lowest first
            scores = torch.where(dead[None, i1:i2], 0.0, block ** 2 / diagonal[None, :] ** 2)
            (drop,), count = lowest_tiles([tile_grid(scores, pattern.shape)], round(amount * scores.numel()))
            pruned = expand_tiles(drop, pattern.shape, scores.shape).clone()
            total += count
        for i in range(i2 - i1):
            if pattern is not None and not pattern.is_block and i % pattern.second == 0:
                kept, every = pattern.first, pattern.second
                scores = torch.where(dead[None, i1 + i:i1 + i + every], -1.0,
                                     block[:, i:i + every] ** 2 / diagonal[None, i:i + every] ** 2)
                drop = torch.argsort(scores, dim=1, stable=True)[:, :every - kept]
                pruned[:, i:i + every] = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, drop, True)
                total += rows * (every - kept)
            column = block[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(column), column)
            quantised[:, i] = q
            error = (column - q) / inv[i, i]
            block[:, i:] -= error[:, None] @ inv[i, i:][None, :]
            errors[:, i] = error
        weight[:, i1:i2] = quantised
        keep[:, i1:i2] = ~pruned
        weight[:, i2:] -= errors @ inverse[i1:i2, i2:]
    return weight, keep, total


def _inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, H dampened by `dampening` of its mean diagonal (raised tenfold
    up to four times where H is too ill-conditioned to factor)."""
    eye = torch.eye(len(hessian), dtype=torch.float64)
    h = hessian.double()
    for attempt in range(5):
        damped = h + dampening * 10 ** attempt * torch.mean(torch.diag(h)) * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True).float()
    raise UsageError("sparsegpt: the calibration inputs' second moment cannot be factored even dampened 10^4 times "
                     "over; give more calibration samples (--calibration-samples) or real data")


PRUNERS.add("wanda", Wanda())
PRUNERS.add("sparsegpt", SparseGPT())
