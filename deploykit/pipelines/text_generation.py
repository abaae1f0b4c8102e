"""The `text-generation` pipeline: a causal language model with and without its key/value cache.

Exported through optimum by `deploykit.pipelines.hf_generation` (both graphs checked against PyTorch,
greedy tokens exactly), run by `deploykit.pipelines.textgen` under onnxruntime or OpenVINO and by the PyTorch
model under torch; a benchmark feeds one random prompt and times prefill, one cached step and
greedy generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from deploykit.pipelines import textgen
from deploykit.pipelines.base import PIPELINES, Exported, ExportRequest, Pipeline
from deploykit.runtime.session import Session, Target


def export(request: ExportRequest) -> Exported:
    from deploykit.pipelines.hf_generation import export_generator  # torch and optimum side

    result = export_generator(request.model, request.directory, request.opset, request.tolerance, request.sparse)
    return Exported(result.errors, sparse_initializers=result.sparse_initializers)


def reference(directory: Path, consent: Sequence[str]) -> Callable[[dict], list]:
    from deploykit.pipelines.hf_generation import reference_session  # torch side

    return reference_session(directory, consent).run


def load_torch(directory: Path, threads: int, target: Target) -> Session:
    from deploykit.pipelines.hf_generation import load_torch_session  # torch side

    return load_torch_session(directory, threads, target)


TEXT_GENERATION = PIPELINES.add("text-generation", Pipeline(
    "text-generation", "a causal language model, with and without its key/value cache",
    loaders={"torch": load_torch, "onnxruntime": textgen.load_graphs, "openvino": textgen.load_graphs},
    export=export, inputs=textgen.prompt_inputs(textgen.TEXTGEN_CONFIG_FILE, "text generation"), reference=reference,
    outputs=lambda manifest: textgen.TEXTGEN_OUTPUTS,
    quantizers=("int8", "int4-weight", "int8-weight", "nncf-int8-weight"), one_pass=True, single_graph=False,
    generates_tokens=True,
    scoring_model=textgen.OnnxLogits,
))
