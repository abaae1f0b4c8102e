"""Benchmark orchestration: export each configuration, then measure it in a fresh process per runtime.

`bench_model` exports (model, plan, form) artifacts with the same `export_artifact` users run, and
`bench_artifact` measures one artifact under each runtime, batch size and thread count. Every
measurement runs in its own worker process (`deploykit.worker`) so peak memory is per configuration.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .artifact import Manifest, load_torch_model, read_manifest
from .env import library_versions, machine_info
from .errors import MeasurementError, UsageError
from .forms import FORMS
from .measure import Measurement
from .onnx_export import check_parity, max_abs_errors, torch_outputs
from .prune import PruningPlan
from .records import BenchRecord
from .runtime import RUNTIMES
from .spec import get_model

Progress = Callable[[str], None]

DEFAULT_SPARSITIES = (0.0, 0.5, 0.9)
DEFAULT_FORMS = ("dense", "csr")
DEFAULT_RUNTIMES = ("torch", "onnxruntime")
#: seed of the benchmark inputs (export uses 0 and 1; a third set keeps the measurement honest)
INPUT_SEED = 2


@dataclass(frozen=True)
class TimingSettings:
    """How each configuration is timed; recorded with the results."""

    warmup_s: float = 0.2
    min_time_s: float = 1.0
    min_iters: int = 100
    max_iters: int = 100_000

    def __post_init__(self) -> None:
        if self.warmup_s < 0 or self.min_time_s < 0:
            raise UsageError("warm-up and minimum time must be >= 0 seconds")
        if not 1 <= self.min_iters <= self.max_iters:
            raise UsageError("need 1 <= --min-iters <= max iterations")


@dataclass(frozen=True)
class Grid:
    """The runtime-side axes of a benchmark."""

    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        for name in self.runtimes:
            RUNTIMES.get(name)
        if not self.batches or min(self.batches) < 1:
            raise UsageError("batch sizes must be >= 1")
        if not self.threads or min(self.threads) < 1:
            raise UsageError("thread counts must be >= 1")

    def __len__(self) -> int:
        return len(self.runtimes) * len(self.batches) * len(self.threads)


def bench_model(
    model: str,
    plans: Sequence[PruningPlan],
    forms: Sequence[str],
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
) -> list[BenchRecord]:
    """Export every (plan, form) of `model` to a temporary artifact and benchmark it."""
    from .export import export_artifact

    spec = get_model(model)
    for form in forms:
        FORMS.get(form)
    total = len(plans) * len(forms) * len(grid)
    counter = itertools.count(1)
    records: list[BenchRecord] = []
    with tempfile.TemporaryDirectory(prefix="deploykit-bench-") as tmp:
        for i, (plan, form) in enumerate(itertools.product(plans, forms)):
            progress(f"exporting {spec.name} {plan.label()} form={form}")
            result = export_artifact(spec, plan, form, Path(tmp) / f"artifact-{i}")
            records += bench_artifact(result.directory, grid, timing, progress, counter, total)
    return records


def bench_artifact(
    directory: str | Path,
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
    counter: "itertools.count[int] | None" = None,
    total: int | None = None,
) -> list[BenchRecord]:
    """Measure one exported artifact under every runtime, batch size and thread count of `grid`."""
    directory = Path(directory).absolute()
    manifest = read_manifest(directory)
    spec = get_model(manifest.model)
    reference_model, _ = load_torch_model(directory, for_runtime=False)
    counter = counter or itertools.count(1)
    total = total or len(grid)
    versions, machine = library_versions(), machine_info()
    records = []
    with tempfile.TemporaryDirectory(prefix="deploykit-worker-") as tmp:
        for batch in grid.batches:
            inputs = spec.example_inputs(batch, seed=INPUT_SEED)
            inputs_path = Path(tmp) / f"inputs-{batch}.safetensors"
            _save_numpy({n: t.numpy() for n, t in zip(spec.input_names, inputs)}, inputs_path)
            reference = torch_outputs(reference_model, inputs)
            for runtime, threads in itertools.product(grid.runtimes, grid.threads):
                label = (
                    f"[{next(counter)}/{total}] {manifest.model} {_plan_label(manifest)} "
                    f"form={manifest.form} runtime={runtime} batch={batch} threads={threads}"
                )
                progress(label)
                result, outputs = run_worker(directory, runtime, threads, batch, inputs_path, timing, Path(tmp))
                errors = max_abs_errors(reference, outputs, manifest.outputs)
                check_parity(f"{runtime} vs stripped PyTorch model (batch {batch})", errors, manifest.parity_tolerance)
                record = _record(manifest, directory, runtime, batch, result, errors, timing, versions, machine)
                progress(f"    p50 {record.measurement.median_ms:.4f} ms, {len(record.measurement.samples_ns)} samples")
                records.append(record)
    return records


def run_worker(
    directory: Path, runtime: str, threads: int, batch: int, inputs_path: Path, timing: TimingSettings, tmp: Path
) -> tuple[dict, list]:
    """Run `deploykit.worker` in a fresh interpreter; returns its result and the outputs it wrote."""
    from safetensors.numpy import load_file

    request_path = tmp / "request.json"
    outputs_path = tmp / "outputs.safetensors"
    request = {
        "artifact": str(directory),
        "runtime": runtime,
        "threads": threads,
        "batch_size": batch,
        "inputs": str(inputs_path),
        "outputs": str(outputs_path),
        **dataclasses.asdict(timing),
    }
    request_path.write_text(json.dumps(request), encoding="utf-8")
    # Thread pools that read the environment (OpenMP, MKL) must agree with the runtime's own setting.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "deploykit.worker", str(request_path)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasurementError(f"{runtime} worker failed on {directory}: {last}")
    outputs = load_file(str(outputs_path))
    return json.loads(proc.stdout), [outputs[f"output_{i}"] for i in range(len(outputs))]


def _save_numpy(arrays: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(path))


def _plan_label(manifest: Manifest) -> str:
    return PruningPlan(**manifest.plan).label()


def _record(manifest, directory, runtime, batch, result, errors, timing, versions, machine) -> BenchRecord:
    return BenchRecord(
        model=manifest.model,
        prune=_plan_label(manifest),
        sparsity=manifest.plan["amount"],
        overall_sparsity=manifest.overall_sparsity,
        form=manifest.form,
        runtime=runtime,
        runtime_version=result["runtime_version"],
        device=result["device"],
        batch_size=batch,
        threads=result["threads"],
        measurement=Measurement(tuple(result["samples_ns"]), result["warmup_iters"], batch),
        peak_rss_bytes=result["peak_rss_bytes"],
        baseline_rss_bytes=result["baseline_rss_bytes"],
        disk_bytes=manifest.files[RUNTIMES.get(runtime).artifact_file],
        parameters=manifest.parameters,
        nonzero_parameters=manifest.nonzero_parameters,
        parity_max_abs_error=max(errors.values(), default=0.0),
        load_s=result["load_s"],
        timing=dataclasses.asdict(timing),
        artifact=str(directory),
        versions=versions,
        machine=machine,
    )
