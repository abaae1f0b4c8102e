"""Structured pruning that pays: FLOP ratio vs measured speedup of dense-shrunk models.

For each model, structured L1 pruning (per layer, as the VAE study's NNI pruners did) at 0.2/0.5/0.8
is exported as `dense-shrunk` and measured under torch and onnxruntime beside the unpruned model, in
the same run, with the same timing loop `deploykit bench` uses. Speedups are ratios of medians taken
in one run. The target for resnet18 at batch 8: measured speedup >= 0.7 x the FLOP ratio.

Run: bash .ci/env python benchmarks/structured.py [--json PATH] [--min-time S]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from deploykit.bench.runner import bench_artifact
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.fsutil import write_text_atomic
from deploykit.export.build import export_artifact
from deploykit.prune.base import PruningPlan

MODELS = {"mlp-sst2": (1,), "vae": (1,), "resnet18": (1, 8)}
SPARSITIES = (0.0, 0.2, 0.5, 0.8)
MB = 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/structured.json")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per configuration")
    parser.add_argument("--threads", type=int, default=None, help="default: the cores available")
    args = parser.parse_args()

    from deploykit.core.env import available_cores

    timing = TimingSettings(min_time_s=args.min_time)
    threads = args.threads or available_cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, batches in MODELS.items():
            grid = Grid(runtimes=("torch", "onnxruntime"), batches=batches, threads=(threads,))
            baseline = {}
            for sparsity in SPARSITIES:
                plan = PruningPlan("l1-structured", sparsity, scope="layer")
                print(f"{model} l1-structured:{sparsity:g}", file=sys.stderr)
                result = export_artifact(model, plan, "dense-shrunk", Path(tmp) / f"{model}-{sparsity}")
                m = result.manifest
                for record in bench_artifact(result.directory, grid, timing):
                    key = (record.runtime, record.batch_size)
                    median = record.measurement.median_ms
                    baseline.setdefault(key, (median, m.flops))
                    base_median, base_flops = baseline[key]
                    flop_ratio = base_flops / m.flops
                    speedup = base_median / median
                    rows.append({
                        "model": model, "sparsity": sparsity, "runtime": record.runtime, "batch": record.batch_size,
                        "threads": record.threads, "parameters": m.parameters, "flops": m.flops,
                        "flop_ratio": flop_ratio, "median_ms": median, "speedup": speedup,
                        "speedup_over_flop_ratio": speedup / flop_ratio, "disk_bytes": m.files["weights.safetensors"],
                        "onnx_bytes": m.files["model.onnx"], "parity_max_abs_error": record.parity_max_abs_error,
                    })
    print(tabulate(
        [[r["model"], f"{r['sparsity']:g}", r["runtime"], r["batch"], f"{r['parameters']:,}", f"{r['flop_ratio']:.2f}x",
          f"{r['median_ms']:.4f}", f"{r['speedup']:.2f}x", f"{r['speedup_over_flop_ratio']:.2f}",
          f"{r['disk_bytes'] / MB:.3f}"] for r in rows],
        headers=["model", "sparsity", "runtime", "batch", "params", "FLOP ratio", "p50 ms", "speedup",
                 "speedup/FLOP ratio", "weights MB"],
        disable_numparse=True,
    ))
    target = [r for r in rows if r["model"] == "resnet18" and r["batch"] == 8 and r["sparsity"] > 0]
    for r in target:
        verdict = "meets" if r["speedup_over_flop_ratio"] >= 0.7 else "misses"
        print(f"resnet18 batch 8 {r['runtime']} at {r['sparsity']:g}: speedup {r['speedup']:.2f}x for a "
              f"{r['flop_ratio']:.2f}x FLOP cut ({verdict} the 0.7 target)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"threads": threads, "timing": vars(timing), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
