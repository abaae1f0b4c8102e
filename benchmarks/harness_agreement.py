"""Does deploykit's timing agree with reference harnesses? Its p50 against
`torch.utils.benchmark.Timer.blocked_autorange`'s median (torch) and against a plain `session.run`
loop timed with `perf_counter_ns` (onnxruntime), on three models, one thread, batch 1.

Each model is exported dense; `deploykit bench` measures it (a fresh worker per configuration), and
the reference harnesses time the same artifact in this process: torch on the stripped model the
artifact reloads, onnxruntime on its model.onnx with the session options deploykit uses. Goal: the
two agree within 10%. Ratios from one run on this machine.

Run: bash .ci/env python benchmarks/harness_agreement.py [--models a,b,c] [--json PATH]
"""

from __future__ import annotations

import os

# The reference harnesses run in this process under the conditions deploykit's worker has: one
# OpenMP thread from the start (set before torch is imported; a pool started wider keeps its threads).
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.benchmark import Timer

from deploykit.core.fsutil import write_text_atomic
from deploykit.core.ort import ort_session
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.prune.base import PruningPlan
from deploykit.runtime.loading import load_torch_model

MODELS = ("mlp-sst2", "vae", "resnet18")


def ort_loop_median_ms(session, feeds: dict, min_time_s: float) -> float:
    for _ in range(10):  # warm-up
        session.run(None, feeds)
    samples, start = [], time.perf_counter_ns()
    while time.perf_counter_ns() - start < min_time_s * 1e9 or len(samples) < 20:
        t0 = time.perf_counter_ns()
        session.run(None, feeds)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--json", default="benchmarks/results/harness_agreement.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            directory = Path(tmp) / name
            export_artifact(name, PruningPlan(), "dense", directory)
            bench = subprocess.run(
                [sys.executable, "-m", "deploykit", "bench", str(directory), "--threads", "1", "--min-time",
                 str(args.min_time), "--no-store", "--json", "-q"], capture_output=True, text=True, check=True)
            ours = {r["runtime"]: r["latency_ms"]["p50"] for r in json.loads(bench.stdout)["records"]}
            spec = get_model(name)
            inputs = spec.example_inputs(1, seed=2)
            model, _ = load_torch_model(directory, for_runtime=False)
            with torch.inference_mode():
                timer = Timer("model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=1)
                torch_ms = timer.blocked_autorange(min_run_time=args.min_time).median * 1e3
            session = ort_session(directory / "model.onnx", threads=1)
            feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
            ort_ms = ort_loop_median_ms(session, feeds, args.min_time)
            rows.append({"model": name, "deploykit_torch_ms": ours["torch"], "timer_ms": torch_ms,
                         "deploykit_ort_ms": ours["onnxruntime"], "ort_loop_ms": ort_ms})
            print(f"{name}: torch {ours['torch']:.4f} vs {torch_ms:.4f}; ort {ours['onnxruntime']:.4f} vs {ort_ms:.4f}",
                  file=sys.stderr, flush=True)
    print(tabulate(
        [[r["model"], f"{r['deploykit_torch_ms']:.4f}", f"{r['timer_ms']:.4f}",
          f"{r['deploykit_torch_ms'] / r['timer_ms']:.3f}", f"{r['deploykit_ort_ms']:.4f}", f"{r['ort_loop_ms']:.4f}",
          f"{r['deploykit_ort_ms'] / r['ort_loop_ms']:.3f}"] for r in rows],
        headers=["model", "deploykit torch p50 ms", "Timer.blocked_autorange ms", "ratio", "deploykit ort p50 ms",
                 "session.run loop ms", "ratio"], disable_numparse=True))
    ratios = [r["deploykit_torch_ms"] / r["timer_ms"] for r in rows] + [r["deploykit_ort_ms"] / r["ort_loop_ms"]
                                                                      for r in rows]
    print(f"\nagreement: ratios {min(ratios):.3f}-{max(ratios):.3f} (goal 0.90-1.10)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"threads": 1, "rows": rows}, indent=2) + "\n")
    return 0 if all(0.9 <= r <= 1.1 for r in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
