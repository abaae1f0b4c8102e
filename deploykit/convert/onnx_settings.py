"""What an ONNX export is emitted at and checked against: the opsets, and the parity tolerances.

Constants only, cheap to import: the command line shows them as its defaults, and the exporters
(`deploykit.convert.onnx_export`, the pipelines' own) use the same values.
"""

#: ONNX opset of an export unless asked otherwise
DEFAULT_OPSET = 17
#: opsets torch's TorchScript-based exporter (torch 2.10) emits
SUPPORTED_OPSETS = range(7, 21)
#: max |onnxruntime - torch| allowed on any output element
ONNX_TOLERANCE = 1e-4
#: max |converted form - stripped dense| allowed (sparse kernels only reorder float sums) for an output
#: of magnitude up to 1 from a model of up to FORM_DEPTH layers; `form_tolerance` scales it
FORM_TOLERANCE = 1e-5
FORM_DEPTH = 10


def form_tolerance(magnitude: float, layers: int) -> float:
    """The form check's tolerance for outputs as large as `magnitude` from a model of `layers` weighted
    layers: FORM_TOLERANCE times the magnitude (float error is relative) and times sqrt(layers /
    FORM_DEPTH) (reordered sums add rounding at every layer, roughly as a random walk). inception_v3
    after dense-shrunk differed by 2.1e-5 in a fixed 1e-5: rounding of 94 reordered layers, not a bug."""
    return FORM_TOLERANCE * max(1.0, magnitude) * max(1.0, (layers / FORM_DEPTH) ** 0.5)
