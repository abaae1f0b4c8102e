"""Measure one configuration in a fresh process: `python -m deploykit.worker REQUEST.json`.

A fresh process per configuration keeps one configuration's memory (and allocator state, and thread
pools) out of the next one's figures. The worker imports only what its runtime needs: an onnxruntime
worker never imports torch. It reads inputs from a safetensors file, writes the outputs of one call to
another, measures each of the session's stages in turn (one for a plain model; encoder, decoder step
and greedy decoding for a speech-translation pair), and prints a JSON result on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    from safetensors.numpy import load_file, save_file

    from .env import peak_rss_bytes
    from .measure import measure
    from .runtime import RUNTIMES, Target

    feeds = load_file(request["inputs"])
    target = Target(**request["target"])
    runtime = RUNTIMES.get(target.runtime)
    for module in runtime.modules:
        importlib.import_module(module)
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    session = runtime.load(request["pipeline"], Path(request["artifact"]), request["threads"], target)
    load_s = time.perf_counter() - start
    outputs = session.run(feeds)
    save_file({f"output_{i}": out for i, out in enumerate(outputs)}, request["outputs"])
    stages = {}
    for stage, call in session.stages(feeds).items():
        measurement = measure(call, batch_size=request["batch_size"], warmup_s=request["warmup_s"],
                              min_time_s=request["min_time_s"], min_iters=request["min_iters"],
                              max_iters=request["max_iters"], sync=session.synchronize)
        stages[stage] = {"samples_ns": list(measurement.samples_ns), "warmup_iters": measurement.warmup_iters,
                         "calls_per_sample": measurement.calls_per_sample, "overhead_ns": measurement.overhead_ns,
                         "warmup_stable": measurement.warmup_stable}
    result = {
        "stages": stages,
        "files": list(session.files),
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "load_s": load_s,
        "runtime": session.info.runtime,
        "runtime_version": session.info.version,
        "threads": session.info.threads,
        "device": session.info.device,
    }
    json.dump(result, sys.stdout)
    return 0


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
