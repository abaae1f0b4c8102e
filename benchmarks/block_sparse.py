"""Block sparsity on a CPU under torch: what the bsr form buys over the unpruned model, what its file costs
against dense and against the information floor, and what the blocks cost in quality.

For each model (linear-stack-4096: its two 4096 x 4096 layers; gpt2-mini-trained: its MLPs, the rule
'*.mlp.*'), each sparsity (0.7, 0.8, 0.9) and block (1x4, 4x4, 8x8, 16x16), the model is magnitude-pruned
in blocks (`--pattern RxC`, scope layer), converted to the bsr form as `deploykit export` does
(`measured_bsr`: each layer's kernel among BSR, CSR and dense, measured at the batch), and timed against
the unpruned model at batch 1 and 32 on one thread, the two alternating in 9 rounds
(`deploykit.convert.kernel_choice.time_rotation`): the speedup is the median of the per-round ratios, its
interval the distribution-free one of `Versus.speedup_ci95`. Sizes: the compact weights file bsr writes,
the unpruned model's dense file, and the floor (each pruned weight: its kept blocks' values at 32 bits
plus blocks x H(block density) bits for the block mask; other tensors at their dense size). Quality: the
spec's evaluator (gpt2-mini-trained: perplexity on held-out text) on the pruned model, beside the
unpruned model's.

Goals (issue 37): linear-stack-4096 at 0.9 with 8x8 blocks, batch 1: at least 3x dense; at 0.8 at least
2x; never slower than dense (a layer whose kernels do not win stays dense); the file within 1.1x of its
floor.

Run: bash .ci/env python benchmarks/block_sparse.py [--models a,b] [--json PATH]
Figures are ratios from one run on a shared machine; rows are written to the JSON file as they are measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from deploykit.bench.records import Versus
from deploykit.convert.kernel_choice import time_rotation
from deploykit.convert.sparse import measured_bsr, swap_kernels
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.storage import save_weights
from deploykit.model.sources import resolve_model
from deploykit.prune.base import PruningPlan, prune_model, strip_masks
from deploykit.prune.layerwise import as_matrix

ROOT = Path(__file__).resolve().parents[1]
#: model -> the rules that select what is pruned (None: every prunable layer but the output)
MODELS = {"linear-stack-4096": None, "gpt2-mini-trained": ("*.mlp.*",)}
SPARSITIES = (0.7, 0.8, 0.9)
BLOCKS = ("1x4", "4x4", "8x8", "16x16")
BATCHES = (1, 32)
ROUNDS = 9


def plan_for(model: str, sparsity: float, block: str) -> PruningPlan:
    rules = MODELS[model]
    if rules is None:
        return PruningPlan(method="magnitude", amount=sparsity, pattern=block, scope="layer")
    return PruningPlan(method="magnitude", amount=0.0, rules=tuple((r, sparsity) for r in rules), pattern=block,
                       scope="layer")


def floor_bytes(model: torch.nn.Module, pruned: set[str], block: tuple[int, int]) -> float:
    """The information floor of the model's tensors: pruned weights as kept blocks plus the block mask's
    entropy; the rest dense."""
    total = 0.0
    modules = dict(model.named_modules())
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():  # tied weights (GPT-2's embedding and head): stored once
            continue
        seen.add(tensor.data_ptr())
        if name not in pruned:
            total += tensor.numel() * tensor.element_size()
            continue
        matrix = as_matrix(modules[name.rpartition(".")[0]], tensor) != 0
        rows, cols = matrix.shape
        grid = torch.nn.functional.pad(matrix, (0, -cols % block[1], 0, -rows % block[0]))
        kept_blocks = grid.reshape(grid.shape[0] // block[0], block[0], -1, block[1]).any(dim=3).any(dim=1)
        p = float(kept_blocks.float().mean())
        entropy = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        total += int(kept_blocks.sum()) * block[0] * block[1] * 4 + kept_blocks.numel() * entropy / 8
    return total


def speedup(dense: torch.nn.Module, variant: torch.nn.Module, inputs) -> tuple[float, list[float], list[float]]:
    with torch.inference_mode():
        rounds = time_rotation({"dense": lambda: dense(*inputs), "variant": lambda: variant(*inputs)}, rounds=ROUNDS)
    ratios = [d.median_ms / v.median_ms for d, v in zip(rounds["dense"], rounds["variant"])]
    versus = Versus("", "none", "dense", 0.0, 0, round_ratios=tuple(ratios))
    return versus.speedup, list(versus.speedup_ci95()), [r.median_ms for r in rounds["dense"]]


def measure(name: str, spec, unpruned: torch.nn.Module, sparsity: float, block: str, tmp: Path, reference: dict) -> list[dict]:
    plan = plan_for(name, sparsity, block)
    model = copy.deepcopy(unpruned)
    result = prune_model(model, plan, spec.example_inputs(1, seed=0), spec=spec)
    strip_masks(model)
    pruned = set(result.pruned_parameters)
    save_weights(model.state_dict(), tmp / "bsr.safetensors", "compact")
    floor = floor_bytes(model, pruned, plan.pattern_for(next(iter(pruned)).rpartition(".")[0]).shape)
    metrics = spec.evaluate(model) if spec.evaluate is not None else {}
    rows = []
    for batch in BATCHES:
        inputs = spec.example_inputs(batch, seed=1)
        recipe, summary = measured_bsr(model, spec, inputs, {"kernel_batch": batch})
        variant, _ = swap_kernels(copy.deepcopy(model), {n: d for n, d in recipe["kernels"].items()
                                                         if d["choice"] != "dense"})
        ratio, interval, dense_ms = speedup(unpruned, variant, inputs)
        rows.append({"model": name, "sparsity": sparsity, "block": block, "batch": batch, "threads": 1,
                     "speedup": ratio, "ci95": interval, "dense_round_ms": dense_ms,
                     "kernels": {n: d["choice"] + (f" {d['block']}x{d['block']}" if d["choice"] == "bsr" else "")
                                 for n, d in recipe["kernels"].items()},
                     "file_bytes": (tmp / "bsr.safetensors").stat().st_size, "dense_bytes": reference["dense_bytes"],
                     "floor_bytes": floor, "metrics": metrics, "unpruned_metrics": reference["metrics"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/block_sparse.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="block-sparse-") as tmp:
        for name in args.models.split(","):
            spec = resolve_model(name)
            unpruned = spec.make()
            save_weights(unpruned.state_dict(), Path(tmp) / "dense.safetensors", "dense")
            reference = {"dense_bytes": (Path(tmp) / "dense.safetensors").stat().st_size,
                         "metrics": spec.evaluate(unpruned) if spec.evaluate is not None else {}}
            for sparsity in SPARSITIES:
                for block in BLOCKS:
                    print(f"{name}: magnitude:{sparsity},{block}", file=sys.stderr, flush=True)
                    rows += measure(name, spec, unpruned, sparsity, block, Path(tmp), reference)
                    write_text_atomic(out, json.dumps({"rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return 0


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        # every layer dense: the variant runs the unpruned model's kernels, and its ratio is the noise floor
        kernels = sorted(set(r["kernels"].values())) if set(r["kernels"].values()) != {"dense"} else [
            "all dense (unpruned kernels: the ratio is noise)"]
        quality = ", ".join(f"{k} {v:.4g} ({v - r['unpruned_metrics'][k]:+.3g})" for k, v in r["metrics"].items())
        lines.append([r["model"], r["sparsity"], r["block"], r["batch"],
                      f"{r['speedup']:.2f}x [{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}]", ", ".join(kernels),
                      f"{r['file_bytes'] / r['dense_bytes']:.3f}", f"{r['file_bytes'] / r['floor_bytes']:.3f}", quality])
    return tabulate(lines, headers=["model", "sparsity", "block", "batch", "speedup vs unpruned (torch, 1 thread)",
                                    "kernels", "file/dense", "file/floor", "quality (change vs unpruned)"])


if __name__ == "__main__":
    sys.exit(main())
