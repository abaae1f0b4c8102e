"""Post-training int8 quantization of an exported artifact, for both runtimes, with its cost measured.

onnxruntime: dynamic quantization of every ONNX graph of the artifact (int8 weights stored in the
files, activations quantized per call), per tensor or per output channel. PyTorch: dynamic
quantization of the Linear layers (GPT-2's Conv1D layers become Linear first) when the torch runtime
loads the artifact; torch keeps no int8 file format of its own, so the weights file stays float.

Quantized outputs differ from the float model's by design, so parity is not a pass/fail check at
1e-4: the manifest records, per runtime, error statistics against the float model on the
artifact's benchmark inputs, the agreement of greedy tokens for generating pipelines, and the change
in the model's task metric where the model spec has an evaluation (accuracy on digits for the LeNets).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .registry import Registry


@dataclass(frozen=True)
class Quantizer:
    description: str
    #: (float ONNX path, quantized ONNX path, per_channel, calibration feeds) -> None
    onnx: Callable[[Path, Path, bool, Sequence[dict]], None]
    #: (float PyTorch model, inplace) -> quantized model (a copy unless inplace)
    torch: Callable[..., object]
    #: pipelines it can quantize (static calibration feeds one graph's own inputs)
    pipelines: tuple[str, ...] = ("forward", "speech-translation", "text-generation")


QUANTIZERS: Registry[Quantizer] = Registry("quantization")


def _onnx_dynamic_int8(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime's dynamic quantizer has integer kernels for MatMul, not for the Gemm that torch
    # exports nn.Linear as: rewritten, every Linear layer is quantized instead of none
    matmul = target.with_name(target.name + ".matmul")
    onnx.save(gemm_to_matmul(onnx.load(str(source))), str(matmul))
    try:
        quantize_dynamic(str(matmul), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        matmul.unlink(missing_ok=True)


def gemm_to_matmul(model):
    """Each Gemm (alpha = beta = 1, A not transposed, B a weight) as MatMul + Add, computing the same."""
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        product = node.output[0] + ("_matmul" if len(node.input) > 2 and node.input[2] else "")
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def conv1d_to_linear(model):
    """transformers' Conv1D layers (GPT-2) as the nn.Linear they compute, in place: torch's dynamic
    quantization knows Linear only."""
    import torch

    for name, module in list(model.named_modules()):
        cls = type(module)
        if f"{cls.__module__}.{cls.__qualname__}" != "transformers.pytorch_utils.Conv1D":
            continue
        linear = torch.nn.Linear(module.weight.shape[0], module.nf)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def torch_dynamic_int8(model, inplace: bool = False):
    """Linear layers with int8 weights and activations quantized per call. A copy unless `inplace`:
    a loader that has no use for the float model quantizes in place, or its peak memory holds both."""
    import torch

    model = model if inplace else copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao on every call
        return torch.ao.quantization.quantize_dynamic(conv1d_to_linear(model), {torch.nn.Linear}, dtype=torch.qint8,
                                                      inplace=True)


def _onnx_static_int8(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(calibration)

        def get_next(self):
            return next(self.remaining, None)

    quantize_static(str(source), str(target), Feeds(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


QUANTIZERS.add("int8", Quantizer("dynamic int8 (weights int8, activations quantized per call)",
                                 _onnx_dynamic_int8, torch_dynamic_int8))
QUANTIZERS.add("int8-static", Quantizer(
    "static int8 under onnxruntime (weights and activations int8, activation ranges calibrated; QDQ); "
    "dynamic int8 under torch", _onnx_static_int8, torch_dynamic_int8, pipelines=("forward",)))


def error_statistics(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> dict[str, float]:
    """Max and mean |actual - reference| over the float outputs, and the max relative to the reference's
    largest magnitude."""
    pairs = [(r, a) for r, a in zip(reference, actual) if np.asarray(r).dtype.kind == "f"]
    diff = np.concatenate([np.abs(a.astype(np.float64) - r.astype(np.float64)).ravel() for r, a in pairs])
    scale = max(max(float(np.abs(r).max()) for r, _ in pairs), 1e-12)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_relative": float(diff.max()) / scale}


def token_agreement(reference: np.ndarray, actual: np.ndarray, pad: int = -1) -> float:
    """Share of the reference's greedy tokens the quantized model produced at the same position."""
    reference, actual = np.asarray(reference), np.asarray(actual)
    positions = reference != pad
    return float((reference[positions] == actual[positions]).mean()) if positions.any() else 1.0


class _OrtModel:
    """An onnxruntime session called like the PyTorch model, so a spec's evaluation can score it."""

    def __init__(self, path: Path, input_names: Sequence[str]):
        from .runtime import ort_session

        self.session, self.input_names = ort_session(path, threads=1), list(input_names)

    def __call__(self, *inputs):
        import torch

        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(out) for out in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def eval(self):
        return self


#: prompts (or utterances) the greedy-token agreement of a generating pipeline is averaged over
AGREEMENT_INPUTS = 4


#: batches static quantization calibrates on
CALIBRATION_BATCHES = 16


def _data(spec, manifest, directory, workload) -> tuple[list[dict], list[dict], str]:
    """(calibration feeds, feeds the error is measured on, what those are).

    A model with real data calibrates on some of it and is measured on batches it did not
    calibrate on; others use random example inputs for both, and the record says so.
    """
    def feeds(batches):
        return [{name: t.numpy() for name, t in zip(spec.input_names, batch)} for batch in batches]

    if spec.calibration is not None and manifest.pipeline == "forward":
        batches = spec.calibration(CALIBRATION_BATCHES + AGREEMENT_INPUTS)
        return (feeds(batches[:CALIBRATION_BATCHES]), feeds(batches[CALIBRATION_BATCHES:]),
                f"the model's data: {len(batches[:CALIBRATION_BATCHES])} batches to calibrate, "
                f"{len(batches[CALIBRATION_BATCHES:])} others to measure the error on")
    calibration = feeds([spec.example_inputs(8, seed=100 + i) for i in range(CALIBRATION_BATCHES)]
                        if manifest.pipeline == "forward" else [])
    measured = [workload.inputs(directory, manifest, 1, seed, None) for seed in range(10, 10 + AGREEMENT_INPUTS)]
    return calibration, measured, "random example inputs (the model has no data of its own)"


def quantize_artifact(directory: Path, manifest, scheme: str, per_channel: bool, progress,
                      consent: Sequence[str] = ()) -> object:
    """Quantize the ONNX graphs of the finished artifact in `directory` in place, and measure what
    that costs on each runtime against the float model. Returns the manifest to write. `consent`:
    the entry points the artifact may import to rebuild its PyTorch model (the one it was exported from)."""
    from .artifact import MANIFEST_FILE, ONNX_FILE, file_sizes, load_torch_model
    from .bench import WORKLOADS
    from .fsutil import write_text_atomic
    from .runtime import RUNTIMES
    from .sources import spec_for_artifact

    quantizer = QUANTIZERS.get(scheme)
    workload = WORKLOADS.get(manifest.pipeline)
    spec = spec_for_artifact(directory, manifest, consent)
    calibration, feeds, data = _data(spec, manifest, directory, workload)
    reference_of = workload.reference(directory, consent)
    references = [reference_of(f) for f in feeds]  # the float model, before anything changes

    progress(f"quantizing: {quantizer.description}" + (", per channel" if per_channel else ""))
    for name in [name for name in manifest.files if name.endswith(".onnx")]:
        quantized = directory / f".{name}.int8"
        quantizer.onnx(directory / name, quantized, per_channel, calibration)
        quantized.replace(directory / name)
    record = {"scheme": scheme, "description": quantizer.description, "per_channel": per_channel, "data": data}
    manifest = dataclasses.replace(manifest, quantization=record, files=file_sizes(directory))
    write_text_atomic(directory / MANIFEST_FILE, manifest.to_json())  # the torch loader reads it

    progress("measuring the quantized model against the float one")
    sessions = {name: RUNTIMES.get(name).load(manifest.pipeline, directory, 1, consent=consent) for name in ("onnxruntime", "torch")}
    outputs = {runtime: [s.run(f) for f in feeds] for runtime, s in sessions.items()}
    record["error"] = {runtime: error_statistics([a for r in references for a in r], [a for o in outs for a in o])
                       for runtime, outs in outputs.items()}
    if manifest.pipeline != "forward":  # generating pipelines: the last output is the greedy tokens
        record["greedy_token_agreement"] = {
            runtime: float(np.mean([token_agreement(r[-1], o[-1]) for r, o in zip(references, outs)]))
            for runtime, outs in outputs.items()}
    if spec.evaluate is not None:
        # the evaluation scores a model called like the PyTorch one: onnxruntime stands in for it
        # where the artifact is that one call (a generating pipeline's graphs are not)
        progress("evaluating the quantized model")
        quantized_metrics = {"torch": spec.evaluate(load_torch_model(directory, consent=consent)[0])}
        if manifest.pipeline == "forward":
            quantized_metrics["onnxruntime"] = spec.evaluate(_OrtModel(directory / ONNX_FILE, spec.input_names))
        record["metrics"] = quantized_metrics
        record["metric_delta"] = {runtime: {k: v - manifest.metrics[k] for k, v in values.items()
                                            if k in manifest.metrics}
                                  for runtime, values in quantized_metrics.items()}
    return dataclasses.replace(manifest, quantization=record)
