"""torch -> ONNX export, and the numerical check every export must pass."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from deploykit.convert.onnx_settings import DEFAULT_OPSET
from deploykit.core.errors import ExportError, ParityError, WriteError
from deploykit.core.fsutil import NOTHING_LEFT, WRITE_ERRNOS
from deploykit.core.hooks import run_forward
from deploykit.core.ort import ort_session, run_graph
from deploykit.core.outputs import flat_arrays, flat_forward
from deploykit.model.artifact import ONNX_FILE


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
) -> None:
    """Export with the TorchScript-based exporter and check the graph with `onnx.checker`.

    The dynamo exporter is torch's default now, but it does not honour `dynamic_axes` and fails on
    several model families we export (ESPnet among them), so we choose the legacy one explicitly.
    """
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            # flat outputs: ModelOutputs, dicts and nested tuples become the flat tuple spec.outputs names;
            # native output quiet: torch 2.10's exporter always enables its C++ log and dumps the whole IR
            # graph to stdout when an operator fails to export (setup_onnx_logging tests a function for truth)
            with flat_forward(model), _native_output_discarded():
                torch.onnx.export(
                    model,
                    tuple(example_inputs),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                    do_constant_folding=True,
                )
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:  # the disk, not the model: said as every other failed write is
                raise WriteError(f"cannot write {str(path)!r}: {exc.strerror or exc}{NOTHING_LEFT}") from None
            raise ExportError(f"ONNX export failed (OSError): {exc}") from exc
        except Exception as exc:  # the exporter raises many types; the user needs the first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"ONNX export failed ({type(exc).__name__}): {first}") from exc
    onnx.checker.check_model(str(path))


@contextlib.contextmanager
def _native_output_discarded():
    """Send what native code writes to file descriptors 1 and 2 to a scratch file while the block runs
    (Python's own warnings are filtered by the caller; its errors are raised, not printed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


#: bytes per nonzero of an ONNX sparse initializer: the value and an int64 index (ONNX allows no narrower)
_SPARSE_BYTES_PER_NONZERO_EXTRA = 8


def sparsify_initializers(path: str | Path) -> dict[str, int]:
    """Store each float initializer as an ONNX `sparse_initializer` where that is smaller; returns name -> nnz.

    onnxruntime densifies sparse initializers when it loads the model, so this shrinks the file,
    not the memory or the compute; the kernels that run are the dense ones.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    converted = {}
    for init in list(model.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f" or array.size == 0:
            continue
        flat_nonzero = np.flatnonzero(array)
        sparse_bytes = flat_nonzero.size * (array.itemsize + _SPARSE_BYTES_PER_NONZERO_EXTRA)
        if sparse_bytes >= array.nbytes:
            continue
        values = numpy_helper.from_array(array.reshape(-1)[flat_nonzero], name=init.name)
        indices = numpy_helper.from_array(flat_nonzero.astype(np.int64), name=f"{init.name}_indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        model.graph.initializer.remove(init)
        converted[init.name] = int(flat_nonzero.size)
    if converted:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return converted


def save_optimized(path: str | Path, level: str) -> Path:
    """onnxruntime's graph at optimisation `level`, saved as <stem>.<level>.onnx beside `path`.

    Levels up to "extended" are portable; "all" adds layout transformations for the CPU it runs
    on, so its file is for this kind of machine.
    """

    path = Path(path)
    target = path.with_name(f"{path.stem}.{level}.onnx")
    ort_session(path, threads=1, optimization=level, optimized_path=target)
    return target


def torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.inference_mode():
        outputs = run_forward(model, inputs)
    return flat_arrays(outputs)


def max_abs_errors(
    reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, float]:
    """Per output: max |actual - reference|; infinite where shapes or output counts differ."""
    if len(reference) != len(actual):
        return {name: float("inf") for name in names}
    errors = {}
    for name, ref, out in zip(names, reference, actual):
        if ref.shape != out.shape:
            errors[name] = float("inf")
        else:
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            errors[name] = float(diff.max()) if diff.size else 0.0
    return errors


def relative_errors(reference: Sequence[np.ndarray], errors: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Per output: its max abs error over the largest |reference| value (inf where the reference is all
    zeros and the error is not): how large the error is next to what the output carries."""
    out = {}
    for name, ref in zip(names, reference):
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        error = errors.get(name, float("inf"))
        out[name] = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
    return out


#: an output whose values move across the parity inputs by less than this share of their magnitude
#: barely depends on the input: a wrong graph would pass a parity check on it
FLAT_OUTPUT_SHARE = 1e-4


def trivial_outputs(reference: Sequence[np.ndarray], names: Sequence[str], tolerance: float = 0.0) -> list[str]:
    """Outputs a parity check on them proves nothing about: identically zero, the same for every input
    of the batch (an output that does not depend on the input: underflow, a collapsed layer), or
    changing across the inputs by no more than the parity `tolerance` or FLAT_OUTPUT_SHARE of its
    magnitude (a BatchNorm CNN whose outputs shrank to 1e-5 after pruning: any graph is within
    tolerance of it). One line each, naming the output."""
    found = []
    for name, ref in zip(names, reference):
        values = np.asarray(ref, dtype=np.float64)
        if values.size == 0:
            continue
        if not np.any(values):
            found.append(f"output {name!r} is identically zero on the parity inputs")
            continue
        if values.ndim == 0 or values.shape[0] < 2 or not np.all(np.isfinite(values)):
            continue
        spread = float(np.max(np.abs(values - values[:1])))
        magnitude = float(np.max(np.abs(values)))
        if spread == 0:
            found.append(f"output {name!r} is the same for every parity input (it does not depend on the input)")
        elif spread <= tolerance or spread <= FLAT_OUTPUT_SHARE * magnitude:
            found.append(f"output {name!r} changes by at most {spread:.2g} across the parity inputs (its largest "
                         f"value is {magnitude:.2g}, the parity tolerance {tolerance:g}): it barely depends on the input")
    return found


def check_parity(what: str, errors: Mapping[str, float], tolerance: float) -> None:
    """Raise `ParityError` naming the worst output when any error exceeds `tolerance`."""
    if not errors:
        return
    worst = max(errors, key=lambda name: errors[name])
    if not errors[worst] <= tolerance:  # also catches NaN
        raise ParityError(what, worst, errors[worst], tolerance)


def export_single_graph(spec, saved, tmp, trace_inputs, parity_inputs, reference, opset, tolerance, sparse, progress):
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
    problem = sequence_axes_problem(spec, saved, tmp / ONNX_FILE, trace_inputs, tolerance)
    if problem:
        progress(f"sequence axes fixed: the traced graph {problem}")
        export(sequence=False)
    sparse_initializers = sparsify_initializers(tmp / ONNX_FILE) if sparse else {}
    progress("checking onnxruntime against PyTorch")
    session = ort_session(tmp / ONNX_FILE, threads=1)
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, parity_inputs)}
    errors = max_abs_errors(reference, run_graph(session, feeds, "the exported graph"), spec.outputs)
    check_parity("onnxruntime vs PyTorch", errors, tolerance)
    return errors, relative_errors(reference, errors, spec.outputs), sparse_initializers, problem


def fixed_length_inputs(spec, trace_inputs) -> list[dict]:
    """The manifest's input records with sequence axes at the traced sizes (only "batch" stays named)."""
    return [{**dataclasses.asdict(s), "shape": [dim if dim == "batch" else size for dim, size in zip(s.shape, t.shape)]}
            for s, t in zip(spec.inputs, trace_inputs)]


#: how much longer than traced the sequence-axis check runs the graph
_LENGTH_CHECK_OFFSET = 3


def sequence_axes_problem(spec, model, path, trace_inputs, tolerance) -> str:
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
