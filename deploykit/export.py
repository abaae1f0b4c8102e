"""The export pipeline: build -> prune -> strip -> convert -> export ONNX -> check -> write.

`export_artifact` is what `deploykit export` runs, and what `deploykit bench` runs for each
configuration, so a benchmark measures exactly what a user would ship.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .artifact import (MANIFEST_FILE, ONNX_FILE, WEIGHTS_FILE, Manifest, file_sizes, owned_artifact, read_manifest,
                       with_file_records)
from .env import library_versions
from .errors import QualityError, UsageError
from .forms import FORMS, Converted
from .fsutil import atomic_directory, check_writable_destination, write_text_atomic
from .onnx_export import (
    DEFAULT_OPSET,
    FORM_TOLERANCE,
    ONNX_TOLERANCE,
    SUPPORTED_OPSETS,
    check_parity,
    export_onnx,
    max_abs_errors,
    relative_errors,
    save_optimized as save_optimized_graph,
    sparsify_initializers,
    torch_outputs,
    trivial_outputs,
)
from .prune import PruneResult, PruningPlan, detect_output_layers, prune_model, strip_masks
from .runtime import GRAPH_OPTIMIZATIONS, ort_session
from .sparsity import SparsityTable, sparsity_table
from .sources import consent_of, resolve_model
from .spec import ONE_PASS_PIPELINES, TRACE_BATCH, ModelSpec
from .storage import CODECS, save_weights
from .summary import count_flops, count_parameters, count_sparse_flops, module_shapes, shape_changes

Progress = Callable[[str], None]

#: a different batch size for the parity inputs proves the exported batch axis is really dynamic
PARITY_BATCH = 3


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    manifest: Manifest
    prune_result: PruneResult
    #: per-parameter sparsity of the pruned (stripped) model
    table: SparsityTable
    #: quality of the pruned model, when the model spec has an evaluator
    metrics: dict[str, float]


def export_artifact(
    model: str | ModelSpec,
    plan: PruningPlan,
    form: str,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = ONNX_TOLERANCE,
    overwrite: bool = False,
    best_effort: bool = False,
    compression: str | None = None,
    kernel_batch: int = 1,
    quantize: str | None = None,
    per_channel: bool = False,
    save_optimized: str | None = None,
    strict: bool = False,
    progress: Progress = lambda message: None,
) -> ExportResult:
    """Prune `model` by `plan`, convert it to `form`, export it and write `out_dir` atomically.

    Raises `ParityError` (and writes nothing) when ONNX Runtime or the converted PyTorch model
    disagree with the stripped model beyond tolerance. `best_effort` lets dense-shrunk leave groups
    it cannot shrink dense (with a warning) instead of failing. `compression` ("zlib", "lzma")
    compresses the weights file losslessly. `kernel_batch` is the batch size csr measures its
    per-layer kernel choice at. `quantize` ("int8") quantizes the exported graph (and the torch
    runtime's Linear layers when it loads the artifact); its error and metric change are recorded.
    `save_optimized` (an onnxruntime graph optimisation level) saves each graph as onnxruntime
    optimises it, beside the original. Outputs that are zero or constant on the parity inputs (a
    parity check on them proves nothing) are a warning in the manifest, and with `strict` an error.
    """
    spec = resolve_model(model) if isinstance(model, str) else model
    form_entry = FORMS.get(form)
    if spec.forms is not None and form not in spec.forms:
        raise UsageError(f"model {spec.name!r} supports forms {', '.join(spec.forms)}, not {form!r}")
    if not tolerance >= 0:
        raise UsageError(f"tolerance must be >= 0, got {tolerance:g}")
    if opset not in SUPPORTED_OPSETS:
        raise UsageError(f"opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    if compression is not None and compression not in CODECS:
        raise UsageError(f"unknown compression {compression!r}; known: {', '.join(CODECS)}")
    if kernel_batch < 1:
        raise UsageError(f"kernel batch must be >= 1, got {kernel_batch}")
    if quantize is not None:
        from .quantize import QUANTIZERS

        if spec.pipeline not in QUANTIZERS.get(quantize).pipelines:
            raise UsageError(f"--quantize {quantize} quantizes {', '.join(QUANTIZERS.get(quantize).pipelines)} "
                             f"artifacts, not {spec.pipeline} ({spec.name}); use int8 (dynamic)")
        if form_entry.sparse_onnx:
            raise UsageError(f"--quantize needs form dense or dense-shrunk, not {form!r}: int8 weights are "
                             "stored dense (4x smaller than float already)")
    elif per_channel:
        raise UsageError("--per-channel applies to --quantize")
    if save_optimized is not None and save_optimized not in GRAPH_OPTIMIZATIONS:
        raise UsageError(f"unknown graph optimisation {save_optimized!r}; choose from {', '.join(GRAPH_OPTIMIZATIONS)}")
    if plan.at_init and spec.train is None:
        raise UsageError(f"--at-init trains the pruned model, and {spec.name} has no training hook")
    replacing = check_writable_destination(out_dir, overwrite, owned_artifact).exists()

    if plan.at_init:
        progress(f"building {spec.name} (initial weights)")
    else:
        progress(f"building {spec.name}" + (" (training on first use)" if spec.train else ""))
    net = spec.make(trained=not plan.at_init)
    trace_inputs = spec.example_inputs(TRACE_BATCH, seed=0)
    parity_inputs = spec.example_inputs(PARITY_BATCH, seed=1)

    progress(f"pruning: {plan.label()} ({plan.scope})" + (" at initialisation" if plan.at_init else ""))
    result = prune_model(net, plan, trace_inputs, spec.output_layers, spec=spec)
    if plan.at_init:
        progress("training the pruned model (masks in force)")
        _train_with_masks(spec, net)
    table = sparsity_table(net, result.pruned_parameters)
    strip_masks(net)
    metrics = spec.evaluate(net) if spec.evaluate else {}

    options = {"keep": list(spec.output_layers) or detect_output_layers(net, trace_inputs),
               "best_effort": best_effort, "kernel_batch": kernel_batch}
    step = _convert(spec, net, form_entry, trace_inputs, parity_inputs, options, progress)
    warnings = [f"{problem}: parity on it proves nothing" for problem in trivial_outputs(step.reference, spec.outputs)]
    for warning in warnings:
        progress(f"warning: {warning}")
    if warnings and strict:
        raise QualityError(f"{spec.name}: {warnings[0]} (--strict)")
    saved = step.converted.module.eval()
    parameters, nonzero = count_parameters(saved)

    with atomic_directory(out_dir, overwrite, owned_artifact, notes=progress) as tmp:
        progress(f"exporting ONNX (opset {opset})")
        notes = _form_notes(form)
        if result.collapsed_layers:
            notes.append(f"layers pruned to 100% (allowed by the plan): {', '.join(result.collapsed_layers)}")
        inputs = [dataclasses.asdict(i) for i in spec.inputs]
        relative = {}
        if spec.export is None:
            onnx_errors, relative, sparse_initializers, fixed = _export_single_graph(
                spec, saved, tmp, trace_inputs, parity_inputs, step.reference, opset, tolerance,
                form_entry.sparse_onnx, progress)
            if fixed:
                notes.append(f"sequence axes fixed at the traced lengths: the traced graph {fixed}")
                inputs = _fixed_length_inputs(spec, trace_inputs)
        else:  # encoder/decoder pairs: the spec's exporter sparsifies (if asked) before it checks parity
            onnx_errors, sparse_initializers = spec.export(saved, tmp, opset, tolerance, form_entry.sparse_onnx)
        source = spec.bundle(tmp) if spec.bundle is not None else _registered_source(spec)

        progress("writing weights")
        encoded = save_weights(saved.state_dict(), tmp / WEIGHTS_FILE, form_entry.encoding, compression)
        manifest = Manifest(
            model=spec.name,
            form=form,
            plan=dataclasses.asdict(plan),
            pruned_parameters=list(result.pruned_parameters),
            excluded_modules=list(result.excluded_modules),
            sparsity=[_sparsity_row(row) for row in table.rows],
            # figures of the shipped (converted) model; the pruned model's before it, under explicit names
            parameters=parameters,
            nonzero_parameters=nonzero,
            overall_sparsity=1 - nonzero / parameters if parameters else 0.0,
            pruned_sparsity=_zeros_share(saved, result.pruned_parameters),
            parameters_before_conversion=table.parameters,
            nonzero_parameters_before_conversion=table.nonzero,
            overall_sparsity_before_conversion=table.overall,
            pruned_sparsity_before_conversion=table.pruned_overall,
            flops_before_conversion=step.flops_before,
            flops=step.flops_after,
            sparse_flops=step.sparse_flops,
            sparse_flops_before_conversion=step.sparse_flops_before,
            remaining_flops_fraction=(step.sparse_flops / step.flops_before
                                      if step.sparse_flops is not None and step.flops_before else None),
            form_recipe=step.converted.recipe,
            conversion=step.converted.summary,
            shape_changes=step.shape_changes,
            converted_layers=step.swapped,
            weight_encodings={enc.name: enc.kind for enc in encoded},
            weight_bytes={enc.name: enc.payload_bytes for enc in encoded},
            weight_compression=compression,
            onnx_sparse_initializers=sparse_initializers,
            inputs=inputs,
            outputs=list(spec.outputs),
            opset=opset,
            files=file_sizes(tmp),
            onnx_parity_max_abs_error=onnx_errors,
            onnx_parity_max_rel_error=relative,
            warnings=warnings,
            form_parity_max_abs_error=step.form_errors,
            parity_tolerance=tolerance,
            versions=library_versions(),
            created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            metrics=metrics,
            pipeline=spec.pipeline,
            source=source,
            notes=notes,
        )
        write_text_atomic(tmp / MANIFEST_FILE, manifest.to_json())
        if quantize is not None:  # measured against the float artifact, which is complete at this point
            from .quantize import quantize_artifact

            # the source record was made this run from the user's own spec: its entry point may run
            manifest = quantize_artifact(tmp, manifest, quantize, per_channel, progress, consent_of(source))
            write_text_atomic(tmp / MANIFEST_FILE, manifest.to_json())
        if save_optimized is not None:  # of the graphs as shipped (quantized, if they are)
            progress(f"saving onnxruntime's {save_optimized}-optimised graphs")
            saved_graphs = [save_optimized_graph(tmp / name, save_optimized).name
                            for name in manifest.files if name.endswith(".onnx")]
            note = (f"onnxruntime's {save_optimized}-optimised graphs saved beside the originals: "
                    f"{', '.join(saved_graphs)}" + (" (level all adds layouts for this machine's CPU)"
                                                    if save_optimized == "all" else ""))
            manifest = dataclasses.replace(manifest, notes=[*manifest.notes, note])
        # the files are final: their sizes and checksums go into the manifest, checked before each use
        write_text_atomic(tmp / MANIFEST_FILE, with_file_records(manifest, tmp).to_json())
        manifest = read_manifest(tmp)  # hand back exactly what is on disk (JSON lists, not tuples)
    progress(f"wrote {out_dir}" + (" (replacing the artifact that was there)" if replacing else ""))
    return ExportResult(Path(out_dir), manifest, result, table, metrics)


def _train_with_masks(spec: ModelSpec, net) -> None:
    """The spec's training, seeded as its own, on a model whose pruning masks stay in force."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        spec.train(net)
    net.eval()


@dataclass(frozen=True)
class _Converted:
    converted: Converted
    swapped: list[str]
    form_errors: dict[str, float]
    #: stripped model's outputs on the parity inputs
    reference: list | None
    flops_before: int | None
    flops_after: int | None
    shape_changes: dict = dataclasses.field(default_factory=dict)
    #: FLOPs with zero weights' multiply-adds left out: of the stripped model, and of the converted one
    sparse_flops_before: int | None = None
    sparse_flops: int | None = None


def _convert(spec, net, form_entry, trace_inputs, parity_inputs, options, progress) -> _Converted:
    """Convert the stripped model to the form and check the PyTorch side against it.

    FLOPs are counted for one-graph models only: an encoder/decoder pair's cost depends on how many
    tokens it decodes, which no single traced pass says.
    """
    one_item = spec.example_inputs(1, seed=0)
    reference = torch_outputs(net, parity_inputs)
    one_pass = spec.pipeline in ONE_PASS_PIPELINES
    flops = (lambda module: count_flops(module, one_item)) if one_pass else (lambda module: None)
    shapes_before, flops_before = module_shapes(net), flops(net)
    sparse_flops = (lambda module: count_sparse_flops(module, one_item)) if one_pass else (lambda module: None)
    sparse_flops_before = sparse_flops(net)
    progress(f"converting to form {form_entry.name!r}")
    converted = form_entry.convert(net, spec, trace_inputs, options)
    saved = converted.module.eval()
    # the PyTorch module as it will run at the batch its kernels were chosen for
    kernel_inputs = spec.example_inputs(options["kernel_batch"], seed=0)
    runtime_module, swapped = form_entry.for_torch(copy.deepcopy(saved), kernel_inputs, converted.recipe)
    form_errors = max_abs_errors(reference, torch_outputs(runtime_module, parity_inputs), spec.outputs)
    check_parity(f"form {form_entry.name!r} vs stripped model", form_errors, FORM_TOLERANCE)
    return _Converted(converted, swapped, form_errors, reference, flops_before, flops(saved),
                      shape_changes(shapes_before, module_shapes(saved)), sparse_flops_before, sparse_flops(saved))


def _export_single_graph(spec, saved, tmp, trace_inputs, parity_inputs, reference, opset, tolerance, sparse, progress):
    """model.onnx from one forward pass, optionally with sparse initializers, checked against PyTorch.

    A graph that declares a sequence axis dynamic must work at a length it was not traced with;
    where tracing baked the length in (torch's nn.MultiheadAttention does, for one), the graph is
    exported again with those axes fixed. Returns (max abs error per output, that error relative to
    the output's largest value, sparse initializer name -> nonzeros, how the graph failed at another
    length or "").
    """
    def export(sequence: bool) -> None:
        export_onnx(saved, trace_inputs, tmp / ONNX_FILE, input_names=spec.input_names, output_names=spec.outputs,
                    dynamic_axes=spec.dynamic_axes(sequence), opset=opset)

    export(sequence=True)
    problem = _sequence_axes_problem(spec, saved, tmp / ONNX_FILE, trace_inputs, tolerance)
    if problem:
        progress(f"sequence axes fixed: the traced graph {problem}")
        export(sequence=False)
    sparse_initializers = sparsify_initializers(tmp / ONNX_FILE) if sparse else {}
    progress("checking onnxruntime against PyTorch")
    session = ort_session(tmp / ONNX_FILE, threads=1)
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, parity_inputs)}
    errors = max_abs_errors(reference, session.run(None, feeds), spec.outputs)
    check_parity("onnxruntime vs PyTorch", errors, tolerance)
    return errors, relative_errors(reference, errors, spec.outputs), sparse_initializers, problem


def _fixed_length_inputs(spec, trace_inputs) -> list[dict]:
    """The manifest's input records with sequence axes at the traced sizes (only "batch" stays named)."""
    return [{**dataclasses.asdict(s), "shape": [dim if dim == "batch" else size for dim, size in zip(s.shape, t.shape)]}
            for s, t in zip(spec.inputs, trace_inputs)]


#: how much longer than traced the sequence-axis check runs the graph
_LENGTH_CHECK_OFFSET = 3


def _sequence_axes_problem(spec, model, path, trace_inputs, tolerance) -> str:
    """How the exported graph fails at a sequence length other than the traced one; "" if it does
    not, if the model has no sequence axis, or if the PyTorch model itself refuses that length."""
    traced = [t.shape[d] for s, t in zip(spec.inputs, trace_inputs)
              for d, dim in enumerate(s.shape) if dim in s.sequence_axes]
    if not traced:
        return ""
    length = max(traced) + _LENGTH_CHECK_OFFSET
    inputs = spec.example_inputs(1, seed=1, length=length)
    try:
        reference = torch_outputs(model, inputs)
    except Exception:  # noqa: BLE001 - the model's own limit (positions, subsampling): nothing to check
        return ""
    try:
        outputs = ort_session(path, threads=1, probe=True).run(None, {n: t.numpy() for n, t in zip(spec.input_names, inputs)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the first line says why
        return f"fails at length {length} ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})"
    errors = max_abs_errors(reference, outputs, spec.outputs)
    worst = max(errors, key=errors.get)
    if not errors[worst] <= tolerance:
        return f"gives wrong {worst!r} at length {length} (max abs error {errors[worst]:.2e})"
    return ""


def _registered_source(spec: ModelSpec) -> dict:
    """A zoo model is rebuilt by name; a spec built in Python (a library call) cannot be found again
    from the artifact alone, and its manifest says so."""
    from .spec import MODELS

    return {"kind": "zoo"} if spec.name in MODELS and MODELS.get(spec.name) is spec else {"kind": "library"}


def _zeros_share(model, names) -> float:
    """Zeros over the named parameters as `model` holds them (0 when it names none)."""
    params = dict(model.named_parameters())
    tensors = [params[name] for name in names if name in params]
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


def _sparsity_row(row) -> dict:
    return {**dataclasses.asdict(row), "sparsity": row.sparsity}


def _form_notes(form: str) -> list[str]:
    if form == "csr":
        # Said in every csr manifest because users read ORT figures of a csr artifact as sparse speed.
        return ["onnxruntime densifies sparse initializers at load: its figures are dense-kernel speed"]
    return []
