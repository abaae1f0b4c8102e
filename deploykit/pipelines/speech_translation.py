"""The `speech-translation` pipeline: an ESPnet encoder/decoder pair decoded token by token.

Exported by `deploykit.pipelines.espnet` (espnet_onnx's wrappers; parity checked on both graphs),
decoded by `deploykit.pipelines.st_decode` under onnxruntime or OpenVINO and by ESPnet's own decoder under
PyTorch; a benchmark feeds one utterance (of the model's own task for a trained zoo model, else random
features) and times encode, one decoder step and greedy decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deploykit.core.confine import read_json
from deploykit.core.errors import UsageError
from deploykit.model.artifact import ST_CONFIG_FILE, Manifest
from deploykit.pipelines import st_decode
from deploykit.pipelines.base import PIPELINES, Exported, ExportRequest, Pipeline, task_inputs
from deploykit.runtime.session import Session, Target


def export(request: ExportRequest) -> Exported:
    from deploykit.pipelines.espnet import export_st  # torch and ESPnet side

    # the encoder takes the frontend's features: their width is the spec's last input axis
    feats = request.spec.inputs[0].shape[-1]
    result = export_st(request.model, request.directory, feats, opset=request.opset, tolerance=request.tolerance,
                       sparse=request.sparse)
    return Exported({"encoder_out": result.encoder_max_abs_error, "decoder_logp": result.decoder_max_abs_error},
                    sparse_initializers=result.sparse_initializers,
                    notes=(result.fusion.note(),) if result.fusion is not None else ())


def inputs(directory: Path, manifest: Manifest, batch: int, seed: int, length: int | None) -> dict:
    if batch != 1:
        raise UsageError(f"{manifest.model}: speech translation decodes one utterance at a time; use batch 1")
    width = read_json(directory, ST_CONFIG_FILE, "speech-translation config")["feats_dim"]
    frames = length or st_decode.BENCH_FRAMES
    task = task_inputs(manifest, seed, frames)
    if task is not None:  # a trained model: an utterance of its task, which it can translate
        return {"feats": task[0]}
    return {"feats": np.random.default_rng(seed).standard_normal((1, frames, width), dtype=np.float32)}


def reference(directory: Path, consent: Sequence[str]) -> Callable[[dict], list]:
    from deploykit.pipelines.espnet import reference_session  # torch side

    return reference_session(directory, consent).run


def load_torch(directory: Path, threads: int, target: Target) -> Session:
    from deploykit.pipelines.espnet import load_torch_session  # torch side

    return load_torch_session(directory, threads, target)


SPEECH_TRANSLATION = PIPELINES.add("speech-translation", Pipeline(
    "speech-translation", "an encoder/decoder pair, decoded token by token",
    loaders={"torch": load_torch, "onnxruntime": st_decode.load_graphs, "openvino": st_decode.load_graphs},
    export=export, inputs=inputs, reference=reference, outputs=lambda manifest: st_decode.ST_BENCH_OUTPUTS,
    quantizers=("int8", "int4-weight", "int8-weight"), one_pass=False, single_graph=False, generates_tokens=True,
    scoring_model=st_decode.OnnxScoringTranslator,
))
