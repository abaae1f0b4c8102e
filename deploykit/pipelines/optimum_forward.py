"""The `optimum-forward` pipeline: one graph of a Hugging Face model, exported by optimum.

A local Hugging Face directory whose task is one call (feature extraction, text or image
classification, ...: `deploykit.model.hf.ONE_GRAPH_TASKS`) is exported by optimum with the
`OnnxConfig` of its architecture (`deploykit.pipelines.optimum_export.export_one_graph`) instead of a
torch.onnx trace of deploykit's own. Everything after the export is the `forward` pipeline's: the
same `model.onnx`, sessions, inputs and reference.
"""

from __future__ import annotations

import dataclasses

from deploykit.pipelines.base import PIPELINES, Exported, ExportRequest
from deploykit.pipelines.forward import FORWARD


def export(request: ExportRequest) -> Exported:
    from deploykit.pipelines.optimum_export import export_one_graph  # torch and optimum side

    return export_one_graph(request)


OPTIMUM_FORWARD = PIPELINES.add("optimum-forward", dataclasses.replace(
    FORWARD, name="optimum-forward", description="one graph of a Hugging Face model, exported by optimum",
    export=export))
