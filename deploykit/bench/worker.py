"""Measure one configuration in a fresh process: `python -m deploykit.bench.worker REQUEST.json`.

A fresh process per configuration keeps one configuration's memory (and allocator state, and thread
pools) out of the next one's figures. The worker imports only what its runtime needs: an onnxruntime
worker never imports torch. It reads inputs from a safetensors file, writes the outputs of one call to
another, warms up each of the session's stages (one for a plain model; encoder, decoder step and
greedy decoding for a speech-translation pair) and says it is ready.

Then it measures in rounds, on command, so that the benchmark can interleave the configurations it
compares (a round of each in turn, one process measuring at a time): each line `round` on stdin
takes `1/rounds` of the timing budget for every stage and answers one line; `done` ends it with the
JSON result on stdout. Every message is one JSON line.
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file, save_file

from deploykit.core.env import peak_rss_bytes
from deploykit.core.measure import Sampler
from deploykit.pipelines.catalog import PIPELINES
from deploykit.runtime.session import RUNTIMES, Target


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    feeds = load_file(request["inputs"])
    target = Target(**{**request["target"], "code_consent": tuple(request["target"]["code_consent"])})
    runtime = RUNTIMES.get(target.runtime)
    for module in runtime.modules:
        importlib.import_module(module)
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    session = PIPELINES.get(request["pipeline"]).load(target.runtime, Path(request["artifact"]), request["threads"], target)
    load_s = time.perf_counter() - start
    outputs = session.run(feeds)
    save_file({f"output_{i}": out for i, out in enumerate(outputs)}, request["outputs"])
    calls = session.stages(feeds)
    samplers = {stage: Sampler(call, batch_size=request["batch_size"], warmup_s=request["warmup_s"],
                               sync=session.synchronize) for stage, call in calls.items()}
    _say({"ready": True})
    rounds, round_times = request["rounds"], []
    round_p50 = {stage: [] for stage in samplers}
    for line in sys.stdin:
        if json.loads(line).get("op") != "round":
            break
        began = time.time_ns()
        for stage, sampler in samplers.items():
            calls[stage]()  # one untimed call: another process ran in between, and its caches are cold
            taken = len(sampler.samples)
            sampler.run(request["min_time_s"] / rounds, math.ceil(request["min_iters"] / rounds), request["max_iters"])
            # this round's own median: what a ratio against another configuration pairs round by round
            round_p50[stage].append(statistics.median(sampler.samples[taken:]) if len(sampler.samples) > taken else None)
        round_times.append([began, time.time_ns()])
        _say({"round": len(round_times)})
    stages = {}
    for stage, sampler in samplers.items():
        measurement = sampler.measurement()
        stages[stage] = {"samples_ns": list(measurement.samples_ns), "warmup_iters": measurement.warmup_iters,
                         "calls_per_sample": measurement.calls_per_sample, "overhead_ns": measurement.overhead_ns,
                         "warmup_stable": measurement.warmup_stable, "round_p50_ns": round_p50[stage]}
    _say({
        "stages": stages,
        "files": list(session.files),
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "load_s": load_s,
        "runtime": session.info.runtime,
        "runtime_version": session.info.version,
        "threads": session.info.threads,
        "device": session.info.device,
        #: [start, end] wall-clock ns of each round: when this configuration was measured
        "round_times_ns": round_times,
    })
    return 0


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
