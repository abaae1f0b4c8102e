"""What the fleet adds per configuration: the default sweep benchmarked locally and on a 2-node local Ray
cluster (the head runs the driver; one worker node of profile `bench-worker` measures).

On the cluster every configuration is one Ray task, after the artifact it measures has travelled from
the driver's object store; run twice, with a fresh Ray worker process per configuration and with one
reused. The fleet's overhead per configuration is the gap on the worker node between one task's end
and the next one's start (scheduling, handing the task and its artifact to a worker, and for fresh
workers starting Python and importing deploykit and torch), median over the run, set against the
median configuration's own time (unpacking, reference outputs, measuring). The wait before the first
task starts (a worker's start and imports, once per machine and run) is shown apart. The local sweep's wall time
is printed beside it for scale (it exports and interleaves the forms of a plan; the fleet exports once
on the driver, before the clock starts). Goal: under 5% for configurations of one second or more.

    python benchmarks/fleet_overhead.py                 # default model and sweep, --min-time 1
    python benchmarks/fleet_overhead.py --min-time 2

Writes benchmarks/results/fleet_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tabulate import tabulate

from deploykit.bench.runner import bench_model
from deploykit.bench.settings import DEFAULT_RUNTIMES, Grid, TimingSettings
from deploykit.cli.options import DEFAULT_BENCH_PRUNE
from deploykit.convert.forms import DEFAULT_FORMS
from deploykit.fleet.cluster import profile_resource
from deploykit.fleet.fanout import run_fleet
from deploykit.model.sources import resolve_model
from deploykit.model.spec import DEFAULT_MODEL
from deploykit.prune.base import PruningPlan

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "bench-worker"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds each configuration is timed for")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fleet_overhead.json"))
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    spec = resolve_model(args.model)
    method, _, sparsities = DEFAULT_BENCH_PRUNE.partition(":")  # bench's default sweep
    plans = [PruningPlan(method, float(s)) for s in sparsities.split(",")]
    grid = Grid(runtimes=DEFAULT_RUNTIMES, threads=(1,))
    timing = TimingSettings(min_time_s=args.min_time)

    started = time.perf_counter()
    local = bench_model(spec, plans, DEFAULT_FORMS, grid, timing)
    local_wall = time.perf_counter() - started

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={profile_resource(PROFILE): 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    marks: dict[str, float] = {}

    def progress(message: str) -> None:
        now = time.time()  # the wall clock the tasks' spans use
        if " configurations on " in message:
            marks["submitted"] = now
        if message.startswith("["):
            marks["last"] = now

    rows = []
    try:
        for max_calls in (1, 0):  # a fresh Ray worker per configuration; one reused (the measuring is fresh anyway)
            marks.clear()
            tallies = run_fleet(ray, [PROFILE], spec, plans, DEFAULT_FORMS, grid, timing, progress,
                                lambda *_: None, max_calls=max_calls)
            tally = tallies[PROFILE]
            n = len(tally.task_s)
            elapsed = marks["last"] - marks["submitted"]
            own = statistics.median(tally.task_s)
            spans = sorted(tally.spans, key=lambda span: span[1])  # one node: its tasks in order
            gaps = [b[1] - a[2] for a, b in zip(spans, spans[1:])]
            overhead = statistics.median(gaps)
            rows.append({"model": spec.name, "ray_worker": "fresh per configuration" if max_calls == 1 else "reused",
                         "configurations": n, "failed": len(tally.failures), "min_time_s": args.min_time,
                         "local_wall_s": local_wall, "local_records": len(local), "fleet_elapsed_s": elapsed,
                         "first_task_wait_s": spans[0][1] - marks["submitted"],
                         "median_configuration_s": own, "overhead_per_configuration_s": overhead,
                         "overhead_max_s": max(gaps), "overhead_fraction": overhead / own,
                         "elapsed_minus_tasks_per_configuration_s": (elapsed - sum(tally.task_s)) / n})
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(tabulate([[r["model"], r["ray_worker"], r["configurations"], f"{r['local_wall_s']:.1f}",
                     f"{r['fleet_elapsed_s']:.1f}", f"{r['first_task_wait_s']:.1f}", f"{r['median_configuration_s']:.2f}",
                     f"{r['overhead_per_configuration_s']:.3f}", f"{100 * r['overhead_fraction']:.1f}%"] for r in rows],
                   headers=["model", "Ray worker", "configurations", "local sweep s", "fleet elapsed s",
                            "first task starts after s", "median configuration s",
                            "gap between configurations s (median)", "gap / configuration"]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
