"""Benchmark orchestration: export each configuration, then measure it in a fresh process per runtime.

`bench_model` exports (model, plan, form) artifacts with the same `export_artifact` users run, and
`bench_artifact` measures one artifact under each runtime, batch size and thread count. Every
measurement runs in its own worker process (`deploykit.worker`) so peak memory is per configuration.

What is fed and what must match depends on the artifact's pipeline (`WORKLOADS`): a one-graph model
gets its spec's example inputs and is compared output by output with the stripped PyTorch model; a
speech-translation pair gets 5 s of features, and its encoder output, one decoder step and its
greedy tokens are compared with the stripped model's.
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
from .devices import Placement, place
from .forms import FORMS
from .measure import Measurement
from .onnx_export import check_parity, max_abs_errors, torch_outputs
from .profiles import current_profile
from .prune import PruningPlan
from .records import BenchRecord
from .runtime import DEFAULT_GRAPH_OPTIMIZATION, RUNTIMES, Target
from .registry import Registry
from .sources import resolve_model, spec_for_artifact

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
    #: device choices (see `deploykit.devices`): auto follows the hardware profile
    devices: tuple[str, ...] = ("auto",)
    #: sequence lengths set on every named non-batch input axis; None keeps the model's own inputs
    lengths: tuple[int | None, ...] = (None,)
    #: onnxruntime graph optimisation levels (runtimes without levels are measured once)
    graph_optimizations: tuple[str, ...] = (DEFAULT_GRAPH_OPTIMIZATION,)

    def __post_init__(self) -> None:
        for name in self.runtimes:
            RUNTIMES.get(name)
        if not self.batches or min(self.batches) < 1:
            raise UsageError("batch sizes must be >= 1")
        if not self.threads or min(self.threads) < 1:
            raise UsageError("thread counts must be >= 1")
        if not self.lengths or min(length or 1 for length in self.lengths) < 1:
            raise UsageError("sequence lengths must be >= 1")

    def placement(self) -> Placement:
        """The (runtime, device) pairs this machine runs, and notes on choices it cannot honour."""
        return place(self.runtimes, self.devices, current_profile(), self.graph_optimizations)

    def configurations(self, placement: Placement) -> int:
        """Measured configurations per artifact."""
        return len(placement.targets) * len(self.batches) * len(self.threads) * len(self.lengths)


def bench_model(
    model: str,
    plans: Sequence[PruningPlan],
    forms: Sequence[str],
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
    sink: list[BenchRecord] | None = None,
) -> list[BenchRecord]:
    """Export every (plan, form) of `model` to a temporary artifact and benchmark it.

    Records are appended to `sink` (and returned) as they are measured, so a caller interrupted
    midway still holds what was measured.
    """
    from .export import export_artifact

    spec = resolve_model(model)
    if any(grid.lengths):
        spec.require_sequence_axis()
    for form in forms:
        FORMS.get(form)
    total = len(plans) * len(forms) * grid.configurations(grid.placement())
    counter = itertools.count(1)
    records: list[BenchRecord] = [] if sink is None else sink
    with tempfile.TemporaryDirectory(prefix="deploykit-bench-") as tmp:
        for i, (plan, form) in enumerate(itertools.product(plans, forms)):
            progress(f"exporting {spec.name} {plan.label()} form={form}")
            result = export_artifact(spec, plan, form, Path(tmp) / f"artifact-{i}")
            bench_artifact(result.directory, grid, timing, progress, counter, total, sink=records)
    return records


@dataclass(frozen=True)
class Workload:
    """How one pipeline is benchmarked: its inputs, and the reference every runtime must reproduce."""

    #: (artifact directory, manifest, batch, seed, sequence length or None) -> input name -> array
    inputs: Callable[[Path, Manifest, int, int, "int | None"], dict]
    #: artifact directory -> a function from feeds to the stripped PyTorch model's outputs (the model
    #: is loaded once per artifact: for dense-shrunk, loading replays the pruning history)
    reference: Callable[[Path], Callable[[dict], list]]
    #: names of those outputs
    outputs: Callable[[Manifest], Sequence[str]]


WORKLOADS: Registry[Workload] = Registry("pipeline")


def _forward_inputs(directory: Path, manifest: Manifest, batch: int, seed: int, length: int | None) -> dict:
    if length is not None and not any(isinstance(d, str) and d != "batch" for i in manifest.inputs for d in i["shape"]):
        shapes = ", ".join(f"{i['name']} {i['shape']}" for i in manifest.inputs)
        raise UsageError(f"{manifest.model}: this artifact's ONNX graph has no dynamic sequence axis to sweep "
                         f"(inputs: {shapes})")
    spec = spec_for_artifact(directory, manifest)
    return {name: t.numpy() for name, t in zip(spec.input_names, spec.example_inputs(batch, seed=seed, length=length))}


def _forward_reference(directory: Path) -> Callable[[dict], list]:
    import torch

    model, manifest = load_torch_model(directory, for_runtime=False)
    return lambda feeds: torch_outputs(model, [torch.from_numpy(feeds[spec["name"]]) for spec in manifest.inputs])


def _st_inputs(directory: Path, manifest: Manifest, batch: int, seed: int, length: int | None) -> dict:
    import numpy as np

    from .st_decode import BENCH_FRAMES, ST_CONFIG_FILE

    if batch != 1:
        raise UsageError(f"{manifest.model}: speech translation decodes one utterance at a time; use batch 1")
    width = json.loads((directory / ST_CONFIG_FILE).read_text(encoding="utf-8"))["feats_dim"]
    frames = length or BENCH_FRAMES
    feats = np.random.default_rng(seed).standard_normal((1, frames, width), dtype=np.float32)
    return {"feats": feats}


def _st_reference(directory: Path) -> Callable[[dict], list]:
    from .espnet import reference_session

    return reference_session(directory).run


def _st_outputs(manifest: Manifest) -> Sequence[str]:
    from .st_decode import ST_BENCH_OUTPUTS

    return ST_BENCH_OUTPUTS


def _textgen_inputs(directory: Path, manifest: Manifest, batch: int, seed: int, length: int | None) -> dict:
    import numpy as np

    from .textgen import BENCH_PROMPT, TEXTGEN_CONFIG_FILE

    if batch != 1:
        raise UsageError(f"{manifest.model}: text generation decodes one prompt at a time; use batch 1")
    vocab = json.loads((directory / TEXTGEN_CONFIG_FILE).read_text(encoding="utf-8"))["vocab_size"]
    return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (1, length or BENCH_PROMPT), dtype=np.int64)}


def _textgen_reference(directory: Path) -> Callable[[dict], list]:
    from .gpt2 import reference_session

    return reference_session(directory).run


WORKLOADS.add("forward", Workload(_forward_inputs, _forward_reference, lambda manifest: manifest.outputs))
WORKLOADS.add("speech-translation", Workload(_st_inputs, _st_reference, _st_outputs))
def _textgen_outputs(manifest: Manifest) -> Sequence[str]:
    from .textgen import TEXTGEN_OUTPUTS

    return TEXTGEN_OUTPUTS


WORKLOADS.add("text-generation", Workload(_textgen_inputs, _textgen_reference, _textgen_outputs))


def bench_artifact(
    directory: str | Path,
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
    counter: "itertools.count[int] | None" = None,
    total: int | None = None,
    sink: list[BenchRecord] | None = None,
) -> list[BenchRecord]:
    """Measure one exported artifact under every runtime, batch size and thread count of `grid`.

    Records are appended to `sink` (and returned) as they are measured.
    """
    directory = Path(directory).absolute()
    manifest = read_manifest(directory)
    workload = WORKLOADS.get(manifest.pipeline)
    placement = grid.placement()
    counter = counter or itertools.count(1)
    total = total or grid.configurations(placement)
    # conditions recorded with every row: software, machine, and the hardware profile it matches
    context = {"versions": library_versions(), "machine": machine_info(), "profile": current_profile().name}
    records: list[BenchRecord] = [] if sink is None else sink
    reference_of = workload.reference(directory)
    with tempfile.TemporaryDirectory(prefix="deploykit-worker-") as tmp:
        for batch, length in itertools.product(grid.batches, grid.lengths):
            feeds = workload.inputs(directory, manifest, batch, INPUT_SEED, length)
            inputs_path = Path(tmp) / f"inputs-{batch}-{length}.safetensors"
            _save_numpy(feeds, inputs_path)
            reference = reference_of(feeds)
            shape = f"batch={batch}" + (f" length={length}" if length else "")
            for target, threads in itertools.product(placement.targets, grid.threads):
                label = (
                    f"[{next(counter)}/{total}] {manifest.model} {_plan_label(manifest)} "
                    f"form={manifest.form} runtime={target.runtime} device={target.device}"
                    + (f" graph-opt={target.graph_optimization}" if target.graph_optimization else "")
                    + f" {shape} threads={threads}"
                )
                progress(label)
                result, outputs = run_worker(directory, manifest.pipeline, target, threads, batch, inputs_path,
                                             timing, Path(tmp))
                errors = max_abs_errors(reference, outputs, workload.outputs(manifest))
                if not manifest.quantization:  # quantized outputs differ by design: the error is recorded
                    check_parity(f"{target.runtime} on {target.device} vs stripped PyTorch model ({shape})", errors,
                                 manifest.parity_tolerance)
                for stage, measured in result["stages"].items():
                    record = _record(manifest, directory, target, batch, length, stage, measured, result,
                                     errors, timing, context)
                    records.append(record)  # before saying so: an interrupt may follow the message
                    progress(f"    {stage}: p50 {record.measurement.median_ms:.4f} ms, "
                             f"{len(record.measurement.samples_ns)} samples")
    return records


def run_worker(
    directory: Path, pipeline: str, target: Target, threads: int, batch: int, inputs_path: Path,
    timing: TimingSettings, tmp: Path,
) -> tuple[dict, list]:
    """Run `deploykit.worker` in a fresh interpreter; returns its result and the outputs it wrote."""
    from safetensors.numpy import load_file

    request_path = tmp / "request.json"
    outputs_path = tmp / "outputs.safetensors"
    request = {
        "artifact": str(directory),
        "pipeline": pipeline,
        "target": dataclasses.asdict(target),
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
        raise MeasurementError(f"{target.runtime} worker ({target.device}) failed on {directory}: {last}")
    outputs = load_file(str(outputs_path))
    return json.loads(proc.stdout), [outputs[f"output_{i}"] for i in range(len(outputs))]


def _save_numpy(arrays: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(path))


def _plan_label(manifest: Manifest) -> str:
    return PruningPlan(**manifest.plan).label()


def _record(manifest, directory, target, batch, length, stage, measured, result, errors, timing, context) -> BenchRecord:
    return BenchRecord(
        model=manifest.model,
        prune=_plan_label(manifest),
        sparsity=manifest.plan["amount"],
        overall_sparsity=manifest.overall_sparsity,
        form=manifest.form,
        runtime=target.runtime,
        stage=stage,
        runtime_version=result["runtime_version"],
        device=result["device"],
        batch_size=batch,
        sequence_length=length,
        threads=result["threads"],
        measurement=Measurement(tuple(measured["samples_ns"]), measured["warmup_iters"], batch,
                                measured["calls_per_sample"], measured["overhead_ns"], measured["warmup_stable"]),
        peak_rss_bytes=result["peak_rss_bytes"],
        baseline_rss_bytes=result["baseline_rss_bytes"],
        disk_bytes=sum(manifest.files[name] for name in result["files"]),
        parameters=manifest.parameters,
        nonzero_parameters=manifest.nonzero_parameters,
        parity_max_abs_error=max(errors.values(), default=0.0),
        load_s=result["load_s"],
        timing=dataclasses.asdict(timing),
        artifact=str(directory),
        metrics=dict(manifest.metrics),
        quantization=manifest.quantization.get("scheme", ""),
        graph_optimization=target.graph_optimization or "",
        **context,
    )
