"""Post-training int8 quantizers of exported graphs and of PyTorch models, and how their error is measured.

onnxruntime: dynamic quantization of every ONNX graph of the artifact (int8 weights stored in the
files, activations quantized per call), per tensor or per output channel. PyTorch: dynamic
quantization of the Linear layers (GPT-2's Conv1D layers become Linear first) when the torch runtime
loads the artifact; torch keeps no int8 file format of its own, so the weights file stays float.

Quantized outputs differ from the float model's by design, so parity is not a pass/fail check at
1e-4: quantizing an artifact (`deploykit.export.quantization`) records, per runtime, error statistics against the float model on the
artifact's benchmark inputs, the agreement of greedy tokens for generating pipelines, and the change
in the model's task metric where the model spec has an evaluation (accuracy on digits for the LeNets).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deploykit.core.extras import require
from deploykit.core.mapped import release_mapped_pages
from deploykit.core.registry import Registry


@dataclass(frozen=True)
class Quantizer:
    description: str
    #: (float ONNX path, quantized ONNX path, per_channel, calibration feeds) -> None
    onnx: Callable[[Path, Path, bool, Sequence[dict]], None]
    #: (float PyTorch model, example inputs, inplace) -> quantized model (a copy unless inplace)
    torch: Callable[..., object]
    #: why --per-channel does not apply (None: it does)
    no_per_channel: str | None = None
    #: operator types whose nodes can be chosen one by one (the onnx callable then takes `nodes`, the
    #: names of the nodes to quantize); empty: the scheme quantizes what it quantizes
    op_types: tuple[str, ...] = ()
    #: the runtime its int8 graphs are made for: where their nodes are timed against float and their
    #: speed, error and metric are measured
    runtime: str = "onnxruntime"


QUANTIZERS: Registry[Quantizer] = Registry("quantization")
#: how the nodes a scheme can choose are picked: each timed against float ("measured"), or every one
OPERATOR_CHOICES = ("measured", "all")


@contextlib.contextmanager
def _root_log_quiet():
    """onnxruntime's quantizers log advice ("consider pre-processing") on the root logger, which
    Python prints to a user's terminal when nothing configured logging: keep it to errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _refuse_no_nodes(nodes: Sequence[str] | None) -> None:
    """An empty node list is a caller's mistake: onnxruntime's quantizers read [] as every node."""
    if nodes is not None and not nodes:
        raise ValueError("no nodes to quantize: leave the graph as it is instead")


def _onnx_dynamic_int8(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict],
                       nodes: Sequence[str] | None = None, float_layers: Sequence[str] = ()) -> None:
    """Dynamic int8 of the graph at `source` into `target`: every node it has integer kernels for, or only
    `nodes` (names in the graph as rewritten by `gemm_to_matmul`), never the nodes of `float_layers`."""
    _refuse_no_nodes(nodes)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime's dynamic quantizer has integer kernels for MatMul, not for the Gemm that torch
    # exports nn.Linear as: rewritten, every Linear layer is quantized instead of none
    matmul = target.with_name(target.name + ".matmul")
    model = gemm_to_matmul(onnx.load(str(source)))
    onnx.save(model, str(matmul))
    try:
        with _root_log_quiet():
            quantize_dynamic(str(matmul), str(target), weight_type=QuantType.QInt8, per_channel=per_channel,
                             nodes_to_quantize=None if nodes is None else list(nodes),
                             nodes_to_exclude=nodes_of_layers(model.graph, float_layers))
    finally:
        matmul.unlink(missing_ok=True)


def nodes_of_layers(graph, layers: Sequence[str]) -> list[str]:
    """Names of the nodes of `graph` that compute the modules `layers` (dotted paths): torch and optimum
    name a module's nodes "/path/to/module/Op". A path is matched by its longest tail the graph has (a
    wrapper's prefix, as deploykit's `model.` around a transformers model, is not in the graph)."""
    names = [node.name for node in graph.node]
    out: list[str] = []
    for layer in layers:
        parts = layer.split(".")
        for start in range(len(parts)):
            segment = "/" + "/".join(parts[start:]) + "/"
            matched = [name for name in names if segment in name]
            if matched:
                out += matched
                break
    return out


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
        # the Linear takes the Conv1D's own tensors (its weight transposed, a view): a copy would hold
        # every such layer's weights twice while the model is quantized
        linear = torch.nn.Linear(module.weight.shape[0], module.nf, device="meta")
        linear.weight = torch.nn.Parameter(module.weight.detach().T, requires_grad=module.weight.requires_grad)
        linear.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def torch_dynamic_int8(model, inputs, inplace: bool = False):
    """Linear layers with int8 weights and activations quantized per call: those a pass over `inputs`
    calls (a layer whose weight its parent reads itself would break as a quantized module). A copy
    unless `inplace`: a loader that has no use for the float model quantizes in place, or its peak
    memory holds both.

    Layer by layer: each float weight is read once to make its int8 copy, then its pages are given
    back where it lies in an unwritten mapping of a weights file (`release_mapped_pages`), as it is
    after the pass that finds the called layers. The int8 model then never holds its float weights
    beside its int8 ones."""
    import torch

    from deploykit.core.hooks import called_modules  # torch side: the quantizer registry is read by the CLI

    model = conv1d_to_linear(model if inplace else copy.deepcopy(model))
    # the pass reads every weight: each layer's pages go as soon as it has run, or the whole float model
    # would be resident before the first int8 copy is made (a meta-device twin reads no weight, but its
    # first pass imports torch's meta kernels: 80 MB)
    layers = called_modules(model, inputs, torch.nn.Linear, after=lambda layer: release_mapped_pages(layer.weight))
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    model.eval()  # as torch's quantize_dynamic leaves a model it is given whole
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao on every call
        for name in sorted(layers):
            weight = model.get_submodule(name).weight
            # torch's own swap, one layer at a time (its mapping decides which Linear classes it quantizes),
            # given the layer's parent: given the model, each call would walk every module of it
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            torch.ao.quantization.quantize_dynamic(parent, {child: qconfig}, dtype=torch.qint8, inplace=True)
            if model.get_submodule(name).weight is not weight:  # swapped: the float weight is read for good
                release_mapped_pages(weight)
    return model


def _onnx_static_int8(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict],
                      float_layers: Sequence[str] = ()) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(calibration)

        def get_next(self):
            return next(self.remaining, None)

    with _root_log_quiet():
        quantize_static(str(source), str(target), Feeds(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=nodes_of_layers(onnx.load(str(source), load_external_data=False).graph,
                                                         float_layers))


#: weights per block of a weight-only quantized MatMul (one scale per block of a column): smaller blocks
#: follow the weights more closely at 2 bytes a block (onnxruntime's kernels take 16..256, powers of two)
WEIGHT_BLOCK = 32


def _onnx_weight_only(bits: int):
    """onnxruntime's weight-only quantizer (MatMulNBits: `bits`-bit weights in blocks of WEIGHT_BLOCK,
    symmetric; activations stay float, products in int8 where the CPU has the kernel, accuracy level 4).
    Needs onnx-ir, which onnxruntime's quantizer imports."""

    def quantize(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict],
                 nodes: Sequence[str] | None = None, float_layers: Sequence[str] = ()) -> None:
        """Every MatMul with a weight, or only `nodes` (names as `gemm_to_matmul` rewrites them), never
        the nodes of `float_layers`."""
        _refuse_no_nodes(nodes)
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = gemm_to_matmul(onnx.load(str(source)))
        excluded = nodes_of_layers(model.graph, float_layers)
        if nodes is not None:  # the quantizer's own nodes_to_include adds to its operator types, not limits them
            wanted = set(nodes)
            excluded += [node.name for node in model.graph.node if node.name not in wanted]
        with _root_log_quiet():
            quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=WEIGHT_BLOCK, is_symmetric=True,
                                             accuracy_level=4, nodes_to_exclude=excluded)
            quantizer.process()
        onnx.save(quantizer.model.model, str(target))

    return quantize


#: operator types onnxruntime's dynamic quantizer has integer kernels for, which the graphs of
#: deploykit's pipelines hold (ConvInteger and small MatMulInteger can be slower than float: each is timed)
DYNAMIC_OP_TYPES = ("MatMul", "Conv", "Gather")

QUANTIZERS.add("int8", Quantizer("dynamic int8 (weights int8, activations quantized per call)",
                                 _onnx_dynamic_int8, torch_dynamic_int8, op_types=DYNAMIC_OP_TYPES))
QUANTIZERS.add("int8-static", Quantizer(
    "static int8 under onnxruntime (weights and activations int8, activation ranges calibrated; QDQ); "
    "dynamic int8 under torch", _onnx_static_int8, torch_dynamic_int8))
for _bits in (4, 8):
    QUANTIZERS.add(f"int{_bits}-weight", Quantizer(
        f"weight-only int{_bits} under onnxruntime (MatMulNBits: weights in blocks of {WEIGHT_BLOCK}, activations "
        "float); dynamic int8 under torch", _onnx_weight_only(_bits), torch_dynamic_int8,
        no_per_channel=f"its blocks of {WEIGHT_BLOCK} weights are finer than channels already", op_types=("MatMul",)))


def _nncf():
    """NNCF (the openvino extra), imported without the warning torch logs when NNCF's import finds no CUDA."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return require("nncf", "OpenVINO's int8 quantizers (NNCF)")


def _nncf_ignored(model, nodes: Sequence[str] | None, float_layers: Sequence[str]):
    """NNCF's ignored scope: the nodes of `float_layers`, and, where `nodes` is given, every node not in it."""
    import nncf

    excluded = nodes_of_layers(model.graph, float_layers)
    if nodes is not None:
        wanted = set(nodes)
        excluded += [node.name for node in model.graph.node if node.name and node.name not in wanted]
    return nncf.IgnoredScope(names=sorted(set(excluded)), validate=False)


@contextlib.contextmanager
def _nncf_quiet():
    """NNCF logs its statistics and draws progress bars on the terminal: keep both to errors."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    with _root_log_quiet(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _nncf_weight_int8(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict],
                      nodes: Sequence[str] | None = None, float_layers: Sequence[str] = ()) -> None:
    """NNCF's data-free weight compression (OpenVINO's own tooling) of every MatMul's weight to int8,
    asymmetric per output channel, or only `nodes` (names as `gemm_to_matmul` rewrites them), never the
    nodes of `float_layers`: DequantizeLinear before each product, which OpenVINO folds into its kernels."""
    _refuse_no_nodes(nodes)
    nncf = _nncf()
    import onnx

    model = gemm_to_matmul(onnx.load(str(source)))
    with _nncf_quiet():
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                           ignored_scope=_nncf_ignored(model, nodes, float_layers))
    onnx.save(compressed, str(target))


def _nncf_static_int8(source: Path, target: Path, per_channel: bool, calibration: Sequence[dict],
                      nodes: Sequence[str] | None = None, float_layers: Sequence[str] = ()) -> None:
    """NNCF's post-training quantization (OpenVINO's own tooling): weights and activations int8, the
    activations' ranges from `calibration` (the model's own data), QDQ nodes OpenVINO fuses into int8
    kernels; only `nodes` where given, never the nodes of `float_layers`."""
    _refuse_no_nodes(nodes)
    nncf = _nncf()
    import onnx

    model = gemm_to_matmul(onnx.load(str(source)))
    with _nncf_quiet():
        quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                                  ignored_scope=_nncf_ignored(model, nodes, float_layers))
    onnx.save(quantized, str(target))


QUANTIZERS.add("nncf-int8", Quantizer(
    "static int8 by NNCF for OpenVINO (weights and activations int8, activation ranges calibrated on the model's "
    "data; QDQ), chosen and measured under openvino; dynamic int8 under torch", _nncf_static_int8,
    torch_dynamic_int8, no_per_channel="NNCF quantizes weights per output channel already",
    op_types=("MatMul", "Conv"), runtime="openvino"))
QUANTIZERS.add("nncf-int8-weight", Quantizer(
    "weight-only int8 by NNCF for OpenVINO (asymmetric, per output channel; activations float), chosen and "
    "measured under openvino; dynamic int8 under torch", _nncf_weight_int8, torch_dynamic_int8,
    no_per_channel="NNCF compresses weights per output channel already", op_types=("MatMul",), runtime="openvino"))


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
