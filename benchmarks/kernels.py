"""Sparse kernels: where does CSR beat dense? A crossover table for torch and onnxruntime.

For `mlp-sst2` and `linear-stack-4096`, each Linear (output layer excluded) is magnitude-pruned to
0.8/0.9/0.95/0.98 sparsity (per layer), then timed at batch 1 and 32 with deploykit's timing loop:
- torch dense: the stripped model;
- torch csr: every pruned Linear as `CSRLinear`;
- torch chosen: `--form csr` as exported, CSR only where a per-layer measurement says it wins;
- onnxruntime, dense initializers and sparse initializers (it densifies these at load, so the two
  should match: sparse ONNX shrinks the file, not the time).
Medians and ratios come from one run on this machine.

Run: bash .ci/env python benchmarks/kernels.py [--min-time S] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from deploykit.convert.onnx_export import export_onnx, sparsify_initializers
from deploykit.convert.sparse import choose_kernels, sparse_candidates, swap_to_csr, to_sparse_modules
from deploykit.core.env import available_cores
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.measure import measure
from deploykit.core.ort import ort_session
from deploykit.model.catalog import get_model
from deploykit.model.spec import TRACE_BATCH
from deploykit.prune.base import PruningPlan, prune_model, strip_masks

MODELS = ("mlp-sst2", "linear-stack-4096")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
BATCHES = (1, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default="benchmarks/results/kernels.json")
    args = parser.parse_args()
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)

    def timed(fn) -> float:
        return measure(fn, warmup_s=0.1, min_time_s=args.min_time, min_iters=20).median_ms

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            spec = get_model(name)
            for sparsity in SPARSITIES:
                print(f"{name} {sparsity:g}", file=sys.stderr)
                model = spec.make()
                trace = spec.example_inputs(TRACE_BATCH)
                prune_model(model, PruningPlan("magnitude", sparsity, scope="layer"), trace)
                strip_masks(model)
                dense_onnx, sparse_onnx = Path(tmp) / "dense.onnx", Path(tmp) / "sparse.onnx"
                export_onnx(model, trace, dense_onnx, input_names=spec.input_names, output_names=spec.outputs,
                            dynamic_axes=spec.dynamic_axes())
                export_onnx(model, trace, sparse_onnx, input_names=spec.input_names, output_names=spec.outputs,
                            dynamic_axes=spec.dynamic_axes())
                sparsify_initializers(sparse_onnx)
                all_csr, _ = swap_to_csr(copy.deepcopy(model), sparse_candidates(model, trace))
                for batch in BATCHES:
                    inputs = spec.example_inputs(batch, seed=2)
                    chosen_recipe = {"kernels": choose_kernels(model, inputs), "threads": threads, "kernel_batch": batch}
                    chosen, swapped = to_sparse_modules(copy.deepcopy(model), inputs, chosen_recipe)
                    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
                    with torch.inference_mode():
                        row = {
                            "model": name, "sparsity": sparsity, "batch": batch, "threads": threads,
                            "torch_dense_ms": timed(lambda: model(*inputs)),
                            "torch_csr_ms": timed(lambda: all_csr(*inputs)),
                            "torch_chosen_ms": timed(lambda: chosen(*inputs)),
                            "chosen_csr_layers": swapped,
                        }
                    for kind, path in (("ort_dense_ms", dense_onnx), ("ort_sparse_init_ms", sparse_onnx)):
                        session = ort_session(path, threads)
                        row[kind] = timed(lambda: session.run(None, feeds))
                    row["dense_onnx_bytes"], row["sparse_onnx_bytes"] = dense_onnx.stat().st_size, sparse_onnx.stat().st_size
                    rows.append(row)
    print(tabulate(
        [[r["model"], f"{r['sparsity']:g}", r["batch"], f"{r['torch_dense_ms']:.4f}", f"{r['torch_csr_ms']:.4f}",
          f"{r['torch_dense_ms'] / r['torch_csr_ms']:.2f}x", f"{r['torch_chosen_ms']:.4f}", len(r["chosen_csr_layers"]),
          f"{r['ort_dense_ms']:.4f}", f"{r['ort_sparse_init_ms']:.4f}",
          f"{r['sparse_onnx_bytes'] / r['dense_onnx_bytes']:.3f}x"] for r in rows],
        headers=["model", "sparsity", "batch", "torch dense ms", "torch csr ms", "csr speedup", "torch chosen ms",
                 "csr layers", "ort dense ms", "ort sparse-init ms", "onnx size"],
        disable_numparse=True,
    ))
    print("\ncrossover (lowest sparsity where torch csr beats dense):")
    for name in MODELS:
        for batch in BATCHES:
            wins = [r["sparsity"] for r in rows if r["model"] == name and r["batch"] == batch
                    and r["torch_csr_ms"] < r["torch_dense_ms"]]
            print(f"  {name} batch {batch}: {min(wins):g}" if wins else f"  {name} batch {batch}: none up to 0.98")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"threads": threads, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
