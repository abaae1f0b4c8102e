"""ONNX export of Hugging Face models through optimum, and the checks every such export passes.

optimum's exporter traces the transformers model inside deploykit's wrapper (`deploykit.model.hf`)
with the `OnnxConfig` of its architecture, which knows the inputs, the dynamic axes and the
key/value cache layout of each family: deploykit does not rebuild that per architecture. Its files
are moved into the artifact under the names the pipeline reads. The graphs are then checked by
deploykit itself (optimum's own validation is off: its errors are exceptions without the figures
a manifest records): one-graph exports on the inputs optimum's dummy generators make, generating
exports by the logits of the prompt and of a cached step, and greedy tokens exactly.

Torch side: imported by the pipelines' exporters and PyTorch sessions only.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
from torch import nn

from deploykit.convert.onnx_export import check_parity, max_abs_errors, relative_errors, sparsify_initializers
from deploykit.core.errors import ExportError, ParityError
from deploykit.core.fsutil import scratch_directory
from deploykit.core.ort import ort_session, run_graph
from deploykit.model.artifact import ONNX_FILE
from deploykit.model.causal_lm import greedy
from deploykit.model.hf import hf_model
from deploykit.pipelines.base import Exported, ExportRequest

#: greedy tokens compared at export (every one must match), after a prompt of CHECK_PROMPT tokens
CHECK_TOKENS = 16
CHECK_PROMPT = 8


def optimum_export(model: nn.Module, task: str, opset: int, directory: Path, files: Mapping[str, str],
                   custom_onnx_configs: dict | None = None) -> None:
    """Export the transformers model in `model` for `task` and move optimum's files into `directory`
    (optimum's file name -> the artifact's). `task` may end in "-with-past" (graphs with the cache)."""
    hf = hf_model(model)
    # deploykit builds models without a cache (tracing); optimum also switches it in the configs of
    # submodules (T5's encoder stack), which then refuse to run without one: every config is restored
    configs = {id(c): (c, c.use_cache) for m in hf.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    hf.config.use_cache = task.endswith("-with-past")
    try:
        with scratch_directory("optimum") as tmp, warnings.catch_warnings(), _loggers_quiet("optimum", "transformers"):
            warnings.simplefilter("ignore")
            try:
                onnx_export_from_model = _exporter()
                onnx_export_from_model(hf, tmp, task=task, opset=opset, do_validation=False, no_post_process=True,
                                       custom_onnx_configs=custom_onnx_configs)
            except Exception as exc:  # optimum raises many types; the first line says why
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ExportError(f"optimum export ({task}) failed ({type(exc).__name__}): {first}") from exc
            for made, name in files.items():
                if not (Path(tmp) / made).is_file():
                    raise ExportError(f"optimum export ({task}) wrote no {made}")
                shutil.move(str(Path(tmp) / made), str(Path(directory) / name))
    finally:
        for config, use_cache in configs.values():
            config.use_cache = use_cache


@contextlib.contextmanager
def _loggers_quiet(*names: str):
    """optimum and transformers log advice while exporting (opset recommendations, optional packages
    for checks deploykit does itself) straight to the user's terminal: keep them to errors."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _exporter():
    from optimum.exporters.onnx import onnx_export_from_model

    return onnx_export_from_model


def sparse_files(directory: Path, names) -> dict[str, int]:
    """Store each graph's initializers sparse where smaller; "file:initializer" -> nonzeros."""
    found: dict[str, int] = {}
    for name in names:
        found.update({f"{name}:{k}": v for k, v in sparsify_initializers(Path(directory) / name).items()})
    return found


def export_one_graph(request: ExportRequest) -> Exported:
    """model.onnx by optimum for the wrapper's task, checked on the request's parity inputs (made by
    the architecture's dummy input generators: `deploykit.model.hf`)."""
    spec, model = request.spec, request.model
    request.progress(f"exporting through optimum ({model.task})")
    optimum_export(model, model.task, request.opset, request.directory, {"model.onnx": ONNX_FILE})
    sparse = sparse_files(request.directory, [ONNX_FILE]) if request.sparse else {}
    request.progress("checking onnxruntime against PyTorch")
    session = ort_session(request.directory / ONNX_FILE, threads=1)
    graph_inputs = [i.name for i in session.get_inputs()]
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, request.parity_inputs)}
    if sorted(graph_inputs) != sorted(feeds):
        raise ExportError(f"optimum's graph takes {graph_inputs}, the model {spec.input_names}")
    outputs = dict(zip([o.name for o in session.get_outputs()], run_graph(session, feeds, "optimum's graph")))
    missing = [name for name in spec.outputs if name not in outputs]
    if missing:
        raise ExportError(f"optimum's graph has no output {missing[0]!r} (it has {', '.join(outputs)})")
    errors = max_abs_errors(request.reference, [outputs[name] for name in spec.outputs], spec.outputs)
    check_parity("onnxruntime vs PyTorch", errors, request.tolerance)
    return Exported(errors, relative_errors(request.reference, errors, spec.outputs), sparse)


def check_generation(reference_lm, ort_lm, vocab: int, tolerance: float) -> dict[str, float]:
    """Compare a generating model under onnxruntime with PyTorch on one random prompt: the logits
    after the prompt and after one cached step within `tolerance`, and greedy tokens exactly."""
    prompt = np.random.default_rng(1).integers(0, vocab, size=(1, CHECK_PROMPT), dtype=np.int64)
    (ref_logits, ref_state), (ort_logits, ort_state) = reference_lm.prefill(prompt), ort_lm.prefill(prompt)
    token = int(np.argmax(ref_logits))
    references, outputs, names = [ref_logits, reference_lm.step(token, ref_state)[0]], \
        [ort_logits, ort_lm.step(token, ort_state)[0]], ["prompt_logits", "step_logits"]
    if hasattr(reference_lm, "logits") and hasattr(ort_lm, "logits"):  # causal LMs: the whole sequence too
        references.append(reference_lm.logits(prompt))
        outputs.append(ort_lm.logits(prompt))
        names.append("logits")
    errors = max_abs_errors(references, outputs, names)
    worst = max(errors, key=errors.get)
    if not errors[worst] <= tolerance:
        raise ParityError("onnxruntime vs PyTorch", worst, errors[worst], tolerance)
    expected = greedy(reference_lm, prompt[0].tolist(), CHECK_TOKENS, reference_lm.eos)
    got = greedy(ort_lm, prompt[0].tolist(), CHECK_TOKENS, ort_lm.eos)
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got + [None] * len(expected), expected)) if a != b)
        raise ExportError(f"onnxruntime's greedy tokens differ from PyTorch's at token {first}: "
                          f"{got[:first + 1]} vs {expected[:first + 1]}")
    return errors
