"""What a pipeline is: one kind of model, from export to the sessions that run it.

A *pipeline* says what exporting and running a model means. `forward` is one graph called once;
`speech-translation` is an encoder/decoder pair decoded token by token; `text-generation` is a
causal LM with and without its key/value cache; `onnx-file` is a user's ONNX file as it is. Like
optimum's per-architecture `OnnxConfig`, a `Pipeline` object owns everything that differs between
them: its exporter, a session loader per runtime, the inputs a benchmark feeds, the reference every
runtime must reproduce, and which quantizers apply.

How to add a pipeline: write one module under `deploykit/pipelines/` that builds a `Pipeline` and
adds it to `PIPELINES`, import it from `deploykit/pipelines/catalog.py`, and name it in the model
specs it runs (`ModelSpec.pipeline`).

Pipeline modules stay cheap to import: an onnxruntime benchmark worker looks its loader up here and
must not pay for torch in its memory figures, so the torch side of a pipeline (export, PyTorch
sessions, references) is imported inside the functions that use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from deploykit.core.errors import UsageError
from deploykit.core.registry import Registry
from deploykit.model.artifact import Manifest
from deploykit.runtime.session import RUNTIMES, Loader, Session

if TYPE_CHECKING:
    from deploykit.model.spec import ModelSpec

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Exported:
    """What a pipeline's exporter wrote into an artifact directory, and how closely onnxruntime
    reproduced PyTorch on it (checked on the files as written, after any sparse storage)."""

    #: output -> max abs error of onnxruntime against PyTorch
    errors: dict[str, float]
    #: output -> that error relative to the output's largest value (empty where not measured)
    relative: dict[str, float] = field(default_factory=dict)
    #: initializer ("file:name" for several graphs) -> nonzeros, for initializers stored sparse
    sparse_initializers: dict[str, int] = field(default_factory=dict)
    #: the manifest's input records when export changed them (axes fixed); None keeps the spec's
    inputs: list[dict] | None = None
    #: what the user should know about how the graph was made
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportRequest:
    """One export: the converted model and what its graph is traced, checked and stored with."""

    spec: "ModelSpec"
    model: Any  # nn.Module, converted and in eval mode
    directory: Path
    #: tensors the graph is traced with (TRACE_BATCH), and the others parity is checked on
    trace_inputs: tuple
    parity_inputs: tuple
    #: the stripped model's outputs on the parity inputs
    reference: list
    opset: int
    tolerance: float
    #: store initializers sparse where smaller (the form's choice)
    sparse: bool
    progress: Progress = lambda message: None


#: (artifact directory, manifest, batch, seed, sequence length or None) -> input name -> array
Inputs = Callable[[Path, Manifest, int, int, "int | None"], dict]
#: (artifact directory, code consent) -> feeds -> the stripped PyTorch model's outputs (loaded once
#: per artifact: for dense-shrunk, loading replays the pruning history)
Reference = Callable[[Path, Sequence[str]], Callable[[dict], list]]


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    #: runtime name -> loader of a session of an artifact (or file) of this pipeline
    loaders: Mapping[str, Loader]
    #: writes the graphs and checks them; None for pipelines whose artifacts are not exported by deploykit
    export: Callable[[ExportRequest], Exported] | None
    #: a benchmark's inputs for one configuration, the reference every runtime must reproduce, and
    #: its output names, for an artifact with a manifest (None: the pipeline reads them elsewhere)
    inputs: Inputs | None
    reference: Reference | None
    outputs: Callable[[Manifest], Sequence[str]] | None
    #: quantizers (`deploykit.convert.quantize.QUANTIZERS`) that apply to its artifacts
    quantizers: tuple[str, ...] = ()
    #: the model's forward is one pass over its example inputs: FLOPs per item are counted (a
    #: speech-translation forward is a traced stand-in for encoder + decoder steps)
    one_pass: bool = True
    #: the artifact is one graph called like the PyTorch model: static quantization calibrates on its
    #: inputs, and a spec's evaluation can score the onnxruntime session
    single_graph: bool = True
    #: the last output of a session run is greedy tokens: quantization reports their agreement
    generates_tokens: bool = False
    #: (artifact directory, input names) -> its onnxruntime graphs called like the PyTorch model, so that
    #: a spec's evaluation can score them (None: the evaluation needs more than one call, e.g. decoding)
    scoring_model: "Callable[[Path, Sequence[str]], Any] | None" = None

    def load(self, runtime: str, directory: Path, threads: int, target=None, consent: Sequence[str] = ()) -> Session:
        """A `runtime` session of the artifact in `directory` (on the CPU with default settings and
        the code `consent` given, unless `target` says)."""
        if runtime not in self.loaders:
            raise UsageError(f"runtime {runtime!r} cannot run {self.name!r} artifacts; they run on: "
                             f"{', '.join(self.loaders)}")
        target = target or RUNTIMES.get(runtime).default_target(consent)
        return self.loaders[runtime](Path(directory), threads, target)


PIPELINES: Registry[Pipeline] = Registry("pipeline")


def task_inputs(manifest: Manifest, seed: int, length: int) -> "tuple | None":
    """One item of a trained zoo model's own task at `length` (an utterance, a held-out prompt) as
    numpy arrays, or None for other models: a benchmark of a trained model fed noise times a run that
    means nothing (a translation that never ends, a prompt no text starts with)."""
    spec = _task_spec(manifest)
    return None if spec is None else tuple(t.numpy() for t in spec.example_inputs(1, seed, length))


def has_task_inputs(manifest: Manifest) -> bool:
    """Whether `task_inputs` gives the model's own task rather than None."""
    return _task_spec(manifest) is not None


def _task_spec(manifest: Manifest):
    if manifest.source.get("kind") != "zoo":
        return None
    from deploykit.model.catalog import get_model  # torch side: the zoo's modules import torch

    spec = get_model(manifest.model)
    return spec if spec.length_sampler is not None else None
