"""The `forward` pipeline: one graph, `model.onnx`, called once per input batch.

Exported from one traced forward pass (`deploykit.convert.onnx_export.export_single_graph`, which
fixes sequence axes that tracing baked in); run by PyTorch on the rebuilt model and by onnxruntime
on the graph; fed the example inputs the manifest's input specs describe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from deploykit.core.errors import UsageError
from deploykit.model.artifact import ONNX_FILE, Manifest
from deploykit.pipelines.base import PIPELINES, Exported, ExportRequest, Pipeline
from deploykit.runtime.graphs import GraphOpener, load_graph
from deploykit.runtime.session import Session, Target


def export(request: ExportRequest) -> Exported:
    from deploykit.convert.onnx_export import export_single_graph, fixed_length_inputs  # torch side

    errors, relative, sparse, fixed = export_single_graph(
        request.spec, request.model, request.directory, request.trace_inputs, request.parity_inputs,
        request.reference, request.opset, request.tolerance, request.sparse, request.progress)
    if not fixed:
        return Exported(errors, relative, sparse)
    return Exported(errors, relative, sparse, inputs=fixed_length_inputs(request.spec, request.trace_inputs),
                    notes=(f"sequence axes fixed at the traced lengths: the traced graph {fixed}",))


def inputs(directory: Path, manifest: Manifest, batch: int, seed: int, length: int | None) -> dict:
    from deploykit.model.sources import inputs_for_artifact  # torch side: samples tensors

    if length is not None and not any(isinstance(d, str) and d != "batch" for i in manifest.inputs for d in i["shape"]):
        shapes = ", ".join(f"{i['name']} {i['shape']}" for i in manifest.inputs)
        raise UsageError(f"{manifest.model}: this artifact's ONNX graph has no dynamic sequence axis to sweep "
                         f"(inputs: {shapes})")
    spec = inputs_for_artifact(directory, manifest)  # no code the artifact names runs for its inputs
    return {name: t.numpy() for name, t in zip(spec.input_names, spec.example_inputs(batch, seed=seed, length=length))}


def reference(directory: Path, consent: Sequence[str]) -> Callable[[dict], list]:
    import torch  # torch side

    from deploykit.convert.onnx_export import torch_outputs  # torch side
    from deploykit.runtime.loading import load_torch_model  # torch side

    model, manifest = load_torch_model(directory, for_runtime=False, consent=consent)
    return lambda feeds: torch_outputs(model, [torch.from_numpy(feeds[spec["name"]]) for spec in manifest.inputs])


def load_torch(directory: Path, threads: int, target: Target) -> Session:
    from deploykit.runtime.torch_session import TorchSession, in_precision  # torch side

    return in_precision(TorchSession(directory, threads, target), target)


class OnnxModel:
    """`model.onnx` in a session of an ONNX runtime (onnxruntime on the CPU unless `opener` says)
    called like the PyTorch model (tensors in, tensors out), so that a spec's evaluation can score it."""

    def __init__(self, directory: Path, input_names: Sequence[str], opener: GraphOpener = GraphOpener()):
        self.session, self.input_names = opener(Path(directory) / ONNX_FILE), list(input_names)

    def __call__(self, *inputs):
        import torch  # torch side: the evaluation hands tensors

        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(out) for out in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def eval(self):
        return self


def load_onnx(directory: Path, threads: int, target: Target) -> Session:
    return load_graph(Path(directory) / ONNX_FILE, threads, target)


FORWARD = PIPELINES.add("forward", Pipeline(
    "forward", "one graph, one call per batch",
    loaders={"torch": load_torch, "onnxruntime": load_onnx, "openvino": load_onnx},
    export=export, inputs=inputs, reference=reference, outputs=lambda manifest: manifest.outputs,
    quantizers=("int8", "int8-static", "int4-weight", "int8-weight", "nncf-int8", "nncf-int8-weight"),
    scoring_model=OnnxModel,
))
