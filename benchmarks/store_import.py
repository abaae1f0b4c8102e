"""How long `deploykit report --import` takes for a store of many runs (issue 32: it grew with the square).

Makes a source store of N runs (one record each, 200 samples: a small bench's row), then times
`deploykit report --store TARGET --import SOURCE` in a fresh process, into an empty store and again
into the same store (every run already there). `--checkout DIR` runs the command from another
deploykit checkout (PYTHONPATH=DIR), so an older revision can be timed on the same source:

    python benchmarks/store_import.py --runs 5000 --json /tmp/import.json
    git worktree add /tmp/old e54d3e7 && python benchmarks/store_import.py --runs 5000 --checkout /tmp/old --timeout 300

Prints a table; with --json, writes the figures. Wall-clock seconds of one run each: compare the
two checkouts on the same machine in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploykit.bench.records import BenchRecord
from deploykit.core.measure import Measurement
from deploykit.results.store import NewRun, ResultStore


def _record(i: int) -> BenchRecord:
    samples = tuple(1_000_000 + 37 * ((i + k) % 11) for k in range(200))
    return BenchRecord(
        model="mlp-sst2", prune=f"magnitude:0.{i % 10}", sparsity=(i % 10) / 10, overall_sparsity=(i % 10) / 10,
        form="dense", runtime="onnxruntime", profile="bench-profile", stage="forward", runtime_version="1.32.0",
        device="cpu", batch_size=1, threads=1, measurement=Measurement(samples, 10, 1), peak_rss_bytes=10**8,
        baseline_rss_bytes=10**7, disk_bytes=5_650_104, parameters=1_412_354, nonzero_parameters=142_389,
        parity_max_abs_error=0.0, load_s=0.1, timing={"min_time_s": 1.0}, artifact="/tmp/a",
        versions={"torch": "2.10.0"}, machine={"cores": 2})


def make_source(path: Path, runs: int) -> None:
    """A store of `runs` runs of one record each, written in one transaction."""
    ResultStore(path).save_many([
        NewRun([_record(i)], "2026-12-07T00:00:00+00:00", "complete", "deploykit bench", "bench-profile",
               {"timing": {}}, uid=f"bench-run-{i}") for i in range(runs)])


def time_import(source: Path, target: Path, checkout: Path | None, timeout: float) -> dict:
    env = {**os.environ, **({"PYTHONPATH": str(checkout)} if checkout else {})}
    started = time.perf_counter()
    try:
        # run from the store's folder: `python -m` puts the working directory first on the path, which
        # would pick this checkout over --checkout
        done = subprocess.run([sys.executable, "-m", "deploykit", "report", "--store", str(target), "--import",
                               str(source)], capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=target.parent)
        finished, code = True, done.returncode
    except subprocess.TimeoutExpired:
        finished, code = False, None
    seconds = time.perf_counter() - started
    with sqlite3.connect(target) as db:
        stored = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if target.exists() else 0
    return {"seconds": round(seconds, 2), "finished": finished, "exit": code, "runs_in_target": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--checkout", type=Path, help="run the import from this deploykit checkout")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop an import after this many seconds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploykit-import-bench-") as tmp:
        source, target = Path(tmp) / "source.sqlite", Path(tmp) / "target.sqlite"
        make_source(source, args.runs)
        rows = {"into an empty store": time_import(source, target, args.checkout, args.timeout)}
        rows["again (all already there)"] = time_import(source, target, args.checkout, args.timeout)
    print(f"report --import of {args.runs:,} runs ({args.checkout or 'this checkout'})")
    for what, row in rows.items():
        state = "" if row["finished"] else f" (stopped at {args.timeout:g} s)"
        print(f"  {what:<28} {row['seconds']:>8.2f} s{state}; runs in the target: {row['runs_in_target']:,}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "checkout": str(args.checkout or ""), "imports": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
