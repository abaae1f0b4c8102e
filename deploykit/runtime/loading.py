"""Rebuild an artifact's PyTorch model: the fresh model from its source, the form's restore, the weights,
and for running it the form's execution modules and the quantizer's layers.

In the runtime layer because it needs the forms and quantizers (convert) as well as the manifest and
sources (model); the manifest module below stays free of torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from deploykit.convert.forms import FORMS
from deploykit.convert.quantize import QUANTIZERS
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.storage import load_weights
from deploykit.model.artifact import WEIGHTS_FILE, Manifest, read_manifest
from deploykit.model.checkpoints import with_module_versions
from deploykit.model.sources import spec_for_artifact
from deploykit.model.spec import TRACE_BATCH, ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from deploykit.runtime.session import Target


def load_torch_model(directory: str | Path, *, for_runtime: bool = True, spec: ModelSpec | None = None,
                     consent: Sequence[str] = (), batch: int | None = None) -> "tuple[nn.Module, Manifest]":
    """Rebuild the PyTorch model of an artifact: fresh model -> form's restore -> weights (where the form
    restores nothing, the model is built without initial values and takes the file's tensors,
    `_skeleton_holding`).

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
    state = load_weights(directory / WEIGHTS_FILE)
    model = None
    if not form.rebuilds_shapes:
        model = _skeleton_holding(spec, state, directory, manifest)
    if model is None:
        model = form.restore(spec.make(trained=False), spec, inputs, manifest.form_recipe)
        _load_state(model, state, directory, manifest)
    # the loaded copy goes before the runtime module is made: quantizing with it alive would hold the float
    # weights twice beside the int8 ones
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


def _load_state(model: "nn.Module", state: dict, directory: Path, manifest: Manifest, assign: bool = False) -> None:
    try:
        model.load_state_dict(with_module_versions(model, state), strict=True, assign=assign)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"weights in {str(directory)!r} do not fit model {manifest.model!r}: {first}") from None


def _skeleton_holding(spec: ModelSpec, state: dict, directory: Path, manifest: Manifest) -> "nn.Module | None":
    """The model built with its parameters unallocated, then given the weights file's tensors as its
    parameters (no copy); None where the build leaves a parameter or buffer without a value.

    Built as usual and then loaded, the weights would be held twice while loading (the fresh model's
    initial values and the file's): the float model's peak memory would be twice its weights, and a
    quantized model's would hold its float weights twice beside the int8 ones made from them. Buffers
    and plain tensors the model computes when built (attention masks, positional tables) are built as
    usual; parameters skip their random initialisation, so a buffer drawn from the random generator
    after a parameter would differ from the usual build's (no model deploykit knows has one)."""
    try:
        with _parameters_unallocated():
            model = spec.make(trained=False)
    except Exception:  # noqa: BLE001 - a constructor that reads its parameters' values: built as usual instead
        return None
    _load_state(model, state, directory, manifest, assign=True)
    tensors = [*model.parameters(), *model.buffers()]
    return None if any(t.is_meta for t in tensors) else model


@contextlib.contextmanager
def _parameters_unallocated():
    """Parameters registered while in force are made on the meta device (no memory, and their
    initialisation does nothing); their values come from the weights file."""
    import torch

    def to_meta(module, name, param):
        if param is None or param.is_meta or isinstance(param, torch.nn.parameter.UninitializedParameter):
            return None
        return torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()
