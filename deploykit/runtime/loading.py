"""Rebuild an artifact's PyTorch model: the fresh model from its source, the form's restore, the weights,
and for running it the form's execution modules and the quantizer's layers.

In the runtime layer because it needs the forms and quantizers (convert) as well as the manifest and
sources (model); the manifest module below stays free of torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from deploykit.convert.forms import FORMS
from deploykit.convert.quantize import QUANTIZERS
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.storage import load_weights
from deploykit.model.artifact import WEIGHTS_FILE, Manifest, read_manifest
from deploykit.model.sources import spec_for_artifact
from deploykit.model.spec import TRACE_BATCH, ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from deploykit.runtime.session import Target


def load_torch_model(directory: str | Path, *, for_runtime: bool = True, spec: ModelSpec | None = None,
                     consent: Sequence[str] = (), batch: int | None = None) -> "tuple[nn.Module, Manifest]":
    """Rebuild the PyTorch model of an artifact: fresh model -> form's restore -> weights.

    With `for_runtime` the form's PyTorch execution module is returned (csr: CSRLinear layers;
    a quantized artifact: its Linear layers quantized); without, the saved float module (the
    reference its runtimes are compared against). `spec` builds the model instead of the source the
    manifest names (needed for artifacts exported from a ModelSpec made in Python). Code the manifest
    names (an entry point) is imported only with `consent` (`deploykit.model.sources.code_refusal`).
    `batch` is the batch the runtime module will be fed (forms may choose kernels for it).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = spec or spec_for_artifact(directory, manifest, consent)
    form = FORMS.get(manifest.form)
    inputs = spec.example_inputs(TRACE_BATCH)
    model = form.restore(spec.make(trained=False), spec, inputs, manifest.form_recipe)
    state = load_weights(directory / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"weights in {str(directory)!r} do not fit model {manifest.model!r}: {first}") from None
    # the loaded copy goes before the runtime module is made: quantizing with it alive would hold the float
    # weights twice beside the int8 ones, and the int8 model's peak memory would exceed the float model's
    del state
    if for_runtime:
        runtime_inputs = spec.example_inputs(batch) if batch else inputs
        model, _ = form.for_torch(model, runtime_inputs, manifest.form_recipe)
        if manifest.quantization:
            model = QUANTIZERS.get(manifest.quantization["scheme"]).torch(model, runtime_inputs, inplace=True)
    return model.eval(), manifest


def load_cpu_session_model(directory: str | Path, threads: int, target: "Target", what: str) -> "nn.Module":
    """The artifact's PyTorch model for a benchmark session of a pipeline whose decoding loop builds its
    tensors on the CPU (`what`: "speech translation", "text generation"): refused in one line for
    another device, run on `threads` intra-op threads."""
    import torch

    if target.device != "cpu":
        raise UsageError(f"{what} under torch runs on the CPU only, not {target.device}")
    torch.set_num_threads(threads)
    model, _ = load_torch_model(directory, consent=target.code_consent, batch=target.batch)
    return model
