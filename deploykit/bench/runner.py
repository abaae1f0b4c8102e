"""Benchmark orchestration: export each configuration, then measure it in a fresh process per runtime.

`bench_model` exports (model, plan, form) artifacts with the same `export_artifact` users run, and
`bench_artifact` measures one artifact under each runtime, batch size and thread count. Every
measurement runs in its own worker process (`deploykit.bench.worker`) so peak memory is per configuration.

What is fed and what must match depends on the artifact's pipeline (`deploykit.pipelines`): a one-graph model
gets its spec's example inputs and is compared output by output with the stripped PyTorch model; a
speech-translation pair gets 5 s of features, and its encoder output, one decoder step and its
greedy tokens are compared with the stripped model's.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from deploykit.bench.interleave import Job, paired_ratios, run_interleaved
from deploykit.bench.precision_quality import metrics_in_precision
from deploykit.bench.records import BenchRecord, FailedConfiguration, Versus
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.convert.forms import FORMS
from deploykit.convert.onnx_export import check_parity, max_abs_errors
from deploykit.core.confine import inside
from deploykit.core.contention import LoadProbe, sample_load
from deploykit.core.env import library_versions, machine_info
from deploykit.core.errors import ArtifactError, DeployKitError, MeasurementError, ParityError, UsageError
from deploykit.core.fsutil import scratch_directory
from deploykit.core.measure import Measurement
from deploykit.core.ort import CPU_PROVIDER, ort_session
from deploykit.export.build import export_artifact
from deploykit.model.artifact import ONNX_FILE, Manifest, count_weights, read_manifest, verify_artifact
from deploykit.model.onnxfile import PIPELINE, check_runnable, initializers, input_specs, is_parameter, open_onnx_file
from deploykit.model.sources import code_refusal, consent_of, inputs_for_artifact, resolve_model
from deploykit.model.spec import InputSpec, ModelSpec, value_array
from deploykit.pipelines.catalog import PIPELINES
from deploykit.prune.base import PruningPlan
from deploykit.runtime.precisions import DEFAULT_PRECISION
from deploykit.runtime.profiles import current_profile
from deploykit.runtime.session import Target

Progress = Callable[[str], None]

#: seed of the benchmark inputs (export uses 0 and 1; a third set keeps the measurement honest)
INPUT_SEED = 2


@dataclass(frozen=True)
class FailureSink:
    """Where configurations that fail go, so that one failure does not lose the rest of a run."""

    failures: list[FailedConfiguration] = dataclasses.field(default_factory=list)

    def add(self, failure: FailedConfiguration, progress: Progress) -> None:
        self.failures.append(failure)
        progress(f"    failed: {failure.error}")


def bench_model(
    model: str | ModelSpec,
    plans: Sequence[PruningPlan],
    forms: Sequence[str],
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
    sink: list[BenchRecord] | None = None,
    failures: FailureSink | None = None,
    baseline: bool = True,
    keep: str | Path | None = None,
) -> list[BenchRecord]:
    """Export every (plan, form) of `model` to a temporary artifact and benchmark them together.

    With `baseline` (the default), the unpruned model exported as it is (`BASELINE_PLAN`, form dense:
    a plan of the run that is one is used, else one more export) is measured in the same interleaved
    rounds as every variant, and each variant's rows carry their speedup over it. With `keep` (a
    directory that does not exist yet, or is empty), the artifacts are exported there and kept, one
    directory per variant, so that `report --pick --out` can copy the chosen one.
    Records are appended to `sink` (and returned) as they are measured, so a caller interrupted
    midway still holds what was measured. With `failures`, a (plan, form) whose export fails, or a
    configuration that fails, is kept there and the run goes on; without, the first failure raises.
    """

    spec = resolve_model(model) if isinstance(model, str) else model
    if any(grid.lengths):
        spec.require_sequence_axis()
    for form in forms:
        FORMS.get(form)
    grid.check_input_memory(spec.inputs, spec.name)
    variants = [(plan, form) for plan in plans for form in forms]
    if baseline and not any(is_baseline_variant(plan, form) for plan, form in variants):
        variants.insert(0, (BASELINE_PLAN, "dense"))
    total = len(variants) * grid.configurations(grid.placement())
    records: list[BenchRecord] = [] if sink is None else sink
    if keep is not None:
        keep = Path(keep)
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise UsageError(f"--keep {str(keep)!r} exists and is not an empty directory: name a new one")
        try:
            keep.mkdir(exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--keep {str(keep)!r}: cannot create it ({exc.strerror})") from None
    with scratch_directory("bench") as tmp:
        subjects, baselines = [], []
        for v, (plan, form) in enumerate(variants):
            progress(f"exporting {spec.name} {plan.label()} form={form}")
            where = (keep / _directory_name(v, plan, form)) if keep is not None else Path(tmp) / f"artifact-{v}-{form}"
            try:
                result = export_artifact(spec, plan, form, where)
            except DeployKitError as exc:
                if failures is None:
                    raise
                failures.add(FailedConfiguration(spec.name, plan.label(), form, stage="export", error=str(exc),
                                                 profile=current_profile().name), progress)
                continue
            if baseline and is_baseline_variant(plan, form) and not baselines:
                baselines.append(len(subjects))
            # the manifest was written by this run, from the user's own spec: its entry point may run
            subjects.append(artifact_subject(result.directory, consent_of(result.manifest.source)))
        if subjects:
            bench_subjects(subjects, grid, timing, progress, itertools.count(1), total, records, failures, baselines)
    return records


def _directory_name(index: int, plan: PruningPlan, form: str) -> str:
    """A kept variant's directory: its number, plan and form, in characters any file system takes."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{index:02d}-{plan.label()}-{form}")


#: the plan of the unpruned baseline every variant is measured against: nothing pruned, exported as it is
BASELINE_PLAN = PruningPlan()


def is_baseline_variant(plan: PruningPlan, form: str) -> bool:
    """Whether (plan, form) exports the unpruned model as it is: nothing pruned, form dense."""
    return plan.is_empty() and form == "dense"


def choose_baselines(subjects: Sequence["Subject"], explicit: "Subject | None" = None) -> list[int]:
    """The baseline subject of each model among `subjects`: `explicit` (which must be one of them, an
    artifact of the same model and inputs as every other subject), else, per model, the first
    artifact without pruning or quantization in form dense; a model with none has no baseline."""
    if explicit is not None:
        for subject in subjects:
            if subject is explicit:
                continue
            if subject.pipeline == PIPELINE or subject.model != explicit.model:
                what = "an ONNX file" if subject.pipeline == PIPELINE else f"of {subject.model}"
                raise UsageError(f"--baseline {explicit.location.name} is an artifact of {explicit.model}; "
                                 f"{subject.location.name} is {what}: a baseline compares variants of one model")
            if _signature(subject) != _signature(explicit):
                raise UsageError(f"--baseline {explicit.location.name} takes inputs {_signature(explicit)}, "
                                 f"{subject.location.name} takes {_signature(subject)}: not variants of one model")
        return [next(i for i, subject in enumerate(subjects) if subject is explicit)]
    chosen: dict[str, int] = {}
    for i, subject in enumerate(subjects):
        if (subject.pipeline != PIPELINE and subject.prune == "none" and subject.form == "dense"
                and not subject.quantization):
            chosen.setdefault(subject.model, i)
    return sorted(chosen.values())


def _signature(subject: "Subject") -> list[tuple]:
    return [(spec.name, spec.dtype, tuple(spec.shape), spec.values) for spec in subject.input_specs]


@dataclass(frozen=True)
class Subject:
    """One thing `bench` measures, as the measuring loop needs it: an exported artifact directory
    (`artifact_subject`) or an ONNX file as the user brought it (`onnx_file_subject`)."""

    #: what runtime loaders open: the artifact directory, or the ONNX file
    location: Path
    pipeline: str
    model: str
    prune: str
    sparsity: float
    overall_sparsity: float
    form: str
    #: post-training quantization scheme ("" for float)
    quantization: str
    parameters: int
    nonzero_parameters: int
    metrics: dict[str, float]
    #: file name -> bytes, for each file a runtime may load
    files: dict[str, int]
    #: (batch, seed, sequence length or None) -> input name -> array
    inputs: Callable[[int, int, "int | None"], dict]
    #: feeds -> the outputs every runtime is compared with
    reference: Callable[[dict], list]
    #: names of those outputs
    outputs: Sequence[str]
    #: what the reference is, for messages
    reference_label: str
    #: max abs error allowed against the reference; None: recorded, not checked
    tolerance: float | None
    #: what its inputs are, for the memory estimate of a batch size or length
    input_specs: Sequence[InputSpec] = ()
    #: why torch may not rebuild its PyTorch model (code it names, no consent); None: it may
    torch_refusal: str | None = None
    #: entry points torch may import for it
    consent: tuple[str, ...] = ()
    #: target -> (its metrics measured in the target's runtime and precision, or {} and a note saying
    #: why not): the quality of rows in another precision than f32 (None: the subject has no metrics)
    metrics_in: "Callable[[Target], tuple[dict[str, float], str | None]] | None" = None


def _plan_of(directory: Path, manifest: Manifest) -> PruningPlan:
    try:
        return PruningPlan(**manifest.plan)
    except (TypeError, ValueError, UsageError) as exc:
        raise ArtifactError(f"{str(directory)!r}: the manifest's pruning plan is malformed ({exc})") from None


def _ort_reference(path: Path) -> Callable[[dict], list]:
    """onnxruntime on the CPU running the graph as written (optimisations off): the reference where
    there is no PyTorch model to compare with."""
    session = ort_session(path, 1, provider=CPU_PROVIDER, optimization="disabled")
    return lambda feeds: session.run(None, feeds)


def artifact_subject(directory: str | Path, consent: Sequence[str] = (), verify: bool = True) -> Subject:
    """An exported artifact, compared with its stripped PyTorch model (loaded once, here).

    Its files are checked against the manifest's sizes and checksums first (unless `verify` is
    off), and its counts come from its weights file, not from the manifest. Where its PyTorch model
    needs code the artifact names and the user gave no `consent`, torch is left out and the
    onnxruntime rows are compared with onnxruntime running the graph as written."""
    directory = Path(directory).absolute()
    manifest = read_manifest(directory)
    if verify:
        verify_artifact(directory, manifest)
    pipeline = PIPELINES.get(manifest.pipeline)
    plan = _plan_of(directory, manifest)
    parameters, nonzero = count_weights(directory, manifest)
    refusal = code_refusal(directory, manifest, consent)
    if refusal and pipeline.single_graph:
        reference = _ort_reference(inside(directory, ONNX_FILE, "model"))
        label = "onnxruntime CPU, graph optimisations disabled (no PyTorch model without --trust-code)"
    else:
        reference, label = pipeline.reference(directory, consent), "stripped PyTorch model"
    return Subject(
        location=directory, pipeline=manifest.pipeline, model=manifest.model, prune=plan.label(),
        sparsity=plan.amount, overall_sparsity=1 - nonzero / parameters if parameters else 0.0, form=manifest.form,
        quantization=str(manifest.quantization.get("scheme", "")), parameters=parameters,
        nonzero_parameters=nonzero, metrics=dict(manifest.metrics),
        files={name: inside(directory, name, "file").stat().st_size for name in manifest.files},
        inputs=lambda batch, seed, length: pipeline.inputs(directory, manifest, batch, seed, length),
        reference=reference, outputs=pipeline.outputs(manifest), reference_label=label,
        # quantized outputs differ by design: the error is recorded, not checked
        tolerance=None if manifest.quantization else manifest.parity_tolerance,
        input_specs=inputs_for_artifact(directory, manifest).inputs, torch_refusal=refusal, consent=tuple(consent),
        metrics_in=lambda target: metrics_in_precision(directory, manifest, consent, target),
    )


def onnx_file_subject(path: str | Path, inputs: Sequence[InputSpec] = (), values: dict[str, str] | None = None,
                      ) -> Subject:
    """An ONNX file as it is (external data checked first). It has no PyTorch model: every runtime
    configuration is compared with onnxruntime on the CPU running the graph as written (optimisations
    disabled), so a provider or optimisation level that changes the results shows in the record."""
    import numpy as np


    path = Path(path).absolute()
    model = open_onnx_file(path)
    check_runnable(model)
    # a session loads the graph and its external data together: one entry, so the worker need not
    # parse the graph again to list the data files it read
    files = {path.name: sum(model.files().values())}
    specs = input_specs(model, inputs, values)
    rows = [r for r in initializers(model) if is_parameter(r)]
    parameters, nonzero = sum(r.numel for r in rows), sum(r.nonzero for r in rows)
    reference = _ort_reference(path)
    outputs = [o.name for o in model.proto.graph.output]

    def feeds(batch: int, seed: int, length: int | None) -> dict:
        if batch != 1 and not any("batch" in spec.shape for spec in specs):
            shapes = ", ".join(f"{s.name} {tuple(s.shape)}" for s in specs)
            raise UsageError(f"{path.name} has no batch axis to set to {batch} (inputs: {shapes}); bench it at "
                             "--batch 1, or name its first axis 'batch' with --input-spec")
        rng = np.random.default_rng(seed)
        out = {}
        for spec in specs:
            if length is None and spec.sequence_axes:
                raise UsageError(f"input {spec.name!r} of {path.name} has dynamic axes {', '.join(spec.sequence_axes)}: "
                                 "give their size with --seq-len N (or fix them with --input-spec)")
            shape = spec.concrete_shape(batch, length)
            if spec.values is not None:  # --input-value: a setting, a mask, positions
                out[spec.name] = value_array(spec, shape, rng)
                continue
            out[spec.name] = (rng.integers(0, spec.high, shape).astype(spec.dtype) if spec.dtype.startswith("int")
                              else rng.standard_normal(shape).astype(spec.dtype))
        return out

    return Subject(
        location=path, pipeline=PIPELINE, model=path.name, prune="none", sparsity=0.0,
        overall_sparsity=1 - nonzero / parameters if parameters else 0.0, form="onnx", quantization="",
        parameters=parameters, nonzero_parameters=nonzero, metrics={}, files=files, inputs=feeds,
        reference=reference, outputs=outputs,
        reference_label="onnxruntime CPU, graph optimisations disabled", tolerance=None, input_specs=specs,
    )


def bench_artifact(
    target: "str | Path | Subject",
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
    *,
    consent: Sequence[str] = (),
    verify: bool = True,
    **options,
) -> list[BenchRecord]:
    """Measure an exported artifact directory (or any `Subject`, such as `onnx_file_subject(path)`)
    under every runtime that can run it, batch size and thread count of `grid`: `bench_subjects` of
    one subject, whose `options` (counter, total, sink, failures) it takes. `consent` names the entry
    points torch may import to rebuild an artifact's model (see `deploykit.model.sources.code_refusal`);
    `verify` checks the artifact's files against its manifest first.
    """
    subject = target if isinstance(target, Subject) else artifact_subject(target, consent, verify)
    return bench_subjects([subject], grid, timing, progress, **options)


def bench_subjects(
    subjects: Sequence[Subject],
    grid: Grid,
    timing: TimingSettings = TimingSettings(),
    progress: Progress = lambda message: None,
    counter: "itertools.count[int] | None" = None,
    total: int | None = None,
    sink: list[BenchRecord] | None = None,
    failures: FailureSink | None = None,
    baselines: Sequence[int] = (),
) -> list[BenchRecord]:
    """Measure every subject under every runtime that can run it, batch size and thread count of
    `grid`, comparing each configuration's outputs with the subject's reference.

    For each shape (batch, length), all configurations of all subjects are measured together in
    interleaved rounds (`deploykit.bench.interleave`), so that ratios between them hold on a busy machine.
    `baselines` are the indices of the unpruned subjects (one per model, see `choose_baselines`): every
    other subject of the same model is compared with its baseline in each configuration, and its rows
    carry the speedup per round (`Versus`); the baseline's configurations are measured in every group
    of workers, so that each variant's rounds interleave with its baseline's whatever the memory bound.
    Records are appended to `sink` (and returned) as they are measured. With `failures`, a
    configuration that fails (its worker, or its parity) is kept there and the others still count; a
    parity failure keeps its measured rows too, marked with the error.
    """
    placement = grid.placement()
    plans = []  # (subject, its targets)
    for subject in subjects:
        targets = [t for t in placement.targets if t.runtime in PIPELINES.get(subject.pipeline).loaders]
        for runtime in sorted({t.runtime for t in placement.targets} - {t.runtime for t in targets}):
            progress(f"note: {runtime} cannot run {subject.pipeline} ({subject.location.name}): skipped")
        if subject.torch_refusal and any(t.runtime == "torch" for t in targets):
            progress(f"warning: torch skipped: {subject.torch_refusal}")
            targets = [t for t in targets if t.runtime != "torch"]
        if not targets:
            raise UsageError(f"no runtime of {', '.join(grid.runtimes)} runs {subject.pipeline} "
                             f"({subject.location.name})")
        grid.check_input_memory(subject.input_specs, subject.model)
        plans.append((subject, [dataclasses.replace(t, code_consent=subject.consent) for t in targets]))
    counter = counter or itertools.count(1)
    total = total or sum(len(targets) for _, targets in plans) * len(grid.batches) * len(grid.threads) * len(grid.lengths)
    # conditions recorded with every row: software, machine, and the hardware profile it matches
    context = {"versions": library_versions(), "machine": machine_info(), "profile": current_profile().name}
    records: list[BenchRecord] = [] if sink is None else sink
    quality = _PrecisionQuality(progress)
    with scratch_directory("worker") as tmp:
        # every shape is built before anything is measured: one a subject cannot take fails now, not
        # after minutes of measuring the others
        shapes = {(i, batch, length): subject.inputs(batch, INPUT_SEED, length)
                  for i, (subject, _) in enumerate(plans) for batch, length in itertools.product(grid.batches, grid.lengths)}
        for batch, length in itertools.product(grid.batches, grid.lengths):
            shape = f"batch={batch}" + (f" length={length}" if length else "")
            jobs, owners = [], []
            for i, (subject, targets) in enumerate(plans):
                inputs_path = Path(tmp) / f"inputs-{i}-{batch}-{length}.safetensors"
                _save_numpy(shapes[i, batch, length], inputs_path)
                for target, threads in itertools.product(targets, grid.threads):
                    label = (f"[{next(counter)}/{total}] {subject.model} {subject.prune} form={subject.form} "
                             f"runtime={target.runtime} device={target.device}"
                             + (f" graph-opt={target.graph_optimization}" if target.graph_optimization else "")
                             + (f" precision={target.precision}" if target.precision != DEFAULT_PRECISION else "")
                             + f" {shape} threads={threads}")
                    progress(label)
                    jobs.append(Job(subject.location, subject.pipeline, dataclasses.replace(target, batch=batch),
                                    threads, batch, inputs_path, sum(subject.files.values()), label))
                    owners.append(i)
            anchor_of = {_configuration(plans[i][0], job): k for k, (job, i) in enumerate(zip(jobs, owners))
                         if i in baselines}
            before = sample_load()
            probe = LoadProbe()
            outcomes = run_interleaved(jobs, dataclasses.asdict(timing), Path(tmp) / f"{batch}-{length}", progress,
                                       anchors=sorted(anchor_of.values()))
            during = probe.stop()
            for when, load in (("before", before), ("during", during)):
                if load.disturbed:
                    progress(f"    warning: {when} these configurations {load.describe()}: their figures may be "
                             "inflated (close other programs, or use fewer --threads)")
            load_record = {"before": before.to_dict(), "during": during.to_dict()}
            references = {}
            for job, i, outcome in zip(jobs, owners, outcomes):
                subject = plans[i][0]

                def failed(error: str) -> FailedConfiguration:
                    return FailedConfiguration(
                        subject.model, subject.prune, subject.form, runtime=job.target.runtime,
                        device=job.target.device, batch_size=batch, threads=job.threads, sequence_length=length,
                        stage="measure", error=error, artifact=str(subject.location), profile=context["profile"],
                        precision=job.target.precision)

                if isinstance(outcome, MeasurementError):
                    if failures is None:
                        raise outcome
                    failures.add(failed(str(outcome)), progress)
                    continue
                result, outputs = outcome
                if i not in references:
                    references[i] = subject.reference(shapes[i, batch, length])
                errors = max_abs_errors(references[i], outputs, subject.outputs)
                anchor = anchor_of.get(_configuration(subject, job))
                theirs = None if i in baselines or anchor is None else outcomes[anchor]
                metrics = quality.of(i, subject, job.target)
                for stage, measured in result["stages"].items():
                    record = _record(subject, job.target, batch, length, stage, measured, result, errors, timing,
                                     {**context, "load": load_record, "baseline": i in baselines, "metrics": metrics,
                                      "versus": _versus(plans[owners[anchor]][0], theirs, result, stage)
                                      if isinstance(theirs, tuple) else None})
                    records.append(record)  # before saying so: an interrupt may follow the message
                    progress(f"    {job.label.split('] ', 1)[1]} {stage}: p50 {record.measurement.median_ms:.4f} ms, "
                             f"{len(record.measurement.samples_ns)} samples")
                if subject.tolerance is not None and job.target.precision == DEFAULT_PRECISION:
                    try:
                        check_parity(f"{job.target.runtime} on {job.target.device} vs {subject.reference_label} "
                                     f"({shape})", errors, subject.tolerance)
                    except ParityError as exc:
                        if failures is None:
                            raise
                        failures.add(failed(f"{exc} (its rows are kept, marked wrong)"), progress)
    return records


class _PrecisionQuality:
    """The metrics each row carries: the subject's own (measured at export, in f32) for f32 rows; for
    rows in another precision, those measured in it (once per subject, runtime, device and precision)."""

    def __init__(self, progress: Progress):
        self.progress, self.measured = progress, {}

    def of(self, index: int, subject: Subject, target: Target) -> dict[str, float]:
        if target.precision == DEFAULT_PRECISION or not subject.metrics:
            return dict(subject.metrics)
        key = index, target.runtime, target.device, target.precision
        if key not in self.measured:
            if subject.metrics_in is None:
                self.measured[key] = {}, f"quality at {target.precision} not measured for {subject.model}"
            else:
                self.progress(f"measuring {subject.model} {subject.prune} form={subject.form}'s quality under "
                              f"{target.runtime} at {target.precision}")
                try:
                    self.measured[key] = subject.metrics_in(target)
                except DeployKitError as exc:  # its rows are measured: keep them, without the quality
                    self.measured[key] = {}, f"quality under {target.runtime} at {target.precision} not measured: {exc}"
            if self.measured[key][1]:
                self.progress(f"    note: {self.measured[key][1]}")
        return dict(self.measured[key][0])


def _configuration(subject: Subject, job: Job) -> tuple:
    """What a variant and its baseline share when one is measured against the other."""
    return subject.model, dataclasses.replace(job.target, code_consent=()), job.threads


def _versus(baseline: Subject, outcome: tuple[dict, list], result: dict, stage: str) -> Versus | None:
    """What a configuration buys over the baseline's same configuration, from their paired rounds."""
    theirs = outcome[0]
    if stage not in theirs["stages"]:
        return None
    return Versus(
        artifact=str(baseline.location), prune=baseline.prune,
        form=baseline.form + (f"+{baseline.quantization}" if baseline.quantization else ""),
        p50_ms=statistics.median(theirs["stages"][stage]["samples_ns"]) / 1e6,
        disk_bytes=sum(baseline.files[name] for name in theirs["files"]), metrics=dict(baseline.metrics),
        round_ratios=tuple(paired_ratios(theirs, result, stage)))


def _save_numpy(arrays: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(path))


def _record(subject: Subject, target, batch, length, stage, measured, result, errors, timing, context) -> BenchRecord:
    return BenchRecord(
        model=subject.model,
        prune=subject.prune,
        sparsity=subject.sparsity,
        overall_sparsity=subject.overall_sparsity,
        form=subject.form,
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
        disk_bytes=sum(subject.files[name] for name in result["files"]),
        parameters=subject.parameters,
        nonzero_parameters=subject.nonzero_parameters,
        parity_max_abs_error=max(errors.values(), default=0.0),
        # a reduced precision's outputs differ by design: its error is recorded, its quality measured in it
        parity_tolerance=subject.tolerance if target.precision == DEFAULT_PRECISION else None,
        load_s=result["load_s"],
        timing=dataclasses.asdict(timing),
        artifact=str(subject.location),
        quantization=subject.quantization,
        graph_optimization=target.graph_optimization or "",
        precision=target.precision,
        input_values={spec.name: spec.values for spec in subject.input_specs if spec.values is not None},
        **context,
    )
