"""The `onnx-file` pipeline: a user's own ONNX file, benchmarked as it is under onnxruntime (and OpenVINO).

Nothing is exported and there is no PyTorch model: onnxruntime without graph optimisation is the
reference (`deploykit.bench.runner.onnx_file_subject`), and inputs follow the file's own input
declarations (`deploykit.model.onnxfile`, which also checks its external data before any run).
"""

from __future__ import annotations

from deploykit.model.onnxfile import PIPELINE
from deploykit.pipelines.base import PIPELINES, Pipeline
from deploykit.runtime.graphs import load_graph

ONNX_FILE_PIPELINE = PIPELINES.add(PIPELINE, Pipeline(
    PIPELINE, "a user's ONNX file as it is",
    loaders={"onnxruntime": load_graph, "openvino": load_graph},
    # no manifest: inputs, outputs and reference come from the file (`onnx_file_subject`)
    export=None, inputs=None, reference=None, outputs=None,
))
