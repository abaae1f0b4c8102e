"""Iterative magnitude pruning with rewinding vs one-shot magnitude pruning, on LeNet-300-100 / digits.

Reproduces the SST-2 study's finding on a model trained here (the UCI handwritten digits (shipped with deploykit)): at high sparsity
one-shot magnitude pruning collapses while rewinding keeps accuracy. Three columns per sparsity:
- one-shot: global magnitude pruning of the trained model, no retraining (the study's baseline);
- one-shot + retrain: the same masks, then the training hook once more with masks in force;
- imp (rewind): `--rounds` prune-rewind-retrain rounds (deploykit's `imp` method).

The same on the SST-2 study's own model, trained here on generated text: --model mlp-sst2-trained.

Run: bash .ci/env python benchmarks/lottery.py [--model M] [--rounds 5] [--sparsities 0.5,0.9] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from deploykit.core.fsutil import write_text_atomic
from deploykit.model.catalog import get_model
from deploykit.model.spec import TRACE_BATCH
from deploykit.prune.base import PruningPlan, prune_model, strip_masks

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def accuracy(spec, plan: PruningPlan, retrain: bool = False) -> float:
    model = spec.make()
    prune_model(model, plan, spec.example_inputs(TRACE_BATCH), spec.output_layers, spec=spec)
    if retrain:
        spec.train(model)
    strip_masks(model)
    return spec.evaluate(model)["accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet-300-100")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES))
    parser.add_argument("--json", default="benchmarks/results/lottery.json")
    args = parser.parse_args()

    spec = get_model(args.model)
    dense = spec.evaluate(spec.make())["accuracy"]
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        print(f"sparsity {sparsity:g}", file=sys.stderr)
        rows.append({
            "sparsity": sparsity,
            "one_shot": accuracy(spec, PruningPlan("magnitude", sparsity)),
            "one_shot_retrain": accuracy(spec, PruningPlan("magnitude", sparsity), retrain=True),
            "imp_rewind": accuracy(spec, PruningPlan("imp", sparsity, rounds=args.rounds)),
        })
    print(f"{args.model}: dense accuracy {dense:.4f} (its evaluation's held-out split)")
    print(tabulate([[f"{r['sparsity']:g}", f"{r['one_shot']:.4f}", f"{r['one_shot_retrain']:.4f}", f"{r['imp_rewind']:.4f}"]
                    for r in rows],
                   headers=["sparsity", "one-shot", "one-shot + retrain", f"imp rewind ({args.rounds} rounds)"],
                   disable_numparse=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"model": args.model, "rounds": args.rounds, "dense_accuracy": dense,
                                             "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
