"""int8 post-training quantization, alone and with structured pruning: size, memory, latency, quality.

GPT-2 study setting: GPT-2 small, float vs dynamic int8, and row-L2 structured pruning (attention
heads and MLP channels, 0.5 per layer, dense-shrunk) with and without int8. Per variant: the ONNX
file onnxruntime loads, peak resident memory of each runtime's fresh process (and onnxruntime's peak
over the process's memory once the runtime is imported, before the model loads: the model's share, which
the runtime's own code does not dilute), the latency of one
cached decoding step and of 64 new tokens, and the share of greedy tokens that match the float
model's. The study saw 2.5 -> 1.7 GB of memory and 120 -> 80 ms per step.

LeNet-300-100 on digits: float vs int8 (per tensor, per channel) vs static int8 calibrated on
digits: file size, latency at batch 1 and accuracy per runtime.

Everything is exported and measured as `deploykit export --quantize` and `deploykit bench DIR` do
it; medians and ratios come from one run on this machine.

The trained GPT-2s (`gpt2-tiny-trained`, `gpt2-mini-trained`) take the GPT-2 table with perplexity on
held-out text per runtime, weight-only int8 and int4 (onnxruntime's MatMulNBits) beside dynamic int8,
and greedy agreement over prompts of held-out text: free-running (64 tokens each model chose itself) and
token by token (each model's choice after the float model's prefix).

Run: bash .ci/env python benchmarks/quantization.py [--models gpt2-small,lenet-300-100] [--json PATH]
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
from deploykit.core.env import available_cores
from deploykit.core.fsutil import write_text_atomic
from deploykit.export.build import export_artifact
from deploykit.prune.base import PruningPlan

MB = 1e6
ROWS = PruningPlan("l2-structured", 0.5, scope="layer")
#: model -> variant -> (plan, form, export options)
VARIANTS = {
    "gpt2": {
        "float": (PruningPlan(), "dense", {}),
        "int8": (PruningPlan(), "dense", {"quantize": "int8"}),
        "int8 per channel": (PruningPlan(), "dense", {"quantize": "int8", "per_channel": True}),
        "int8 weight-only": (PruningPlan(), "dense", {"quantize": "int8-weight"}),
        "int8 weight-only, all nodes": (PruningPlan(), "dense", {"quantize": "int8-weight",
                                                                 "quantize_operators": "all"}),
        "int4 weight-only": (PruningPlan(), "dense", {"quantize": "int4-weight"}),
        "rows 0.5": (ROWS, "dense-shrunk", {}),
        "rows 0.5 + int8": (ROWS, "dense-shrunk", {"quantize": "int8"}),
    },
    "lenet-300-100": {
        "float": (PruningPlan(), "dense", {}),
        "int8": (PruningPlan(), "dense", {"quantize": "int8"}),
        "int8 per channel": (PruningPlan(), "dense", {"quantize": "int8", "per_channel": True}),
        "int8 static": (PruningPlan(), "dense", {"quantize": "int8-static"}),
    },
}


def _perplexity(manifest, runtime: str) -> str:
    q = manifest.quantization
    value = q["metrics"].get(runtime, {}).get("perplexity") if q.get("metrics") else manifest.metrics.get("perplexity")
    return "-" if value is None else f"{value:.2f}"


def _gpt2_row(label, manifest, records):
    by = {(r.runtime, r.stage): r for r in records}
    q = manifest.quantization
    agreement = q.get("greedy_token_agreement", {}).get("onnxruntime")
    forced = q.get("next_token_agreement", {}).get("onnxruntime")
    graphs = sum(size for name, size in manifest.files.items() if name.endswith((".onnx", ".weights")))
    ort = by['onnxruntime', 'decode-step']
    return [label, f"{graphs / MB:.2f}", f"{ort.peak_rss_bytes / MB:.0f}",
            f"{(ort.peak_rss_bytes - ort.baseline_rss_bytes) / MB:.0f}", f"{by['torch', 'decode-step'].peak_rss_bytes / MB:.0f}",
            f"{by['onnxruntime', 'decode-step'].measurement.median_ms:.2f}",
            f"{by['torch', 'decode-step'].measurement.median_ms:.2f}",
            f"{by['onnxruntime', 'generate'].measurement.median_ms:.0f}",
            f"{by['torch', 'generate'].measurement.median_ms:.0f}",
            "-" if agreement is None else f"{100 * agreement:.1f}%",
            "-" if forced is None else f"{100 * forced:.1f}%",
            _perplexity(manifest, "onnxruntime"), _perplexity(manifest, "torch")]


GPT2_HEADERS = ["variant", "graphs MB", "ort peak MB", "ort peak over start MB", "torch peak MB", "ort step ms", "torch step ms",
                "ort 64 tokens ms", "torch 64 tokens ms", "ort greedy = float", "ort next token = float", "ort ppl",
                "torch ppl"]


def _lenet_row(label, manifest, records):
    by = {r.runtime: r for r in records}
    q = manifest.quantization
    accuracy = {rt: q["metrics"][rt]["accuracy"] for rt in ("onnxruntime", "torch")} if q else \
        {rt: manifest.metrics["accuracy"] for rt in ("onnxruntime", "torch")}
    return [label, f"{manifest.files['model.onnx'] / MB:.3f}", f"{by['onnxruntime'].measurement.median_ms:.4f}",
            f"{by['torch'].measurement.median_ms:.4f}", f"{accuracy['onnxruntime']:.4f}", f"{accuracy['torch']:.4f}",
            f"{q['error']['onnxruntime']['max_abs']:.2e}" if q else "-"]


LENET_HEADERS = ["variant", "onnx MB", "ort p50 ms", "torch p50 ms", "ort accuracy", "torch accuracy",
                 "ort max abs error"]
TABLES = {"gpt2": (_gpt2_row, GPT2_HEADERS), "lenet-300-100": (_lenet_row, LENET_HEADERS)}


def family(model: str) -> str:
    """The variant table a model takes: every GPT-2 (gpt2-small, the trained gpt2-tiny/-mini) the GPT-2 one."""
    return "gpt2" if model.startswith("gpt2") else model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small,lenet-300-100")
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--json", default="benchmarks/results/quantization.json")
    args = parser.parse_args()
    grid = Grid(runtimes=("torch", "onnxruntime"), threads=(available_cores(),))
    timing = TimingSettings(warmup_s=0.2, min_time_s=args.min_time, min_iters=5)
    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for model in args.models.split(","):
        row_of, headers = TABLES[family(model)]
        table = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (label, (plan, form, options)) in enumerate(VARIANTS[family(model)].items()):
                progress(f"{model} {label}: export")
                result = export_artifact(model, plan, form, Path(tmp) / f"v{i}", progress=progress, **options)
                records = bench_artifact(result.directory, grid, timing, progress)
                table.append(row_of(label, result.manifest, records))
                results.append({"model": model, "variant": label, "quantization": result.manifest.quantization,
                                "files": result.manifest.files, "records": [r.to_dict() for r in records]})
        print(f"\n{model}\n" + tabulate(table, headers=headers, disable_numparse=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
