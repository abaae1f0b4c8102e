"""The exported artifact: a directory holding weights, `model.onnx` and `manifest.json`.

The manifest records everything needed to rebuild the PyTorch model (model name or source, form) and to judge
the artifact (pruning plan, per-parameter sparsity, sizes, parity errors, versions). This module does
not import torch at import time; `load_torch_model` does when called.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError
from .fsutil import read_text

if TYPE_CHECKING:
    from torch import nn

    from .spec import ModelSpec

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
FORMAT = "deploykit.artifact"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What an artifact directory holds. Sizes are bytes; errors are max absolute differences."""

    model: str
    form: str
    #: the PruningPlan's fields
    plan: dict[str, Any]
    pruned_parameters: list[str]
    excluded_modules: list[str]
    #: the pruned (stripped) model, one entry per parameter: name, shape, numel, nonzero, sparsity, pruned
    sparsity: list[dict[str, Any]]
    #: parameters of the saved model (after conversion: fewer for dense-shrunk), and how many are nonzero
    parameters: int
    nonzero_parameters: int
    #: zeros over all parameters / over the pruned ones, in the pruned (stripped) model
    overall_sparsity: float
    pruned_sparsity: float
    #: parameters of the pruned model before conversion
    parameters_before_conversion: int
    #: FLOPs of one item (batch 1) by torch's flop counter, before and after conversion; None for models
    #: that are not one forward pass (encoder/decoder pairs)
    flops_before_conversion: int | None
    flops: int | None
    #: what Form.restore needs to rebuild the saved shapes (dense-shrunk: the pruning history)
    form_recipe: dict[str, Any]
    #: facts about the conversion (channels removed per layer; layers swapped for sparse kernels)
    conversion: dict[str, Any]
    #: module -> [shape before, shape after] for modules the conversion changed
    shape_changes: dict[str, list[str]]
    #: layers the form runs with other kernels under PyTorch (e.g. Linear -> CSRLinear)
    converted_layers: list[str]
    #: tensor name -> how the weights file stores it (dense, csr, bitmask), and its payload bytes
    weight_encodings: dict[str, str]
    weight_bytes: dict[str, int]
    #: codec the weights file is compressed with, if any
    weight_compression: str | None
    #: initializer name -> nonzeros, for initializers model.onnx stores as sparse_initializer
    onnx_sparse_initializers: dict[str, int]
    #: InputSpec fields per input
    inputs: list[dict[str, Any]]
    outputs: list[str]
    opset: int
    #: file name -> bytes on disk (the manifest itself excluded)
    files: dict[str, int]
    #: output name -> max |onnxruntime - torch| on the parity inputs
    onnx_parity_max_abs_error: dict[str, float]
    #: output name -> max |torch form - stripped dense model|
    form_parity_max_abs_error: dict[str, float]
    parity_tolerance: float
    versions: dict[str, str]
    created_utc: str
    #: quality of the pruned model from the model spec's evaluator (e.g. accuracy), when it has one
    metrics: dict[str, float] = field(default_factory=dict)
    #: what running the artifact means: "forward" (one graph) or "speech-translation" (encoder/decoder pair)
    pipeline: str = "forward"
    #: how to rebuild the PyTorch model: {"kind": "zoo"} (by model name), or a record naming files in
    #: the artifact (`deploykit.sources`)
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "zoo"})
    #: post-training quantization (`deploykit.quantize`): scheme, settings, error statistics and task
    #: metrics per runtime; empty when the artifact is float
    quantization: dict[str, Any] = field(default_factory=dict)
    #: FLOPs of one item with the pruned weights' multiply-adds left out (what sparse kernels could
    #: skip; pruning-at-initialisation papers' "remaining FLOPs"); None where FLOPs are not counted
    sparse_flops: int | None = None
    #: sparse_flops / flops_before_conversion: the AG News study's "remaining FLOPs"
    remaining_flops_fraction: float | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @property
    def onnx_parity_error(self) -> float:
        return max(self.onnx_parity_max_abs_error.values(), default=0.0)


#: fields added after format version 1 first shipped: older manifests lack them and get the defaults
OPTIONAL_FIELDS = ("notes", "metrics", "pipeline", "source", "quantization", "sparse_flops",
                   "remaining_flops_fraction")


def file_sizes(directory: str | Path) -> dict[str, int]:
    """File name -> bytes of an artifact directory's files, the manifest itself excluded."""
    return {p.name: p.stat().st_size for p in sorted(Path(directory).iterdir()) if p.name != MANIFEST_FILE}


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {str(directory)!r} does not exist")
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise ArtifactError(f"{str(directory)!r} is not a deploykit artifact (no {MANIFEST_FILE})")
    try:
        data = json.loads(read_text(path, "manifest", ArtifactError))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"cannot read manifest {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{str(path)!r} is not a deploykit manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{str(path)!r}: unsupported format_version {data.get('format_version')!r}")
    names = {f.name for f in dataclasses.fields(Manifest)}
    missing = sorted(n for n in names - set(data) if n not in OPTIONAL_FIELDS)
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise ArtifactError(f"{str(path)!r}: missing fields {missing}, unknown fields {unknown}")
    return Manifest(**data)


def load_torch_model(directory: str | Path, *, for_runtime: bool = True,
                     spec: "ModelSpec | None" = None) -> "tuple[nn.Module, Manifest]":
    """Rebuild the PyTorch model of an artifact: fresh model -> form's restore -> weights.

    With `for_runtime` the form's PyTorch execution module is returned (csr: CSRLinear layers;
    a quantized artifact: its Linear layers quantized); without, the saved float module (the
    reference its runtimes are compared against). `spec` builds the model instead of the source the
    manifest names (needed for artifacts exported from a ModelSpec made in Python).
    """
    from .forms import FORMS
    from .sources import spec_for_artifact
    from .spec import TRACE_BATCH
    from .storage import load_weights

    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = spec or spec_for_artifact(directory, manifest)
    form = FORMS.get(manifest.form)
    inputs = spec.example_inputs(TRACE_BATCH)
    model = form.restore(spec.make(trained=False), spec, inputs, manifest.form_recipe)
    state = load_weights(directory / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"weights in {str(directory)!r} do not fit model {manifest.model!r}: {first}") from None
    if for_runtime:
        model, _ = form.for_torch(model, inputs, manifest.form_recipe)
        if manifest.quantization:
            from .quantize import QUANTIZERS

            model = QUANTIZERS.get(manifest.quantization["scheme"]).torch(model, inplace=True)
    return model.eval(), manifest
