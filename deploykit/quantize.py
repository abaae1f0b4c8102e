"""Post-training int8 quantization of an exported model, for both runtimes, with its cost measured.

onnxruntime: dynamic quantization of the ONNX graph (int8 weights stored in `model.onnx`,
activations quantized per call), per tensor or per output channel. PyTorch: dynamic quantization of
the Linear layers when the torch runtime loads the artifact (torch keeps no int8 file format of its
own; the weights file stays float).

Quantized outputs differ from the float model's by design, so parity is not a pass/fail check at
1e-4: the manifest records the error statistics per runtime, and the change in the model's task
metric where the model spec has an evaluation (accuracy on digits for the LeNets).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .registry import Registry


@dataclass(frozen=True)
class Quantizer:
    description: str
    #: (float ONNX path, quantized ONNX path, per_channel) -> None
    onnx: Callable[[Path, Path, bool], None]
    #: float PyTorch model -> quantized model
    torch: Callable[[object], object]


QUANTIZERS: Registry[Quantizer] = Registry("quantization")


def _onnx_dynamic_int8(source: Path, target: Path, per_channel: bool) -> None:
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


def torch_dynamic_int8(model):
    """Linear layers with int8 weights and activations quantized per call (a copy; `model` is kept)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao on every call
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


QUANTIZERS.add("int8", Quantizer("dynamic int8 (weights int8, activations quantized per call)",
                                 _onnx_dynamic_int8, torch_dynamic_int8))


def error_statistics(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> dict[str, float]:
    """Max and mean |actual - reference| over all outputs, and the max relative to the reference's range."""
    diffs = [np.abs(a.astype(np.float64) - r.astype(np.float64)).ravel() for r, a in zip(reference, actual)]
    diff = np.concatenate(diffs) if diffs else np.zeros(1)
    scale = max(float(np.abs(np.concatenate([r.ravel() for r in reference])).max()), 1e-12) if reference else 1.0
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_relative": float(diff.max()) / scale}


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


def quantize_artifact(spec, model, directory: Path, onnx_file: str, parity_inputs, reference, scheme: str,
                      per_channel: bool, metrics: dict[str, float], progress) -> dict:
    """Quantize `directory/onnx_file` in place and measure what quantization costs on each runtime.

    Returns the manifest's `quantization` record: scheme, settings, error statistics against the
    float model per runtime, and the task metrics (with their change) where the spec evaluates.
    """
    from .onnx_export import torch_outputs
    from .runtime import ort_session

    quantizer = QUANTIZERS.get(scheme)
    progress(f"quantizing: {quantizer.description}" + (", per channel" if per_channel else ""))
    path = directory / onnx_file
    quantized = directory / f".{onnx_file}.int8"
    quantizer.onnx(path, quantized, per_channel)
    quantized.replace(path)
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, parity_inputs)}
    torch_model = quantizer.torch(model)
    record = {
        "scheme": scheme,
        "description": quantizer.description,
        "per_channel": per_channel,
        "error": {
            "onnxruntime": error_statistics(reference, ort_session(path, threads=1).run(None, feeds)),
            "torch": error_statistics(reference, torch_outputs(torch_model, parity_inputs)),
        },
    }
    if spec.evaluate is not None:
        progress("evaluating the quantized model")
        quantized_metrics = {"onnxruntime": spec.evaluate(_OrtModel(path, spec.input_names)),
                             "torch": spec.evaluate(torch_model)}
        record["metrics"] = quantized_metrics
        record["metric_delta"] = {runtime: {k: v - metrics[k] for k, v in values.items() if k in metrics}
                                  for runtime, values in quantized_metrics.items()}
    return record
