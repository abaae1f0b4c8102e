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
#: max |converted form - stripped dense| allowed (sparse kernels only reorder float sums)
FORM_TOLERANCE = 1e-5
