"""Is csr's kernel choice robust? csr-under-torch latency over dense-under-torch latency, with the
choice made on a quiet machine and with a stress process busy on one core during the choice.

For every zoo model with Linear layers, each Linear but the output is magnitude-pruned per layer to
0.5 / 0.9 / 0.98; the csr form chooses its kernels (`deploykit.convert.kernel_choice`) at batch 1 and 32 and
one thread, once quietly and once while `stress` spins a core. Then, quietly, the stripped dense model
and each choice are timed at that batch in interleaved rounds (median of round medians). Goal: csr
never more than 10% slower than dense in any cell; where CSR was chosen, faster. A second dense copy
gives the noise floor: the same model at another place in memory. Figures are ratios from one run on
this machine.

Run: bash .ci/env python benchmarks/csr_choice.py [--models a,b] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from deploykit.convert.forms import FORMS
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.hooks import run_forward
from deploykit.core.measure import measure
from deploykit.model.catalog import get_model
from deploykit.model.spec import TRACE_BATCH
from deploykit.prune.base import PruningPlan, prune_model, strip_masks

MODELS = ("mlp-sst2", "linear-stack-4096", "textclf-agnews", "seq2seq-transformer", "gpt2-tiny", "espnet-st-small")
SPARSITIES = (0.5, 0.9, 0.98)
BATCHES = (1, 32)
ROUNDS = 6
STRESS = "while True: pass"


def interleaved_ms(calls: dict, min_time_s: float) -> dict:
    """Median over ROUNDS interleaved rounds of each call's median, ms; the order rotates every round
    so that no call always follows the same other one (whose weights just left the caches)."""
    rounds = {name: [] for name in calls}
    names = list(calls)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name].append(measure(calls[name], warmup_s=0.05, min_time_s=min_time_s, min_iters=5).median_ms)
    return {name: statistics.median(values) for name, values in rounds.items()}


def choose(model, spec, batch: int, stressed: bool):
    """The csr form's recipe for `model` at `batch`, chosen with or without a busy core beside it."""
    stress = subprocess.Popen([sys.executable, "-c", STRESS]) if stressed else None
    try:
        return FORMS.get("csr").convert(copy.deepcopy(model), spec, spec.example_inputs(TRACE_BATCH),
                                        {"kernel_batch": batch}).recipe
    finally:
        if stress is not None:
            stress.kill()
            stress.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--min-time", type=float, default=0.1, help="each round's minimum timed duration, s")
    parser.add_argument("--json", default="benchmarks/results/csr_choice.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the choice and the run at one thread: decisions hold for their thread count
    rows = []
    for name in args.models.split(","):
        spec = get_model(name)
        for sparsity in SPARSITIES:
            model = spec.make(trained=False)
            trace = spec.example_inputs(TRACE_BATCH)
            prune_model(model, PruningPlan("magnitude", sparsity, scope="layer", allow_layer_collapse=True), trace,
                        spec.output_layers, spec=spec)
            strip_masks(model)
            model.eval()
            for batch in BATCHES:
                inputs = spec.example_inputs(batch, seed=2)
                recipes = {"quiet": choose(model, spec, batch, False), "stressed": choose(model, spec, batch, True)}
                # two dense copies: their ratio is the noise floor (the same model, placed elsewhere in memory)
                runnable = {"dense": copy.deepcopy(model), "dense copy": copy.deepcopy(model)}
                for condition, recipe in recipes.items():
                    runnable[condition], _ = FORMS.get("csr").for_torch(copy.deepcopy(model), inputs, recipe)
                with torch.inference_mode():
                    times = interleaved_ms({k: (lambda m=m: run_forward(m, inputs)) for k, m in runnable.items()},
                                           args.min_time)
                row = {"model": name, "sparsity": sparsity, "batch": batch, "dense_ms": times["dense"],
                       "control_ratio": times["dense copy"] / times["dense"]}
                for condition, recipe in recipes.items():
                    kernels = recipe["kernels"]
                    row[condition] = {"csr_ms": times[condition], "ratio": times[condition] / times["dense"],
                                      "csr_layers": [k for k, d in kernels.items() if d["choice"] == "csr"],
                                      "candidates": len(kernels),
                                      "timed": sum("dense_rounds_ms" in d for d in kernels.values()),
                                      "noisy": sum(d["noisy"] for d in kernels.values())}
                rows.append(row)
                print(f"{name} {sparsity:g} batch {batch}: dense {row['dense_ms']:.4f} ms, control "
                      f"{row['control_ratio']:.2f}; " + "; ".join(
                    f"{c} {row[c]['ratio']:.2f} ({len(row[c]['csr_layers'])} csr of {row[c]['timed']} timed, "
                    f"{row[c]['noisy']} noisy)" for c in ("quiet", "stressed")), file=sys.stderr, flush=True)
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # as it goes: a crash keeps the rows
                write_text_atomic(args.json, json.dumps({"threads": 1, "rows": rows}, indent=2) + "\n")
    print(tabulate(
        [[r["model"], f"{r['sparsity']:g}", r["batch"], f"{r['dense_ms']:.4f}", f"{r['control_ratio']:.2f}",
          *(f"{r[c]['ratio']:.2f} ({len(r[c]['csr_layers'])} csr/{r[c]['timed']} timed/{r[c]['candidates']}, "
            f"{r[c]['noisy']} noisy)" for c in ("quiet", "stressed"))] for r in rows],
        headers=["model", "sparsity", "batch", "dense ms", "dense copy/dense (noise floor)", "csr/dense, chosen quietly",
                 "csr/dense, chosen under stress"],
        disable_numparse=True))
    worst = max(max(r["quiet"]["ratio"], r["stressed"]["ratio"]) for r in rows)
    chosen = [r[c]["ratio"] for r in rows for c in ("quiet", "stressed") if r[c]["csr_layers"]]
    print(f"\nworst csr/dense {worst:.2f} (goal <= 1.10); where CSR was chosen: "
          + (f"{min(chosen):.2f}-{max(chosen):.2f}" if chosen else "never"))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"threads": 1, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
