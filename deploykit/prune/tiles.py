"""Weights chosen by a sparsity pattern (`deploykit.prune.patterns`): N:M groups and blocks.

Every pruner that takes a pattern (magnitude, random, wanda, sparsegpt) scores weights its own way and
hands the scores here, as the (out, in) matrix of the layer's view (`deploykit.prune.layerwise`):

- **N:M**: in each part of the view, the lowest M - N scores of every M consecutive along a row (a
  Conv's input channels at one kernel position, where NVIDIA's sparse convolutions take them).
- **Blocks RxC**: each part of the view (a packed q/k/v projection has three, a grouped Conv one per
  group) is cut into a grid of R x C tiles from its first row and column. A tile's score is the L2 norm
  of its scores, taken per weight (the root mean square) so that a partial tile on the grid's edge
  competes fairly. Tiles go lowest first until the weights they hold come nearest the count asked,
  so a layer the block does not divide is still pruned to its sparsity (its edge tiles are smaller:
  documented in docs/plans.md; the bsr form then runs it as CSR or dense). A layer smaller than the
  block in either direction is left unpruned, with the reason (`pattern_exclusions`).

Blocks never split an attention head: on a projection that produces heads (or an output projection
that reads them), the block's side along the heads must divide the head size, else the plan is refused;
and embeddings take no pattern (a block of token rows is not a kernel's block).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from deploykit.core.errors import UsageError
from deploykit.core.hooks import class_path
from deploykit.prune.blocks import handler_for
from deploykit.prune.layerwise import CONV1D_PATH, WeightView, weight_views
from deploykit.prune.patterns import Pattern


def nm_keep(scores: torch.Tensor, pattern: Pattern, order: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Keep-mask of an N:M pattern on one part's scores (the lowest M - N of every M consecutive in a row,
    in `order` where given), and how many it drops."""
    rows, width = scores.shape
    kept, every = pattern.first, pattern.second
    ordered = scores[:, order] if order is not None else scores
    groups = ordered.reshape(rows, width // every, every)
    drop = torch.argsort(groups, dim=2, stable=True)[:, :, :every - kept]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False).reshape(rows, width)
    if order is not None:
        keep = keep[:, torch.argsort(order)]
    return keep, rows * (width // every) * (every - kept)


def tile_grid(scores: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(root mean square of each tile's scores, weights each tile holds) on the grid of `block` tiles
    over a (rows, columns) matrix, edge tiles partial."""
    rows, cols = block
    pad = (0, -scores.shape[1] % cols, 0, -scores.shape[0] % rows)
    grid = (math.ceil(scores.shape[0] / rows), rows, math.ceil(scores.shape[1] / cols), cols)
    squares = F.pad(scores.double() ** 2, pad).reshape(grid).sum(dim=(1, 3))
    counts = F.pad(torch.ones_like(scores, dtype=torch.float64), pad).reshape(grid).sum(dim=(1, 3))
    return (squares / counts).sqrt(), counts.long()


def expand_tiles(tiles: torch.Tensor, block: tuple[int, int], shape: Sequence[int]) -> torch.Tensor:
    """A per-tile mask as a per-weight mask of `shape`."""
    return tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:shape[0], :shape[1]]


def lowest_tiles(grids: Sequence[tuple[torch.Tensor, torch.Tensor]], target: int) -> tuple[list[torch.Tensor], int]:
    """Drop-masks over several tile grids ((scores, counts) each) taking the lowest-scoring tiles, all grids
    ranked together, until the weights they hold come nearest `target`; and how many weights that is."""
    scores = torch.cat([s.reshape(-1) for s, _ in grids])
    counts = torch.cat([c.reshape(-1) for _, c in grids])
    order = torch.argsort(scores, stable=True)
    held = torch.cumsum(counts[order], 0)
    taken = int(torch.searchsorted(held, torch.tensor(target, dtype=held.dtype)))
    if taken < len(held) and (taken == 0 or abs(int(held[taken]) - target) < abs(target - int(held[taken - 1]))):
        taken += 1  # the tile that crosses the target brings the count nearer to it than stopping short
    drop = torch.zeros(len(scores), dtype=torch.bool)
    drop[order[:taken]] = True
    masks, start = [], 0
    for tile_scores, _ in grids:
        masks.append(drop[start:start + tile_scores.numel()].reshape(tile_scores.shape))
        start += tile_scores.numel()
    return masks, int(held[taken - 1]) if taken else 0


def block_keep(views_scores: Sequence[tuple[WeightView, torch.Tensor]], block: tuple[int, int],
               amount: float) -> tuple[list[torch.Tensor], int]:
    """Keep-masks ((out, in) each) of the views, blocks removed lowest first across all of them until
    `amount` of their weights; and how many weights go."""
    grids, where = [], []
    for index, (view, scores) in enumerate(views_scores):
        for r0, r1, c0, c1 in view.parts:
            grids.append(tile_grid(scores[r0:r1, c0:c1], block))
            where.append((index, r0, r1, c0, c1))
    total = sum(int(scores.numel()) for _, scores in views_scores)
    drops, count = lowest_tiles(grids, round(amount * total))
    keeps = [torch.ones_like(scores, dtype=torch.bool) for _, scores in views_scores]
    for drop, (index, r0, r1, c0, c1) in zip(drops, where):
        keeps[index][r0:r1, c0:c1] = ~expand_tiles(drop, block, (r1 - r0, c1 - c0))
    return keeps, count


def pattern_keep(view: WeightView, scores: torch.Tensor, amount: float, pattern: Pattern) -> tuple[torch.Tensor, int]:
    """One view's keep-mask under `pattern` (N:M per part; blocks across its parts) and how many weights go."""
    if pattern.is_block:
        keeps, count = block_keep([(view, scores)], pattern.shape, amount)
        return keeps[0], count
    keep, total = torch.ones_like(scores, dtype=torch.bool), 0
    for r0, r1, c0, c1 in view.parts:
        keep[r0:r1, c0:c1], count = nm_keep(scores[r0:r1, c0:c1], pattern, view.channel_order())
        total += count
    return keep, total


def check_nm(view: WeightView, pattern: Pattern) -> None:
    """An N:M pattern must divide each part's inputs (a Conv's input channels per group)."""
    every = pattern.second
    for _, _, c0, c1 in view.parts:
        width = c1 - c0
        unit = width // int(torch.tensor(view.module.kernel_size).prod()) if view.kind == "conv" else width
        if unit % every:
            what = "input channels per group" if view.kind == "conv" else "inputs"
            raise UsageError(f"pattern {pattern.text} takes groups of {every} along each layer's input; {view.name} has "
                             f"{unit} {what}, not a multiple of {every}: --exclude it, or give a pattern whose M "
                             "divides it")


def too_small(view: WeightView, block: tuple[int, int]) -> str | None:
    """Why a block does not fit a view (a part smaller than the block either way), or None."""
    for r0, r1, c0, c1 in view.parts:
        if r1 - r0 < block[0] or c1 - c0 < block[1]:
            return (f"the block {block[0]}x{block[1]} is larger than its {r1 - r0}x{c1 - c0} weight"
                    + (" part" if len(view.parts) > 1 else ""))
    return None


def head_sides(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Layers whose weight rows produce attention heads, or whose columns read them: module name ->
    (axis of its (out, in) matrix: 0 rows, 1 columns; the head size). From the block handlers that know
    the model's attention modules (`deploykit.prune.blocks`)."""
    found: dict[str, tuple[int, int]] = {}
    for block_name, block in model.named_modules():
        handler = handler_for(block)
        if handler is None or handler.unit != "heads" or handler.unit_width(block) <= 1:
            continue
        width = handler.unit_width(block)
        for piece in handler.slices(block_name, block):
            if piece.param.endswith("weight"):
                transposed = class_path(type(piece.module)) == CONV1D_PATH  # Conv1D stores (in, out)
                axis = 1 - piece.dim if transposed else piece.dim
                key = piece.module_name if piece.module is not block else f"{piece.module_name}.{piece.param}"
                found[key] = (axis, width)
        readers = [reader.module_name for reader in handler.readers(block_name, block)]
        if isinstance(block, nn.MultiheadAttention):  # it reads its out_proj's weight itself
            readers.append(f"{block_name}.out_proj")
        for name in readers:
            found[name] = (1, width)
    return found


def pattern_exclusions(model: nn.Module, plan, weights: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Check a plan's patterns against the weights it prunes ((module name, parameter) each): the layers a
    block is too large for, with why (left unpruned); a pattern on an embedding, an N:M group that does
    not divide a layer, a block splitting attention heads, or a block that fits no layer are `UsageError`s."""
    heads = head_sides(model)
    reasons: dict[str, str] = {}
    patterned = fitted = 0
    for module_name, param in weights:
        pattern = plan.pattern_for(module_name)
        if pattern is None:
            continue
        patterned += 1
        module = model.get_submodule(module_name)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise UsageError(f"pattern {pattern.text} on the embedding {module_name}: an embedding's rows are tokens, "
                             "not a kernel's blocks; prune embeddings without a pattern, or leave them out "
                             "(--layer-types linear,conv)")
        view = weight_views(model, [(module_name, param)])[0]
        implied, amount = pattern.implied_sparsity, plan.amount_for(module_name)
        if implied is not None and abs(amount - implied) > 1e-9:
            raise UsageError(f"pattern {pattern.text} keeps {pattern.first} of every {pattern.second} weights of "
                             f"{module_name}, a sparsity of {implied:g}; the plan gives it {amount:g}: add a rule "
                             f"'{module_name}={implied:g}'")
        if not pattern.is_block:
            check_nm(view, pattern)
        elif (why := too_small(view, pattern.shape)) is not None:
            reasons[module_name] = why
            continue
        else:
            check_heads(view.name, module_name, pattern.shape, heads)
        fitted += 1
    if patterned and not fitted:
        first = next(iter(reasons.values()))
        raise UsageError(f"the block fits none of the {patterned} layers the plan prunes ({first}, ...): give a "
                         "smaller block")
    return reasons


def check_heads(view_name: str, module_name: str, block: tuple[int, int], heads: dict[str, tuple[int, int]]) -> None:
    """Refuse a block that would span two attention heads of `module_name` (its side along the heads must
    divide the head size)."""
    side = heads.get(module_name) or heads.get(view_name)
    if side is None:
        return
    axis, width = side
    if width % block[axis]:
        along = "outputs (rows)" if axis == 0 else "inputs (columns)"
        raise UsageError(f"the block {block[0]}x{block[1]} would split attention heads of {module_name}: its "
                         f"{along} are heads of {width}, and a block side of {block[axis]} does not divide {width}; give "
                         f"a block whose side divides {width}, or --exclude {module_name}")
