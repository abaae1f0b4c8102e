"""Quantize a finished artifact's graphs in place, and measure what that costs against the float model.

The quantizers themselves are the convert layer's (`deploykit.convert.quantize`); this is the step
that needs a pipeline (inputs, reference, sessions on each runtime) around them: the error on each
runtime against the float model on the artifact's benchmark inputs, the agreement of greedy tokens
for pipelines that generate, and the change in the model's own metric where it has one.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from deploykit.convert.kernel_choice import Round, time_interleaved
from deploykit.convert.quantize import QUANTIZERS, error_statistics, token_agreement
from deploykit.convert.shared_weights import SHARED_WEIGHTS_FILE, share_weights
from deploykit.core.errors import QualityError
from deploykit.core.fsutil import scratch_directory, write_text_atomic
from deploykit.core.measure import measure
from deploykit.core.ort import ort_session
from deploykit.model.artifact import MANIFEST_FILE, ONNX_FILE, WEIGHTS_FILE, file_sizes
from deploykit.model.sources import spec_for_artifact
from deploykit.pipelines.base import Pipeline
from deploykit.pipelines.catalog import PIPELINES
from deploykit.runtime.loading import load_torch_model


class _OrtModel:
    """An onnxruntime session called like the PyTorch model, so a spec's evaluation can score it."""

    def __init__(self, path: Path, input_names: Sequence[str]):
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


def _data(spec, manifest, directory, pipeline: Pipeline) -> tuple[list[dict], list[dict], str]:
    """(calibration feeds, feeds the error is measured on, what those are).

    A model with real data calibrates on some of it and is measured on batches it did not
    calibrate on; others use random example inputs for both, and the record says so.
    """
    def feeds(batches):
        return [{name: t.numpy() for name, t in zip(spec.input_names, batch)} for batch in batches]

    if spec.calibration is not None and pipeline.single_graph:
        batches = spec.calibration(CALIBRATION_BATCHES + AGREEMENT_INPUTS)
        return (feeds(batches[:CALIBRATION_BATCHES]), feeds(batches[CALIBRATION_BATCHES:]),
                f"the model's data: {len(batches[:CALIBRATION_BATCHES])} batches to calibrate, "
                f"{len(batches[CALIBRATION_BATCHES:])} others to measure the error on")
    calibration = feeds([spec.example_inputs(8, seed=100 + i) for i in range(CALIBRATION_BATCHES)]
                        if pipeline.single_graph else [])
    measured = [pipeline.inputs(directory, manifest, 1, seed, None) for seed in range(10, 10 + AGREEMENT_INPUTS)]
    return calibration, measured, "random example inputs (the model has no data of its own)"


#: what a quantized model may lose before the export says so: metric -> (direction, allowed change):
#: higher-is-better metrics by absolute points, perplexity by its relative rise
METRIC_TOLERANCES = {"accuracy": (1, 0.01), "bleu": (1, 1.0), "perplexity": (-1, 0.05)}
#: greedy tokens the quantized model must agree on with the float one (a generating pipeline)
MIN_TOKEN_AGREEMENT = 0.95
#: int8 must take at least 1 + SLOWER (or at most 1 - FASTER) of float's time in every round to be called so
SLOWER = FASTER = 0.10
#: interleaved float/int8 rounds under onnxruntime, each at least this long and this many calls
SPEED_ROUNDS, ROUND_MIN_TIME_S, ROUND_MIN_CALLS = 5, 0.05, 3


def _timed_call(call) -> Round:
    m = measure(call, warmup_s=0.0, min_time_s=ROUND_MIN_TIME_S, min_iters=ROUND_MIN_CALLS)
    return Round(m.median_ms, m.percentile_ms(0))


def speed_verdict(float_rounds: Sequence[Round], int8_rounds: Sequence[Round]) -> dict:
    """Whether int8 is faster or slower than float, from interleaved rounds: only a difference seen in
    every round, with no round preempted, counts (a burst of other load cannot make it); anything else
    is "no clear difference", and says when noise was why."""
    ratios = [q.median_ms / f.median_ms for f, q in zip(float_rounds, int8_rounds) if f.median_ms > 0]
    preempted = sum(r.preempted for r in (*float_rounds, *int8_rounds))
    median = sorted(ratios)[len(ratios) // 2] if ratios else None
    if ratios and not preempted and all(r >= 1 + SLOWER for r in ratios):
        verdict = "slower"
    elif ratios and not preempted and all(r <= 1 - FASTER for r in ratios):
        verdict = "faster"
    else:
        verdict = "no clear difference"
    return {"verdict": verdict, "int8_over_float": median, "rounds": len(ratios), "preempted_rounds": preempted,
            "float_rounds_ms": [r.median_ms for r in float_rounds], "int8_rounds_ms": [r.median_ms for r in int8_rounds]}


def quality_warnings(record: dict, float_metrics: dict[str, float]) -> list[str]:
    """One line per way the quantized model is worse beyond tolerance, or slower, than the float one."""
    out = []
    speed = record.get("speed")
    if speed and speed["verdict"] == "slower":
        out.append(f"int8 is slower than float under onnxruntime: {speed['int8_over_float']:.2f}x its time in all "
                   f"{speed['rounds']} interleaved rounds")
    for runtime, agreement in record.get("greedy_token_agreement", {}).items():
        if agreement < MIN_TOKEN_AGREEMENT:
            out.append(f"int8 under {runtime} agrees with float on {100 * agreement:.0f}% of greedy tokens "
                       f"(below {100 * MIN_TOKEN_AGREEMENT:.0f}%)")
    for runtime, values in record.get("metrics", {}).items():
        for name, value in values.items():
            if name not in METRIC_TOLERANCES or name not in float_metrics:
                continue
            direction, allowed = METRIC_TOLERANCES[name]
            before = float_metrics[name]
            if direction > 0:  # accuracy, BLEU: points lost
                lost = before - value
            else:  # perplexity: its relative rise
                lost = (value - before) / before if before else 0.0
            if lost > allowed:
                out.append(f"int8 under {runtime}: {name} {value:.4g} against float's {before:.4g}, beyond the "
                           f"{allowed:g}{'' if direction > 0 else ' relative'} it may lose")
    return out


def quantize_artifact(directory: Path, manifest, scheme: str, per_channel: bool, progress,
                      consent: Sequence[str] = (), strict: bool = False) -> object:
    """Quantize the ONNX graphs of the finished artifact in `directory` in place, and measure what
    that costs on each runtime against the float model: output error, greedy-token agreement, the
    model's metric, and onnxruntime's speed against the float graphs (interleaved). A quantized model
    that is slower or worse beyond tolerance says so (manifest warnings, a line each); with `strict`
    that is an error. Returns the manifest to write. `consent`: the entry points the artifact may
    import to rebuild its PyTorch model (the one it was exported from)."""
    with scratch_directory("float") as float_copy:
        # the float artifact as onnxruntime reads it, for the speed comparison: not torch's weights file
        for name in [*manifest.files, MANIFEST_FILE]:
            if name != WEIGHTS_FILE:
                shutil.copy2(directory / name, float_copy / name)
        manifest = _quantize(directory, manifest, scheme, per_channel, progress, consent, float_copy)
    speed = manifest.quantization["speed"]
    if speed["verdict"] == "no clear difference" and speed["preempted_rounds"]:
        progress(f"note: int8 against float under onnxruntime: no verdict, {speed['preempted_rounds']} of "
                 f"{2 * speed['rounds']} timing rounds preempted (a busy machine)")
    warnings = quality_warnings(manifest.quantization, manifest.metrics)
    for warning in warnings:
        progress(f"warning: {warning}")
    if warnings and strict:
        raise QualityError(f"{manifest.model}: {warnings[0]} (--strict)")
    return dataclasses.replace(manifest, warnings=[*manifest.warnings, *warnings])


def _quantize(directory: Path, manifest, scheme: str, per_channel: bool, progress, consent: Sequence[str],
              float_copy: Path):
    quantizer = QUANTIZERS.get(scheme)
    pipeline = PIPELINES.get(manifest.pipeline)
    spec = spec_for_artifact(directory, manifest, consent)
    calibration, feeds, data = _data(spec, manifest, directory, pipeline)
    reference_of = pipeline.reference(directory, consent)
    references = [reference_of(f) for f in feeds]  # the float model, before anything changes

    progress(f"quantizing: {quantizer.description}" + (", per channel" if per_channel else ""))
    graphs = [name for name in manifest.files if name.endswith(".onnx")]
    for name in graphs:
        quantized = directory / f".{name}.int8"
        quantizer.onnx(directory / name, quantized, per_channel, calibration)
        quantized.replace(directory / name)
    if SHARED_WEIGHTS_FILE in manifest.files:  # the quantized graphs hold their weights inline: share them again
        share_weights(directory, graphs)
    record = {"scheme": scheme, "description": quantizer.description, "per_channel": per_channel, "data": data}
    manifest = dataclasses.replace(manifest, quantization=record, files=file_sizes(directory))
    write_text_atomic(directory / MANIFEST_FILE, manifest.to_json())  # the torch loader reads it

    progress("measuring the quantized model against the float one")
    sessions = {name: pipeline.load(name, directory, 1, consent=consent) for name in ("onnxruntime", "torch")}
    outputs = {runtime: [s.run(f) for f in feeds] for runtime, s in sessions.items()}
    record["error"] = {runtime: error_statistics([a for r in references for a in r], [a for o in outs for a in o])
                       for runtime, outs in outputs.items()}
    if pipeline.generates_tokens:  # the last output is the greedy tokens
        record["greedy_token_agreement"] = {
            runtime: float(np.mean([token_agreement(r[-1], o[-1]) for r, o in zip(references, outs)]))
            for runtime, outs in outputs.items()}
    progress("timing int8 against float under onnxruntime (interleaved rounds)")
    float_session = pipeline.load("onnxruntime", float_copy, 1, consent=consent)
    quantized_session = sessions["onnxruntime"]
    timings = time_interleaved(lambda: float_session.run(feeds[0]), lambda: quantized_session.run(feeds[0]),
                               rounds=SPEED_ROUNDS, timer=_timed_call)
    record["speed"] = speed_verdict(timings.dense, timings.csr)  # the first call's rounds, and the second's
    if spec.evaluate is not None:
        # the evaluation scores a model called like the PyTorch one: onnxruntime stands in for it
        # where the artifact is that one call (a generating pipeline's graphs are not)
        progress("evaluating the quantized model")
        quantized_metrics = {"torch": spec.evaluate(load_torch_model(directory, consent=consent)[0])}
        if pipeline.single_graph:
            quantized_metrics["onnxruntime"] = spec.evaluate(_OrtModel(directory / ONNX_FILE, spec.input_names))
        record["metrics"] = quantized_metrics
        record["metric_delta"] = {runtime: {k: v - manifest.metrics[k] for k, v in values.items()
                                            if k in manifest.metrics}
                                  for runtime, values in quantized_metrics.items()}
    return dataclasses.replace(manifest, quantization=record)
