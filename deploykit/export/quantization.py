"""Quantize a finished artifact's graphs in place, and measure what that costs against the float model.

The quantizers themselves are the convert layer's (`deploykit.convert.quantize`); this is the step
that needs a pipeline (inputs, reference, sessions on each runtime) around them: the error on each
runtime against the float model on the artifact's benchmark inputs, the agreement of greedy tokens
for pipelines that generate, and the change in the model's own metric where it has one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from deploykit.convert.kernel_choice import Round, time_interleaved
from deploykit.convert.quantize import QUANTIZERS, REWRITTEN_OPS, error_statistics, token_agreement
from deploykit.convert.shared_weights import SHARED_WEIGHTS_FILE, share_weights
from deploykit.core.errors import QualityError
from deploykit.core.fsutil import scratch_directory, write_text_atomic
from deploykit.core.measure import measure
from deploykit.model.artifact import MANIFEST_FILE, WEIGHTS_FILE, file_sizes
from deploykit.model.sources import spec_for_artifact
from deploykit.pipelines.base import Pipeline
from deploykit.pipelines.catalog import PIPELINES
from deploykit.runtime.loading import load_torch_model

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
    scheme = record.get("scheme", "int8")
    speed = record.get("speed")
    if speed and speed["verdict"] == "slower":
        out.append(f"{scheme} is slower than float under onnxruntime: {speed['int8_over_float']:.2f}x its time in all "
                   f"{speed['rounds']} interleaved rounds")
    for runtime, agreement in record.get("greedy_token_agreement", {}).items():
        if agreement < MIN_TOKEN_AGREEMENT:
            out.append(f"{scheme} under {runtime} agrees with float on {100 * agreement:.0f}% of greedy tokens "
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
                out.append(f"{scheme} under {runtime}: {name} {value:.4g} against float's {before:.4g}, beyond the "
                           f"{allowed:g}{'' if direction > 0 else ' relative'} it may lose")
    return out


def quantize_artifact(directory: Path, manifest, scheme: str, per_channel: bool, progress,
                      consent: Sequence[str] = (), strict: bool = False, operators: str = "measured") -> object:
    """Quantize the ONNX graphs of the finished artifact in `directory` in place, and measure what
    that costs on each runtime against the float model: output error, greedy-token agreement, the
    model's metric, and onnxruntime's speed against the float graphs (interleaved). A quantized model
    that is slower or worse beyond tolerance says so (manifest warnings, a line each); with `strict`
    that is an error. Returns the manifest to write. `consent`: the entry points the artifact may
    import to rebuild its PyTorch model (the one it was exported from). `operators` ("measured"): for a
    scheme that can choose, quantize only the operator types whose int8 graphs are not slower here
    (`_choose_operators`); "all": every one."""
    with scratch_directory("float") as float_copy:
        # the float artifact as onnxruntime reads it, for the speed comparison: not torch's weights file
        for name in [*manifest.files, MANIFEST_FILE]:
            if name != WEIGHTS_FILE:
                shutil.copy2(directory / name, float_copy / name)
        manifest = _quantize(directory, manifest, scheme, per_channel, progress, consent, float_copy, operators)
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


def _quantize_graphs(directory: Path, graphs: Sequence[str], quantizer, per_channel: bool, calibration,
                     op_types: Sequence[str] | None, float_layers: Sequence[str]) -> None:
    """Quantize `graphs` of `directory` in place (only `op_types` where given; `float_layers` not), their
    shared weights file written again where the artifact has one."""
    for name in graphs:
        quantized = directory / f".{name}.int8"
        options = {"float_layers": float_layers} if op_types is None else {"float_layers": float_layers,
                                                                            "op_types": op_types}
        quantizer.onnx(directory / name, quantized, per_channel, calibration, **options)
        quantized.replace(directory / name)
    if (directory / SHARED_WEIGHTS_FILE).exists():  # the quantized graphs hold their weights inline: share them again
        share_weights(directory, graphs)


def _op_types_in(directory: Path, graphs: Sequence[str], candidates: Sequence[str]) -> list[str]:
    import onnx

    present = {REWRITTEN_OPS.get(node.op_type, node.op_type) for name in graphs
               for node in onnx.load(str(directory / name), load_external_data=False).graph.node}
    return [op for op in candidates if op in present]


def _choose_operators(float_copy: Path, graphs: Sequence[str], quantizer, per_channel: bool, calibration, pipeline,
                      feeds: Sequence[dict], references: Sequence[list], consent: Sequence[str], progress,
                      float_layers: Sequence[str]) -> dict[str, dict]:
    """Which operator types to quantize, measured like csr's kernels: each type alone is quantized in a
    scratch copy of the float graphs and timed against them under onnxruntime in interleaved rounds.
    A type slower in every round stays float; rounds preempted by other load decide nothing, and the
    type stays float (the choice that cannot make the model slower), saying so. A type that is not
    faster pays only in size, so where the model generates tokens it must also keep the float model's
    greedy tokens (MIN_TOKEN_AGREEMENT on `feeds`, against `references`) to be quantized."""
    float_session = pipeline.load("onnxruntime", float_copy, 1, consent=consent)
    chosen = {}
    for op in _op_types_in(float_copy, graphs, quantizer.op_types):
        progress(f"timing int8 {op} against float under onnxruntime (interleaved rounds)")
        with scratch_directory(f"int8-{op}") as trial:
            for name in os.listdir(float_copy):
                shutil.copy2(float_copy / name, trial / name)
            _quantize_graphs(trial, graphs, quantizer, per_channel, calibration, [op], float_layers)
            session = pipeline.load("onnxruntime", trial, 1, consent=consent)
            timings = time_interleaved(lambda: float_session.run(feeds[0]), lambda: session.run(feeds[0]),
                                       rounds=SPEED_ROUNDS, timer=_timed_call)
            agreement = (float(np.mean([token_agreement(r[-1], session.run(f)[-1]) for f, r in zip(feeds, references)]))
                         if pipeline.generates_tokens else None)
        verdict = speed_verdict(timings.dense, timings.csr)
        if verdict["verdict"] == "slower":
            keep, reason = False, "slower than float in every round"
        elif verdict["verdict"] == "faster":
            keep, reason = True, "faster than float"
        elif verdict["preempted_rounds"]:
            keep, reason = False, "timing rounds preempted by other load: kept float, the safe choice"
        elif agreement is not None and agreement < MIN_TOKEN_AGREEMENT:
            keep, reason = False, (f"no clear difference in speed, and {100 * agreement:.0f}% of greedy tokens "
                                   "kept: only size would pay, at the model's answers")
        else:
            keep, reason = True, "no clear difference in speed; smaller"
        chosen[op] = {"quantized": keep, "reason": reason, "greedy_token_agreement": agreement, **verdict}
        progress(f"int8 {op}: {'quantized' if keep else 'stays float'} ({reason}; {verdict['int8_over_float']:.2f}x "
                 "float's time)")
    return chosen


def _quantize(directory: Path, manifest, scheme: str, per_channel: bool, progress, consent: Sequence[str],
              float_copy: Path, operators: str):
    quantizer = QUANTIZERS.get(scheme)
    pipeline = PIPELINES.get(manifest.pipeline)
    spec = spec_for_artifact(directory, manifest, consent)
    calibration, feeds, data = _data(spec, manifest, directory, pipeline)
    reference_of = pipeline.reference(directory, consent)
    references = [reference_of(f) for f in feeds]  # the float model, before anything changes

    graphs = [name for name in manifest.files if name.endswith(".onnx")]
    # the output layers the model's spec names stay float: an int8 output projection moves every logit
    # (gpt2-mini-trained's greedy tokens under onnxruntime agreed 50% with the float model's with its
    # lm_head int8, 97% with it float)
    float_layers = list(spec.output_layers)
    record = {"scheme": scheme, "description": quantizer.description, "per_channel": per_channel, "data": data,
              "float_layers": float_layers}
    op_types = None
    if operators == "measured" and quantizer.op_types:
        chosen = _choose_operators(float_copy, graphs, quantizer, per_channel, calibration, pipeline, feeds,
                                   references, consent, progress, float_layers)
        record["operators"] = chosen
        op_types = [op for op, choice in chosen.items() if choice["quantized"]]
    progress(f"quantizing: {quantizer.description}" + (", per channel" if per_channel else "")
             + ("" if op_types is None else f"; operators: {', '.join(op_types) or 'none (the graphs stay float)'}"))
    if op_types != []:
        _quantize_graphs(directory, graphs, quantizer, per_channel, calibration, op_types, float_layers)
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
        # where the pipeline can call its graphs that way (a decoding evaluation cannot)
        progress("evaluating the quantized model")
        quantized_metrics = {"torch": spec.evaluate(load_torch_model(directory, consent=consent)[0])}
        if pipeline.scoring_model is not None:
            quantized_metrics["onnxruntime"] = spec.evaluate(pipeline.scoring_model(directory, spec.input_names))
        record["metrics"] = quantized_metrics
        record["metric_delta"] = {runtime: {k: v - manifest.metrics[k] for k, v in values.items()
                                            if k in manifest.metrics}
                                  for runtime, values in quantized_metrics.items()}
    return dataclasses.replace(manifest, quantization=record)
