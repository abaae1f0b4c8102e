"""Disk size of the pruned SST-2 MLP, dense vs deploykit's compact ("csr") storage vs the study's COO.

Reproduces the SST-2 study's size table (one global magnitude round per sparsity; the study pruned
every weight matrix, the output layer included, so this script does too unless --exclude-output),
then shows what deploykit's storage does instead. Every size is a file written and measured:

- dense:  weights.safetensors as `deploykit export --form dense` writes it
- csr:    weights.safetensors as `--form csr` writes it (per tensor the smallest of dense, CSR with
          the narrowest index dtypes, bitmask + values)
- coo:    the study's method, `torch.save` of the state with every tensor `.to_sparse()` (int64 COO)
- csr+lzma: the same, each stored tensor lzma-compressed where that shrinks it (`--compress lzma`)
- floor:  the information floor, 32 bits per kept weight plus n * H(density) bits for the mask

For a model with an evaluation (`mlp-sst2-trained`: trained here on generated two-class text) the
table adds the pruned model's accuracy, and (with --latency) torch's latency at batch 1 on one thread:
the dense stripped model (zeros multiplied, the study's measurement) against the model exported as
csr, with the kernels deploykit chose per layer; medians of interleaved rounds, and their ratio.

Run: bash .ci/env python benchmarks/size_table.py [--model mlp-sst2-trained] [--latency] [--json PATH]
Exits 1 if the csr file is ever larger than the dense one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from deploykit.convert.kernel_choice import time_interleaved
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.sparsity import sparsity_table
from deploykit.core.storage import save_weights
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.prune.base import PruningPlan, prune_model, strip_masks
from deploykit.runtime.loading import load_torch_model

SPARSITIES = (0.0, 0.33, 0.55, 0.70, 0.80, 0.90, 0.95, 0.98)
MB = 1e6


def information_floor_bytes(numel: int, nonzero: int, bits_per_value: int = 32) -> float:
    density = nonzero / numel
    entropy = 0.0 if density in (0.0, 1.0) else -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
    return (nonzero * bits_per_value + numel * entropy) / 8


def latency(spec, model, plan: PruningPlan, tmp: Path) -> dict:
    """torch at batch 1, one thread: the dense stripped model against its csr export (interleaved)."""
    torch.set_num_threads(1)
    loaded, _ = load_torch_model(export_artifact(spec, plan, "csr", tmp / "csr", overwrite=True).directory)
    x = spec.example_inputs(1, seed=3)
    with torch.no_grad():
        timings = time_interleaved(lambda: model(*x), lambda: loaded(*x), rounds=7)
    dense = statistics.median(r.median_ms for r in timings.dense)
    csr = statistics.median(r.median_ms for r in timings.csr)
    return {"dense_ms": dense, "csr_ms": csr, "csr_over_dense_time": csr / dense}


def measure(model_name: str, sparsity: float, exclude_output: bool, tmp: Path, timed: bool) -> dict:
    spec = get_model(model_name)
    model = spec.make()
    plan = PruningPlan("magnitude", sparsity, exclude_output=exclude_output)
    result = prune_model(model, plan, spec.example_inputs(2), spec.output_layers)
    strip_masks(model)
    extra = dict(spec.evaluate(model)) if spec.evaluate is not None else {}
    if timed:
        extra.update(latency(spec, model, plan, tmp))
    table = sparsity_table(model, result.pruned_parameters)
    state = model.state_dict()
    sizes = {}
    for encoding, name, codec in (("dense", "dense", None), ("compact", "csr", None), ("compact", "csr_lzma", "lzma")):
        path = tmp / f"{name}.safetensors"
        save_weights(state, path, encoding, codec)
        sizes[name] = path.stat().st_size
    coo_path = tmp / "coo.pt"
    torch.save({k: v.to_sparse() for k, v in state.items()}, coo_path)
    sizes["coo"] = coo_path.stat().st_size
    floor = sum(information_floor_bytes(r.numel, r.nonzero) for r in table.rows)
    return {
        "sparsity": sparsity,
        "overall_sparsity": table.overall,
        "parameters": table.parameters,
        "nonzero": table.nonzero,
        "dense_bytes": sizes["dense"],
        "csr_bytes": sizes["csr"],
        "csr_lzma_bytes": sizes["csr_lzma"],
        "coo_bytes": sizes["coo"],
        "floor_bytes": floor,
        "csr_over_dense": sizes["csr"] / sizes["dense"],
        "coo_over_dense": sizes["coo"] / sizes["dense"],
        "csr_over_floor": sizes["csr"] / floor,
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp-sst2")
    parser.add_argument("--exclude-output", action="store_true", help="leave the output layer dense (deploykit's default)")
    parser.add_argument("--latency", action="store_true", help="time dense vs csr under torch (batch 1, 1 thread)")
    parser.add_argument("--json", default="benchmarks/results/size_table.json", help="where to write the rows as JSON")
    args = parser.parse_args()

    from tabulate import tabulate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in SPARSITIES:
            rows.append(measure(args.model, sparsity, args.exclude_output, Path(tmp), args.latency))
            print(f"measured sparsity {sparsity:g}", file=sys.stderr)
    quality = [k for k in ("accuracy",) if k in rows[0]]
    timed = ["dense_ms", "csr_ms", "csr_over_dense_time"] if args.latency else []
    print(tabulate(
        [[f"{r['sparsity']:.2f}", f"{100 * r['overall_sparsity']:.2f}%", f"{r['dense_bytes'] / MB:.3f}",
          f"{r['csr_bytes'] / MB:.3f}", f"{r['csr_over_dense']:.3f}x", f"{r['csr_lzma_bytes'] / MB:.3f}",
          f"{r['coo_bytes'] / MB:.3f}",
          f"{r['coo_over_dense']:.2f}x", f"{r['floor_bytes'] / MB:.3f}", f"{r['csr_over_floor']:.3f}x",
          *[f"{r[k]:.4f}" for k in quality + timed]] for r in rows],
        headers=["sparsity", "overall", "dense MB", "csr MB", "csr/dense", "csr+lzma MB", "study COO MB",
                 "COO/dense", "floor MB", "csr/floor", *quality,
                 *(["torch dense ms", "torch csr ms", "csr/dense time"] if timed else [])],
        disable_numparse=True, colalign=("right",) * (10 + len(quality) + len(timed)),
    ))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"model": args.model, "exclude_output": args.exclude_output, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    larger = [r["sparsity"] for r in rows if r["csr_bytes"] > r["dense_bytes"]]
    if larger:
        print(f"FAIL: csr file larger than dense at sparsity {larger}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
