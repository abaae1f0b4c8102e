"""Random vs magnitude vs SNIP vs GraSP vs SynFlow at the AG News study's compressions, in one table.

For each model, method and compression c (keep 10^-c of the prunable weights) the plan is exported
as csr with `export_artifact`, exactly as `deploykit export --prune METHOD:cC --form csr` would, and
the table shows what remains: weights, FLOPs with pruned multiply-adds skipped (the study's
"remaining FLOPs"), bytes on disk (weights file + model.onnx), and accuracy where the model is trained.

- lenet-300-100 on the UCI handwritten digits (shipped with deploykit), the study's protocol: prune the initial weights, then train
  with the masks in force (`--at-init`); linear layers, output layer dense. Accuracy on the 360-image
  test split.
- textclf-agnews (random weights: AG News does not ship in a package, so no accuracy): its only
  Linear layer is the output layer, so "as the study pruned" (linear layers, output included) touches
  256 of 6.1 M weights; a second block also prunes the embedding, where the bytes are. SNIP and GraSP
  score on the model's generated batches (token ids and labels from its own vocabulary and classes).
- textclf-agnews-small-trained (vocabulary 8000, trained on generated four-topic text): the study's
  protocol with an accuracy to judge it by: prune at initialisation (embedding and linear layers,
  output included), train with the masks in force, accuracy on the held-out split.

Run: bash .ci/env python benchmarks/saliency.py [--json PATH] [--compressions 0.1,0.5,1,2] [--models M,...]
     [--methods random,grasp,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from deploykit.core.errors import UsageError
from deploykit.core.fsutil import write_text_atomic
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.prune.base import PruningPlan

METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
#: (model, selection label, PruningPlan options)
SETUPS = (
    ("lenet-300-100", "linear, at init + train", {"at_init": True, "layer_types": ("linear",)}),
    ("textclf-agnews", "linear (as the study), output included", {"exclude_output": False, "layer_types": ("linear",)}),
    ("textclf-agnews", "linear + embedding, output included",
     {"exclude_output": False, "layer_types": ("linear", "embedding")}),
    ("textclf-agnews-small-trained", "linear + embedding, at init + train, output included",
     {"at_init": True, "exclude_output": False, "layer_types": ("linear", "embedding")}),
)


def measure(model: str, method: str, compression: float | None, options: dict, directory: Path) -> dict:
    plan = PruningPlan(method, compression=compression, **options) if compression else PruningPlan(**options)
    manifest = export_artifact(model, plan, "csr", directory).manifest
    pruned = [row for row in manifest.sparsity if row["pruned"]]
    prunable = sum(row["numel"] for row in pruned) or 1
    return {
        "model": model, "method": method if compression else "dense", "compression": compression,
        "remaining_prunable": sum(row["nonzero"] for row in pruned) / prunable if pruned else 1.0,
        "remaining_parameters": manifest.nonzero_parameters / manifest.parameters,
        "remaining_flops": manifest.remaining_flops_fraction,
        "disk_bytes": sum(manifest.files.values()),
        "accuracy": manifest.metrics.get("accuracy"),
    }


def _table_row(r: dict) -> list[str]:
    head = [r["model"], r["selection"], r["method"], "-" if r["compression"] is None else f"{r['compression']:g}"]
    if "refused" in r:
        return head + ["refused: " + r["refused"].split(";")[0], "", "", "", ""]
    return head + [f"{100 * r['remaining_prunable']:.2f}", f"{100 * r['remaining_parameters']:.2f}",
                   f"{100 * r['remaining_flops']:.2f}", f"{r['disk_bytes'] / 1e6:.3f}",
                   "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressions", default="0.1,0.5,1,2")
    parser.add_argument("--models", help="only the setups of these models (comma-separated)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default="benchmarks/results/saliency.json")
    args = parser.parse_args()
    compressions = [float(c) for c in args.compressions.split(",")]
    methods = args.methods.split(",")
    setups = [s for s in SETUPS if not args.models or s[0] in args.models.split(",")]

    results = []
    with tempfile.TemporaryDirectory(prefix="deploykit-saliency-") as tmp:
        for i, (model, selection, options) in enumerate(setups):
            spec = get_model(model)
            base = {k: v for k, v in options.items() if k != "at_init"}
            runs = [("dense", None)] + [(method, c) for c in compressions for method in methods]
            for j, (method, c) in enumerate(runs):
                print(f"{model} [{selection}] {method} c={c}", file=sys.stderr, flush=True)
                try:
                    row = measure(spec.name, method, c, options if c else base, Path(tmp) / f"{i}-{j}")
                except UsageError as exc:  # a plan the exporter refuses (a layer pruned away): a row that says so
                    row = {"model": model, "method": method, "compression": c, "refused": str(exc)}
                results.append({**row, "selection": selection})

    table = [_table_row(r) for r in results]
    print(tabulate(table, headers=["model", "layers", "method", "c", "prunable kept %", "all params kept %",
                                   "FLOPs kept %", "disk MB", "accuracy"], disable_numparse=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"compressions": compressions, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
