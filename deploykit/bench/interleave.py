"""Benchmark workers measured in interleaved rounds: a round of each configuration in turn.

A ratio taken in one run (csr over dense, onnxruntime over torch, one artifact over another) is
skewed when a burst of other load falls on one configuration's timing and not the other's. So the
configurations compared are loaded together, each in its own worker process (`deploykit.bench.worker`),
and measured a round at a time, in an order that rotates every round; only one worker measures at a
time, the others wait on their stdin. A burst then lands on a round of each in turn, not on one whole
configuration. Peak memory stays each worker's own; how many live at once is bounded by the memory
available (`max_live`), larger sets run in consecutive groups.

Why not a library: this is the protocol between deploykit and its own worker (one JSON line per
message over a pipe), a few dozen lines; a process pool would hide the one-at-a-time ordering.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from deploykit.core.env import available_memory_bytes
from deploykit.core.errors import MeasurementError
from deploykit.runtime.session import Target

#: a worker's memory, estimated from the bytes it loads: the files, their runtime copy, and the
#: runtime itself
_PER_BYTE, _RUNTIME_BYTES = 4, 600 * 2**20
#: the share of available memory live workers may take together
_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Job:
    """One configuration to measure: what its worker loads, with which settings and inputs."""

    location: Path
    pipeline: str
    target: Target
    threads: int
    batch: int
    inputs: Path
    #: bytes of the files it loads (for the memory bound)
    load_bytes: int
    label: str


def max_live(jobs: Sequence[Job]) -> int:
    """How many of `jobs` may be alive at once in the memory available now (at least 1)."""
    largest = max((job.load_bytes for job in jobs), default=0) * _PER_BYTE + _RUNTIME_BYTES
    return max(1, int(_MEMORY_SHARE * available_memory_bytes() // largest))


class _Worker:
    def __init__(self, job: Job, timing: dict, tmp: Path, index: int):
        self.job = job
        self.outputs_path = tmp / f"outputs-{index}.safetensors"
        request_path = tmp / f"request-{index}.json"
        request = {"artifact": str(job.location), "pipeline": job.pipeline, "target": dataclasses.asdict(job.target),
                   "threads": job.threads, "batch_size": job.batch, "inputs": str(job.inputs),
                   "outputs": str(self.outputs_path), **timing}
        request_path.write_text(json.dumps(request), encoding="utf-8")
        self.stderr_path = tmp / f"stderr-{index}.txt"
        # Thread pools that read the environment (OpenMP, MKL) must agree with the runtime's own setting.
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
        with open(self.stderr_path, "w", encoding="utf-8") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "deploykit.bench.worker", str(request_path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         env=env)
        self.error: MeasurementError | None = None
        #: seconds this worker may still work (its own steps; waiting for the others does not count)
        self.max_time_s = self.budget_s = float(timing["max_time_s"])

    def ask(self, op: str | None) -> dict | None:
        """Send `op` (None: only listen) and read the answer; None, with `error` set, if the worker died
        or ran out of its time (it is stopped then)."""
        if self.error is not None:
            return None
        started = time.monotonic()
        try:
            if op is not None:
                self.proc.stdin.write(json.dumps({"op": op}) + "\n")
                self.proc.stdin.flush()
            # one line answers each request, so nothing waits in the reader's buffer when this looks
            ready, _, _ = select.select([self.proc.stdout], [], [], max(self.budget_s, 0.0))
            line = self.proc.stdout.readline() if ready else None
        except (BrokenPipeError, OSError):
            line = ""
        self.budget_s -= time.monotonic() - started
        if line is None:
            self.stop()
            self.error = MeasurementError(f"{self.job.target.runtime} worker ({self.job.target.device}) on "
                                          f"{self.job.location} was stopped at --max-time {self.max_time_s:g} s "
                                          "before it finished (a graph that loops for long, or a too small limit)")
            return None
        if not line:
            self._failed()
            return None
        return json.loads(line)

    def _failed(self) -> None:
        self.proc.wait()
        text = self.stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        last = text[-1] if text else f"exit status {self.proc.returncode}"
        self.error = MeasurementError(f"{self.job.target.runtime} worker ({self.job.target.device}) failed on "
                                      f"{self.job.location}: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_interleaved(jobs: Sequence[Job], timing: dict, tmp: Path,
                    progress: Callable[[str], None] = lambda message: None, anchors: Sequence[int] = (),
                    ) -> list[tuple[dict, list] | MeasurementError]:
    """Measure `jobs` in interleaved rounds (groups of `max_live` at a time); for each job, in order,
    (worker result, outputs of one call) or the MeasurementError it ended in. `timing` holds
    TimingSettings' fields: the budget each job gets in total, over its `rounds` and over its
    `processes`: each job is measured by that many workers (their samples pooled), because a process
    lands its tensors at its own places in memory, and that moves one process's times by a few
    percent against another's (two identical copies of a model differed by up to 1.24x here).

    The jobs at `anchors` (the unpruned baselines the others are compared with) are measured in every
    group, so that each job's rounds interleave with theirs whatever the memory bound; their samples
    are pooled over the groups. Each stage of a result carries `round_p50_ns` and the result
    `round_keys`: (group, process, round) of each of those medians, which `paired_ratios` matches."""
    processes = timing["processes"]
    per_process = {**timing, "min_time_s": timing["min_time_s"] / processes,
                   "min_iters": math.ceil(timing["min_iters"] / processes)}
    anchors = sorted(set(anchors))
    others = [i for i in range(len(jobs)) if i not in anchors]
    # how many jobs a group holds beside the anchors (at least one, or the run would never end)
    room = max(1, max_live([job for job in jobs for _ in range(processes)]) // processes - len(anchors))
    groups = [others[start:start + room] for start in range(0, len(others), room)] or [[]]
    pieces: dict[int, list] = {i: [] for i in range(len(jobs))}
    for g, members in enumerate(groups):
        indices = [*anchors, *members]
        copies = [jobs[i] for i in indices for _ in range(processes)]
        outcomes = _run(copies, per_process, tmp / f"group-{g}", progress)
        for k, outcome in enumerate(outcomes):
            if not isinstance(outcome, MeasurementError):
                result, outputs = outcome
                copy = k % processes
                outcome = ({**result, "round_keys": [[g, copy, r] for r in range(len(result["round_times_ns"]))]},
                           outputs)
            pieces[indices[k // processes]].append(outcome)
    return [_pooled(pieces[i]) for i in range(len(jobs))]


def paired_ratios(baseline: dict, result: dict, stage: str) -> list[float]:
    """baseline p50 / `result` p50 of `stage` in each round both were measured in (same group,
    process and round: one worker of each timed back to back), in round order."""
    def by_key(outcome: dict) -> dict[tuple, float]:
        medians = outcome["stages"][stage]["round_p50_ns"]
        return {tuple(key): p50 for key, p50 in zip(outcome["round_keys"], medians) if p50}

    theirs = by_key(baseline)
    return [theirs[key] / p50 for key, p50 in by_key(result).items() if key in theirs]


def _pooled(outcomes: list[tuple[dict, list] | MeasurementError]) -> tuple[dict, list] | MeasurementError:
    """One job's result from its processes' (and groups'): samples pooled, peak memory the highest,
    load time the median."""
    for outcome in outcomes:
        if isinstance(outcome, MeasurementError):
            return outcome
    (first, outputs), results = outcomes[0], [result for result, _ in outcomes]
    stages = {}
    for stage in first["stages"]:
        parts = [result["stages"][stage] for result in results]
        stages[stage] = {"samples_ns": [s for part in parts for s in part["samples_ns"]],
                         "warmup_iters": sum(part["warmup_iters"] for part in parts),
                         "calls_per_sample": max(part["calls_per_sample"] for part in parts),
                         # an integer, as a Measurement's: the median of an even count is a float
                         "overhead_ns": round(statistics.median(part["overhead_ns"] for part in parts)),
                         "warmup_stable": all(part["warmup_stable"] for part in parts),
                         "round_p50_ns": [p for part in parts for p in part["round_p50_ns"]]}
    return ({**first, "stages": stages, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
             "baseline_rss_bytes": min(r["baseline_rss_bytes"] for r in results),
             "load_s": statistics.median(r["load_s"] for r in results),
             "round_times_ns": [t for r in results for t in r["round_times_ns"]],
             "round_keys": [k for r in results for k in r["round_keys"]], "processes": len(results)},
            outputs)


def _run(jobs: Sequence[Job], timing: dict, tmp: Path,
         progress: Callable[[str], None]) -> list[tuple[dict, list] | MeasurementError]:
    """Measure `jobs` together, all alive at once, a round of each in turn."""
    from safetensors.numpy import load_file

    rounds = timing["rounds"]
    results: list[tuple[dict, list] | MeasurementError] = []
    tmp.mkdir(parents=True, exist_ok=True)
    workers = [_Worker(job, timing, tmp, i) for i, job in enumerate(jobs)]
    try:
        for worker in workers:  # each loads, runs once and warms up; a failure ends only its own job
            worker.ask(None)
        for r in range(rounds):
            for worker in workers[r % len(workers):] + workers[:r % len(workers)]:
                worker.ask("round")
            alive = sum(worker.error is None for worker in workers)
            progress(f"    round {r + 1}/{rounds} of {alive} worker{'s' * (alive != 1)}")
        for worker in workers:
            result = worker.ask("done")
            if result is None:
                results.append(worker.error)
                continue
            worker.proc.wait()
            outputs = load_file(str(worker.outputs_path))
            results.append((result, [outputs[f"output_{i}"] for i in range(len(outputs))]))
    finally:
        for worker in workers:
            worker.stop()
    return results
