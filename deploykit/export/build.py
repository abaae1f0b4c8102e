"""The export pipeline: build -> prune -> strip -> convert -> export ONNX -> check -> write.

`export_artifact` is what `deploykit export` runs, and what `deploykit bench` runs for each
configuration, so a benchmark measures exactly what a user would ship.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deploykit.convert.forms import DEFAULT_KERNEL_BATCH, FORMS, Converted
from deploykit.convert.onnx_export import (
    check_parity,
    max_abs_errors,
    save_optimized as save_optimized_graph,
    torch_outputs,
    trivial_outputs,
)
from deploykit.convert.onnx_settings import DEFAULT_OPSET, ONNX_TOLERANCE, SUPPORTED_OPSETS, form_tolerance
from deploykit.convert.quantize import OPERATOR_CHOICES, QUANTIZERS
from deploykit.core.env import library_versions
from deploykit.core.errors import QualityError, UsageError
from deploykit.core.fsutil import atomic_directory, check_writable_destination, write_text_atomic
from deploykit.core.ort import GRAPH_OPTIMIZATIONS
from deploykit.core.sparsity import SparsityTable, sparsity_table
from deploykit.core.storage import CODECS, save_weights
from deploykit.export.quantization import quantize_artifact
from deploykit.model.artifact import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    file_sizes,
    owned_artifact,
    read_manifest,
    with_file_records,
)
from deploykit.model.hints import hints_of
from deploykit.model.sources import consent_of, resolve_model
from deploykit.model.spec import FOLDED_ATTRIBUTE, MODELS, TRACE_BATCH, ModelSpec
from deploykit.model.summary import (
    count_flops,
    count_parameters,
    count_sparse_flops,
    flop_count,
    module_shapes,
    shape_changes,
)
from deploykit.pipelines.base import ExportRequest
from deploykit.pipelines.catalog import PIPELINES
from deploykit.prune.base import PRUNERS, PruneResult, PruningPlan, prune_model, strip_masks, unpruned_weights

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
    kernel_batch: int = DEFAULT_KERNEL_BATCH,
    quantize: str | None = None,
    per_channel: bool = False,
    quantize_operators: str = "measured",
    save_optimized: str | None = None,
    strict: bool = False,
    alignment: dict | None = None,
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
    `alignment` (what `deploykit.bench.alignment.choose_round_to` measured) is recorded in the form
    recipe.
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
    pipeline = PIPELINES.get(spec.pipeline)
    if quantize is not None:
        quantizer = QUANTIZERS.get(quantize)  # an unknown name lists the known ones
        if quantize_operators not in OPERATOR_CHOICES:
            raise UsageError(f"quantize operators must be one of {', '.join(OPERATOR_CHOICES)}, not {quantize_operators!r}")
        if per_channel and quantizer.no_per_channel:
            raise UsageError(f"--per-channel does not apply to --quantize {quantize}: {quantizer.no_per_channel}")
        if quantize not in pipeline.quantizers:
            raise UsageError(f"--quantize {quantize} does not apply to {spec.pipeline} artifacts ({spec.name}); "
                             f"they take: {', '.join(pipeline.quantizers) or 'none'}")
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
    folded = list(getattr(net, FOLDED_ATTRIBUTE, ()))
    training = spec.training_record(None if plan.at_init else net)
    trace_inputs = spec.example_inputs(TRACE_BATCH, seed=0)
    parity_inputs = spec.example_inputs(PARITY_BATCH, seed=1)

    progress(f"pruning: {plan.described()}" + (" at initialisation" if plan.at_init else "")
             + (" (on calibration data)" if plan.uses_calibration else ""))
    started = time.perf_counter()
    result = prune_model(net, plan, trace_inputs, spec.output_layers, spec=spec)
    pruning = pruning_record(result, time.perf_counter() - started)
    if plan.at_init:
        progress("training the pruned model (masks in force)")
        _train_with_masks(spec, net)
    table = sparsity_table(net, result.pruned_parameters)
    unpruned = unpruned_weights(net, result, hints_of(spec))
    strip_masks(net)
    metrics = {**(spec.evaluate(net) if spec.evaluate else {}), **pruning.get("agreement", {})}

    # the output layers prune_model found (pruning masks do not change which layers produce outputs)
    options = {"keep": list(result.output_layers),
               "best_effort": best_effort, "kernel_batch": kernel_batch, "graph_timeout_s": plan.graph_timeout_s}
    step = _convert(spec, net, form_entry, trace_inputs, parity_inputs, options, pipeline.one_pass, progress)
    warnings = [f"{problem}: parity on it proves nothing"
                for problem in trivial_outputs(step.reference, spec.outputs, tolerance)]
    warnings += no_op_warnings(plan, form, result, step, options["keep"])
    warnings += [w for w in (pruning.get("calibration", {}).get("warning"),) if w] + pruning.get("warnings", [])
    for warning in warnings:
        progress(f"warning: {warning}")
    if warnings and strict:
        raise QualityError(f"{spec.name}: {warnings[0]} (--strict)")
    saved = step.converted.module.eval()
    parameters, nonzero = count_parameters(saved)

    with atomic_directory(out_dir, overwrite, owned_artifact, notes=progress) as tmp:
        progress(f"exporting ONNX (opset {opset})")
        notes = _form_notes(form)
        if step.uncounted_flops:
            notes.append(_uncounted_note(step.uncounted_flops))
        if folded:
            notes.append(f"parametrized weights folded into plain ones before pruning (the same outputs): "
                         f"{', '.join(folded[:5])}{', ...' if len(folded) > 5 else ''}")
        if result.collapsed_layers:
            notes.append(f"layers pruned to 100% (allowed by the plan): {', '.join(result.collapsed_layers)}")
        # the pipeline's exporter stores sparse initializers (if the form asks) before it checks parity
        asked, tolerance = tolerance, scaled_tolerance(tolerance, step.reference)
        if tolerance != asked:
            notes.append(f"parity tolerance {asked:g} scaled to {tolerance:.3g}: the outputs reach "
                         f"{output_magnitude(step.reference):.3g}, and float error is relative to them")
        exported = pipeline.export(ExportRequest(spec, saved, tmp, trace_inputs, parity_inputs, step.reference,
                                                 opset, tolerance, form_entry.sparse_onnx, progress))
        notes.extend(exported.notes)
        inputs = exported.inputs if exported.inputs is not None else [dataclasses.asdict(i) for i in spec.inputs]
        source = spec.bundle(tmp, saved) if spec.bundle is not None else _registered_source(spec)

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
            # how --round-to auto chose the plan's alignment, measured (`deploykit.bench.alignment`)
            form_recipe={**step.converted.recipe, **({"round_to": alignment} if alignment else {})},
            conversion=step.converted.summary,
            shape_changes=step.shape_changes,
            converted_layers=step.swapped,
            weight_encodings={enc.name: enc.kind for enc in encoded},
            weight_bytes={enc.name: enc.payload_bytes for enc in encoded},
            weight_compression=compression,
            onnx_sparse_initializers=exported.sparse_initializers,
            inputs=inputs,
            outputs=list(spec.outputs),
            opset=opset,
            files=file_sizes(tmp),
            onnx_parity_max_abs_error=exported.errors,
            onnx_parity_max_rel_error=exported.relative,
            warnings=warnings,
            form_parity_max_abs_error=step.form_errors,
            parity_tolerance=tolerance,
            versions=library_versions(),
            created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            metrics=metrics,
            pipeline=spec.pipeline,
            source=source,
            notes=notes,
            unpruned_weights=unpruned,
            training=training,
            parameter_names=[name for name, _ in saved.named_parameters()],
            pruning=pruning,
        )
        write_text_atomic(tmp / MANIFEST_FILE, manifest.to_json())
        if quantize is not None:  # measured against the float artifact, which is complete at this point
            # the source record was made this run from the user's own spec: its entry point may run
            manifest = quantize_artifact(tmp, manifest, quantize, per_channel, progress, consent_of(source), strict,
                                         quantize_operators)
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


#: what a pruner's outcome details hold that the manifest's pruning record keeps
PRUNING_DETAILS = ("calibration", "agreement", "agreement_before_recovery", "agreement_on", "recovery", "layers",
                   "reconstruction", "weight_scored_groups", "warnings")


def pruning_record(result: PruneResult, seconds: float) -> dict:
    """The manifest's record of how pruning went (`Manifest.pruning`); empty for a plan that prunes nothing."""
    if result.plan.is_empty():
        return {}
    details = result.outcome.details if result.outcome is not None else {}
    return {"seconds": round(seconds, 3), **{key: details[key] for key in PRUNING_DETAILS if key in details}}


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
    #: modules with weights whose FLOPs no formula counted (`deploykit.model.summary.FlopCount.uncounted`)
    uncounted_flops: tuple[str, ...] = ()


def _convert(spec, net, form_entry, trace_inputs, parity_inputs, options, one_pass, progress) -> _Converted:
    """Convert the stripped model to the form and check the PyTorch side against it.

    FLOPs are counted for `one_pass` pipelines only: an encoder/decoder pair's cost depends on how many
    tokens it decodes, which no single traced pass says.
    """
    one_item = spec.example_inputs(1, seed=0)
    reference = torch_outputs(net, parity_inputs)
    counted = flop_count(net, one_item) if one_pass else None
    shapes_before, flops_before = module_shapes(net), counted.total if counted else None
    uncounted = counted.uncounted if counted is not None else ()
    if uncounted:
        progress(f"warning: {_uncounted_note(uncounted)}")
    sparse_flops = (lambda module: count_sparse_flops(module, one_item)) if one_pass else (lambda module: None)
    sparse_flops_before = sparse_flops(net)
    progress(f"converting to form {form_entry.name!r}")
    converted = form_entry.convert(net, spec, trace_inputs, options)
    saved = converted.module.eval()
    # the PyTorch module as it will run at the batch its kernels were chosen for
    kernel_inputs = spec.example_inputs(options["kernel_batch"], seed=0)
    runtime_module, swapped = form_entry.for_torch(copy.deepcopy(saved), kernel_inputs, converted.recipe)
    form_errors = max_abs_errors(reference, torch_outputs(runtime_module, parity_inputs), spec.outputs)
    layers = sum(1 for m in net.modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False)))
    check_parity(f"form {form_entry.name!r} vs stripped model", form_errors,
                 form_tolerance(output_magnitude(reference), layers))
    flops_after = count_flops(saved, one_item) if one_pass else None
    return _Converted(converted, swapped, form_errors, reference, flops_before, flops_after,
                      shape_changes(shapes_before, module_shapes(saved)), sparse_flops_before, sparse_flops(saved),
                      uncounted)


def output_magnitude(reference) -> float:
    """The largest finite |value| of the reference outputs (0 where there are none)."""
    return max((float(np.max(np.abs(finite))) for r in reference or ()
                if (finite := np.asarray(r, dtype=np.float64)[np.isfinite(r)]).size), default=0.0)


def scaled_tolerance(tolerance: float, reference) -> float:
    """The ONNX parity tolerance for outputs this large: `tolerance` times the largest |output| where
    that exceeds 1 (float error is relative: a random-weight inception_v3 outputs 5e11, and onnxruntime
    differs from torch there by 1e-6 of it). What the manifest records and bench checks against."""
    return tolerance * max(1.0, output_magnitude(reference))


def no_op_warnings(plan: PruningPlan, form: str, result, step: _Converted, output_layers: Sequence[str]) -> list[str]:
    """What the user asked for that changed nothing: a plan that zeroed weights no form removes, a
    dense-shrunk conversion that removed no channel, a --prune-output that left the output layers as
    they were. Said as warnings (refused with --strict): an export that silently does nothing is
    measured as if it had."""
    if plan.is_empty():
        return []
    found = []
    structured = getattr(PRUNERS.get(plan.method), "structured", False)
    if form == "dense-shrunk" and not step.shape_changes:
        found.append(f"{plan.label()} with --form dense-shrunk removed nothing: " + (
            f"{plan.method} zeroes single weights and dense-shrunk removes only whole channels, so the shipped model is "
            "the dense one; use a structured method (l1-structured) to shrink, or --form csr to store the zeros"
            if not structured else "no channel of any group was pruned whole"))
    if not plan.exclude_output and output_layers:
        pruned = {name.rpartition(".")[0] for name in result.pruned_parameters}
        untouched = [name for name in output_layers if name not in pruned]
        if len(untouched) == len(output_layers):
            found.append(f"--prune-output changed nothing: the output layer{'s' * (len(untouched) > 1)} "
                         f"{', '.join(untouched)} kept every weight" + (
                             " (structured pruning keeps an output's width; the layers producing outputs lose only "
                             "input channels when the layers before them are pruned)" if structured else ""))
    return found


def _uncounted_note(modules: Sequence[str]) -> str:
    return (f"the FLOP counts leave out {', '.join(modules[:5])}{', ...' if len(modules) > 5 else ''}: "
            "operators torch's FLOP counter has no formula for (the figures are lower than the work done)")


def _registered_source(spec: ModelSpec) -> dict:
    """A zoo model is rebuilt by name; a spec built in Python (a library call) cannot be found again
    from the artifact alone, and its manifest says so."""

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
    if form == "bsr":
        return ["onnxruntime has no block-sparse kernel for these graphs: a bsr artifact's model.onnx holds dense "
                "initializers, and its onnxruntime figures are dense-kernel speed"]
    return []
