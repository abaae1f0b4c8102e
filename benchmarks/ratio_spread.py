"""How steady is a same-run ratio on a busy machine? csr/dense p50 of `linear-stack-4096` at 0.9
(per layer), batch 32, one thread, from `deploykit bench` run 5 times, quietly and with a stress
process spinning on one core, with interleaved timing rounds (the default) and without (1 round), and
with each configuration measured in 3 worker processes (`--processes 3`) as well as one.

Both artifacts are exported once; each bench run measures them together, as a user comparing the
two would. Reported: the five ratios and their coefficient of variation (goal: under 5% with the
stress process). Figures from one run on this machine.

With `--sweep` it measures the ratio a pruning tool exists for instead: each plan of a sweep
(`bench --model mlp-sst2 --prune magnitude:0,0.5,0.9 --form csr`, batch 32, torch, 1 thread) over the
unpruned model, 5 runs quietly and 5 with the stress process, `--processes 3`. The speedup is the
record's own (`speedup`: paired rounds against the baseline measured with it); with `--checkout DIR`
(an older revision's working tree, whose bench measured each plan as a separate group) it is the
ratio of the two rows' p50s, as a user of that revision divided by hand.

Run: bash .ci/env python benchmarks/ratio_spread.py [--runs N] [--json PATH]
     bash .ci/env python benchmarks/ratio_spread.py --sweep [--checkout DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from deploykit.core.fsutil import write_text_atomic

MODEL, PRUNE, BATCH = "linear-stack-4096", "magnitude:0.9", 32
STRESS = "while True: pass"


SWEEP_MODEL, SWEEP_PRUNE = "mlp-sst2", "magnitude:0,0.5,0.9"


def deploykit(*args: str, cwd: str | None = None) -> str:
    # `python -m deploykit` imports the package of the working directory first: a checkout runs its own
    return subprocess.run([sys.executable, "-m", "deploykit", *args], capture_output=True, text=True,
                          check=True, cwd=cwd).stdout


def sweep_speedups(checkout: str | None, min_time: float) -> dict[str, float]:
    """plan -> speedup over the unpruned model, from one bench of the sweep."""
    out = json.loads(deploykit("bench", "--model", SWEEP_MODEL, "--prune", SWEEP_PRUNE, "--form", "csr",
                               "--runtime", "torch", "--batch", str(BATCH), "--threads", "1", "--min-time",
                               str(min_time), "--processes", "3", "--no-store", "--json", "-q", cwd=checkout))
    if isinstance(out, dict):  # this revision: the speedup each row reports, against the baseline measured with it
        return {r["prune"]: r["speedup"] for r in out["records"] if not r["baseline"]}
    # an older revision: the unpruned model is plan "none" (csr, as every plan of the sweep), each plan
    # measured in its own group; the user divides the p50s
    base = next(r for r in out if r["prune"] == "none")["latency_ms"]["p50"]
    return {r["prune"]: base / r["latency_ms"]["p50"] for r in out if r["prune"] != "none"}


def sweep(args) -> int:
    rows = []
    for stressed in (False, True):
        stress = subprocess.Popen([sys.executable, "-c", STRESS]) if stressed else None
        try:
            runs = [sweep_speedups(args.checkout, args.min_time) for _ in range(args.runs)]
        finally:
            if stress is not None:
                stress.kill()
                stress.wait()
        for plan in runs[0]:
            values = [run[plan] for run in runs]
            cv = statistics.stdev(values) / statistics.mean(values)
            rows.append({"stress": stressed, "plan": plan, "speedups": values, "cv": cv})
            print(f"stress={stressed} {plan}: {[round(v, 3) for v in values]} cv {100 * cv:.1f}%", file=sys.stderr,
                  flush=True)
    print(tabulate([["on one core" if r["stress"] else "none", r["plan"], " ".join(f"{x:.3f}" for x in r["speedups"]),
                     f"{statistics.mean(r['speedups']):.3f}", f"{100 * r['cv']:.1f}%"] for r in rows],
                   headers=["stress process", "plan (csr)", "speedup per run", "mean", "CV"], disable_numparse=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"model": SWEEP_MODEL, "prune": SWEEP_PRUNE, "batch": BATCH,
                                             "checkout": args.checkout, "rows": rows}, indent=2) + "\n")
    return 0


def ratio(dense: Path, csr: Path, rounds: int, processes: int, min_time: float) -> float:
    records = json.loads(deploykit("bench", str(dense), str(csr), "--runtime", "torch", "--batch", str(BATCH),
                                   "--threads", "1", "--min-time", str(min_time), "--timing-rounds", str(rounds),
                                   "--processes", str(processes), "--no-store", "--json", "-q"))["records"]
    p50 = {r["form"]: r["latency_ms"]["p50"] for r in records}
    return p50["csr"] / p50["dense"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--modes", default="5:1,1:1,5:3",
                        help="timing rounds:worker processes per configuration, comma-separated")
    parser.add_argument("--json", default="benchmarks/results/ratio_spread.json")
    parser.add_argument("--sweep", action="store_true", help=f"the plan sweep {SWEEP_PRUNE} against the unpruned model")
    parser.add_argument("--checkout", help="with --sweep: the working tree of another revision to run instead")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense, csr = Path(tmp) / "dense", Path(tmp) / "csr"
        for form, out in (("dense", dense), ("csr", csr)):
            deploykit("export", "--model", MODEL, "--prune", PRUNE, "--scope", "layer", "--form", form,
                      "--kernel-batch", str(BATCH), "--threads", "1", "--out", str(out), "-q")
        modes = [tuple(int(x) for x in mode.split(":")) for mode in args.modes.split(",")]
        for stressed in (False, True):
            for rounds, processes in modes:
                stress = subprocess.Popen([sys.executable, "-c", STRESS]) if stressed else None
                try:
                    ratios = [ratio(dense, csr, rounds, processes, args.min_time) for _ in range(args.runs)]
                finally:
                    if stress is not None:
                        stress.kill()
                        stress.wait()
                cv = statistics.stdev(ratios) / statistics.mean(ratios)
                rows.append({"stress": stressed, "rounds": rounds, "processes": processes, "ratios": ratios, "cv": cv})
                print(f"stress={stressed} rounds={rounds} processes={processes}: {[round(r, 3) for r in ratios]} "
                      f"cv {100 * cv:.1f}%",
                      file=sys.stderr, flush=True)
    print(tabulate([["on one core" if r["stress"] else "none", r["rounds"], r["processes"],
                     " ".join(f"{x:.3f}" for x in r["ratios"]), f"{statistics.mean(r['ratios']):.3f}",
                     f"{100 * r['cv']:.1f}%"] for r in rows],
                   headers=["stress process", "timing rounds", "processes", "csr/dense p50 per run", "mean", "CV"],
                   disable_numparse=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"model": MODEL, "prune": PRUNE, "batch": BATCH, "rows": rows},
                                            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
