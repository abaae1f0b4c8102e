"""What an export buys on the machine it ran on: the exported variant timed against the unpruned model.

A FLOP count says what a variant could save; whether it does depends on the kernels each runtime
picks for its shapes (odd channel counts fall off onnxruntime's fast convolution path and run
slower than the unpruned model). So `export` measures: the unpruned model is exported as it is
into a scratch directory, and both are benchmarked together in a few interleaved rounds per
runtime (`bench_subjects` with the baseline), which gives the speedup of each runtime with the
interval of its rounds. A few seconds; `export --no-measure` skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from deploykit.bench.records import BenchRecord
from deploykit.bench.runner import BASELINE_PLAN, Progress, artifact_subject, bench_subjects
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.fsutil import scratch_directory
from deploykit.export.build import export_artifact
from deploykit.model.artifact import read_manifest
from deploykit.model.sources import consent_of
from deploykit.model.spec import ModelSpec
from deploykit.pipelines.catalog import PIPELINES

#: the timing of export's own check: short, but in rounds, so that a burst of other work falls on both
QUICK_TIMING = TimingSettings(warmup_s=0.1, min_time_s=0.5, min_iters=20, rounds=5)
#: the runtimes export measures on (those of them its pipeline loads)
MEASURED_RUNTIMES = ("torch", "onnxruntime")


def measure_against_unpruned(spec: ModelSpec, directory: str | Path, threads: int, batch: int = 1,
                             runtimes: Sequence[str] = MEASURED_RUNTIMES, timing: TimingSettings = QUICK_TIMING,
                             progress: Progress = lambda message: None) -> list[BenchRecord]:
    """The rows of the artifact at `directory` (exported from `spec`), each with its `versus` the
    unpruned model's, measured together on this machine at `batch` and `threads`."""
    subject = artifact_subject(directory, consent_of(read_manifest(directory).source))
    loaders = PIPELINES.get(subject.pipeline).loaders
    grid = Grid(runtimes=tuple(r for r in runtimes if r in loaders), batches=(batch,), threads=(threads,))
    with scratch_directory("unpruned") as tmp:
        progress(f"exporting the unpruned {spec.name} to measure against")
        base = export_artifact(spec, BASELINE_PLAN, "dense", Path(tmp) / "unpruned")
        baseline = artifact_subject(base.directory, consent_of(base.manifest.source))
        records = bench_subjects([baseline, subject], grid, timing, progress, baselines=[0])
    return [r for r in records if not r.baseline]

