"""Which runtime and precision runs each model fastest on this machine while keeping its quality.

For each model (resnet18, vae, mlp-sst2-trained, gpt2-tiny-trained: prompt, decode step and 64 greedy
tokens; espnet-st-small-trained: encoder, decoder step and greedy translation) the unpruned dense
artifact is exported once and benchmarked by the library (`bench_artifact`) under torch, onnxruntime
and openvino in every precision of f32 and bf16 each offers and this machine computes natively, at
batch 1 and 8 (the decoding pipelines decode one sequence: batch 1), one thread. Every configuration
of a shape is measured in the same interleaved rounds, so the ratios hold on a busy machine: each row's
speed is onnxruntime f32's p50 over its own (> 1: faster than onnxruntime f32).

Quality travels with speed: each row's parity error against the f32 PyTorch model, and, for the models
with an evaluator, its metric measured in its own runtime and precision beside f32's. A row keeps
quality when its outputs are right (f32: within the artifact's parity tolerance) and, in a reduced
precision, its metric moved less than the model's tolerance (QUALITY_TOLERANCE), or, for a model
without an evaluator, its outputs moved less than BF16_RELATIVE of their scale and its greedy tokens
are the f32 model's. The table names, per model, batch and stage, the fastest row that keeps quality.

Goal (issue 38): that pick beats onnxruntime f32 wherever this machine offers something faster.

Run: bash .ci/env python benchmarks/runtimes.py [--models a,b] [--json PATH] [--table-only]
Ratios come from one run on a shared machine; rows are written to the JSON file as each model finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from tabulate import tabulate

from deploykit.bench.runner import INPUT_SEED, FailureSink, bench_artifact
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.fsutil import write_text_atomic
from deploykit.export.build import export_artifact
from deploykit.model.artifact import read_manifest
from deploykit.pipelines.catalog import PIPELINES
from deploykit.prune.base import PruningPlan

ROOT = Path(__file__).resolve().parents[1]
#: model -> batch sizes (the decoding pipelines take one sequence at a time)
MODELS = {"resnet18": (1, 8), "vae": (1, 8), "mlp-sst2-trained": (1, 8), "gpt2-tiny-trained": (1,),
          "espnet-st-small-trained": (1,)}
RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
#: metric -> the largest loss that keeps quality (accuracy and BLEU in their units; perplexity relative)
QUALITY_TOLERANCE = {"accuracy": 0.005, "bleu": 0.5, "perplexity": 0.01}
#: a model without an evaluator keeps quality in a reduced precision where no output moved more than
#: this share of the largest reference output
BF16_RELATIVE = 0.02
TIMING = TimingSettings(warmup_s=0.2, min_time_s=0.4, min_iters=20, rounds=5)


def keeps_quality(row: dict, f32_metrics: dict[str, float], scale: float) -> tuple[bool, str]:
    """(whether `row` keeps the model's quality, the quality cell)."""
    if row["parity_tolerance"] is not None:  # f32: held to the artifact's tolerance
        ok = row["parity_max_abs_error"] <= row["parity_tolerance"]
        return ok, f"parity {row['parity_max_abs_error']:.1e}" + ("" if ok else " WRONG")
    if f32_metrics and row["metrics"]:
        cells, ok = [], True
        for name, value in row["metrics"].items():
            change = value - f32_metrics[name]
            loss = change / f32_metrics[name] if name == "perplexity" else -change
            ok &= loss <= QUALITY_TOLERANCE.get(name, 0.0)
            cells.append(f"{name} {value:.4f} ({change:+.4f})")
        return ok, ", ".join(cells) + f", parity {row['parity_max_abs_error']:.1e}"
    relative = row["parity_max_abs_error"] / scale if scale else float("inf")
    ok = relative <= BF16_RELATIVE
    return ok, f"parity {row['parity_max_abs_error']:.1e} ({100 * relative:.2f}% of scale)"


def measure(name: str, tmp: Path) -> list[dict]:
    directory = tmp / name
    export_artifact(name, PruningPlan("magnitude", 0.0), "dense", directory)
    grid = Grid(runtimes=RUNTIMES, batches=MODELS[name], threads=(1,), precisions=PRECISIONS)
    records = bench_artifact(directory, grid, TIMING, progress=lambda m: print(m, file=sys.stderr, flush=True),
                             failures=FailureSink())  # a wrong row is kept, marked, and the run goes on
    scales = {batch: output_scale(directory, batch) for batch in MODELS[name]}
    return [{"model": name, "output_scale": scales[r.batch_size], **r.to_dict()} for r in records]


def output_scale(directory: Path, batch: int) -> float:
    """The largest float output of the reference on the bench's inputs: what a parity error is relative to."""
    manifest = read_manifest(directory)
    pipeline = PIPELINES.get(manifest.pipeline)
    outputs = pipeline.reference(directory, ())(pipeline.inputs(directory, manifest, batch, INPUT_SEED, None))
    return max(float(np.max(np.abs(o))) for o in outputs if np.asarray(o).dtype.kind == "f")


def summarize(rows: list[dict]) -> list[list]:
    table = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch_size"], r["stage"]), []).append(r)
    for (model, batch, stage), group in groups.items():
        base = next((r for r in group if r["runtime"] == "onnxruntime" and r["precision"] == "f32"), None)
        if base is None:  # a stage of torch's alone (espnet's cached decoding): nothing to compare with here
            continue
        f32 = next((r for r in group if r["runtime"] == "torch" and r["precision"] == "f32"), base)
        picks = []
        for r in sorted(group, key=lambda r: r["latency_ms"]["p50"]):
            ok, quality = keeps_quality(r, f32["metrics"], r["output_scale"])
            ratio = base["latency_ms"]["p50"] / r["latency_ms"]["p50"]
            picks.append((ok, r))
            table.append([model, batch, stage, r["runtime"], r["precision"], f"{r['latency_ms']['p50']:.4f}",
                          f"{ratio:.2f}x", quality, ""])
        best = next((r for ok, r in picks if ok), None)
        if best is not None:
            for line in table[-len(group):]:
                if (line[3], line[4]) == (best["runtime"], best["precision"]):
                    line[-1] = "<- pick"
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/runtimes.json"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the rows in --json, measuring nothing")
    args = parser.parse_args()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = json.loads(out.read_text())["rows"] if args.table_only else []
    with tempfile.TemporaryDirectory(prefix="runtimes-") as tmp:
        for name in [] if args.table_only else args.models.split(","):
            print(f"{name}", file=sys.stderr, flush=True)
            rows += measure(name, Path(tmp))
            write_text_atomic(out, json.dumps({"rows": rows}, indent=1, default=_plain) + "\n")
    print(tabulate(summarize(rows), disable_numparse=True, headers=[
        "model", "batch", "stage", "runtime", "precision", "p50 ms", "vs onnxruntime f32", "quality", "pick"]))
    print(f"\nwrote {out}")
    return 0


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(main())
