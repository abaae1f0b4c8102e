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

from deploykit.convert.kernel_choice import time_interleaved
from deploykit.convert.quantize import QUANTIZERS, error_statistics, token_agreement
from deploykit.convert.shared_weights import SHARED_WEIGHTS_FILE, share_weights
from deploykit.core.errors import QualityError
from deploykit.core.fsutil import scratch_directory, write_text_atomic
from deploykit.export.operator_choice import SPEED_ROUNDS, choose_units, chosen_nodes, speed_verdict, timed_call
from deploykit.model.artifact import MANIFEST_FILE, WEIGHTS_FILE, file_sizes
from deploykit.model.sources import spec_for_artifact
from deploykit.pipelines.base import Pipeline, has_task_inputs
from deploykit.pipelines.catalog import PIPELINES
from deploykit.runtime.graphs import GraphOpener
from deploykit.runtime.loading import load_torch_model
from deploykit.runtime.session import ScoresContinuations

#: inputs (batches of the model's data, where it has some) a quantized model's error is measured on
MEASURED_INPUTS = 4
#: prompts (or utterances) the greedy-token agreement of a generating pipeline is averaged over: one
#: near-tie flipped changes the rest of a continuation, so each input's agreement is all or a fraction of
#: it, and over 4 the same int8 graph of gpt2-mini-trained read 97% where 16 read 88%
AGREEMENT_INPUTS = 16


#: batches static quantization calibrates on
CALIBRATION_BATCHES = 16


def _data(spec, manifest, directory, pipeline: Pipeline) -> tuple[list[dict], list[dict], str]:
    """(calibration feeds, feeds the error is measured on, what those are).

    A model with real data calibrates on some of it and is measured on batches it did not
    calibrate on; others use random example inputs for both (a generating pipeline: its own inputs,
    from the model's task where it has one), and the record says so.
    """
    def feeds(batches):
        return [{name: t.numpy() for name, t in zip(spec.input_names, batch)} for batch in batches]

    if spec.calibration is not None and pipeline.single_graph:
        batches = spec.calibration(CALIBRATION_BATCHES + MEASURED_INPUTS)
        return (feeds(batches[:CALIBRATION_BATCHES]), feeds(batches[CALIBRATION_BATCHES:]),
                f"the model's data: {len(batches[:CALIBRATION_BATCHES])} batches to calibrate, "
                f"{len(batches[CALIBRATION_BATCHES:])} others to measure the error on")
    calibration = feeds([spec.example_inputs(8, seed=100 + i) for i in range(CALIBRATION_BATCHES)]
                        if pipeline.single_graph else [])
    count = AGREEMENT_INPUTS if pipeline.generates_tokens else MEASURED_INPUTS
    measured = [pipeline.inputs(directory, manifest, 1, seed, None) for seed in range(10, 10 + count)]
    if not pipeline.single_graph and has_task_inputs(manifest):  # the pipeline's inputs come from its task
        return (calibration, measured,
                f"{len(measured)} inputs drawn from the model's own task (its prompts or utterances)")
    return calibration, measured, "random example inputs (the model has no data of its own)"


#: what a quantized model may lose before the export says so: metric -> (direction, allowed change):
#: higher-is-better metrics by absolute points, perplexity by its relative rise
METRIC_TOLERANCES = {"accuracy": (1, 0.01), "bleu": (1, 1.0), "perplexity": (-1, 0.05)}
#: greedy tokens the quantized model must agree on with the float one (a generating pipeline)
MIN_TOKEN_AGREEMENT = 0.95
def quality_warnings(record: dict, float_metrics: dict[str, float]) -> list[str]:
    """One line per way the quantized model is worse beyond tolerance, or slower, than the float one, or
    not quantized at all under its runtime (its nodes measured, none kept)."""
    out = []
    scheme = record.get("scheme", "int8")
    speed = record.get("speed")
    # records written before a scheme had a runtime of its own were onnxruntime's
    runtime = (speed or {}).get("runtime", "onnxruntime")
    chosen = record.get("operators")
    if chosen is not None and not any(c["quantized"] for c in chosen.values()):
        out.append(f"{scheme} kept no node under {runtime} (each slower, unmeasurable on this machine, or changing the "
                   "model's answers: quantization.operators says which): its graphs are the float ones")
    if speed and speed["verdict"] == "slower":
        out.append(f"{scheme} is slower than float under {runtime}: {speed['int8_over_float']:.2f}x its time in all "
                   f"{speed['rounds']} interleaved rounds")
    forced = record.get("next_token_agreement", {})
    for runtime, agreement in record.get("greedy_token_agreement", {}).items():
        if agreement < MIN_TOKEN_AGREEMENT:
            per_token = f"; {100 * forced[runtime]:.1f}% token by token" if runtime in forced else ""
            out.append(f"{scheme} under {runtime} agrees with float on {100 * agreement:.0f}% of greedy tokens "
                       f"(below {100 * MIN_TOKEN_AGREEMENT:.0f}%{per_token})")
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
    model's metric, and the speed against the float graphs (interleaved) under the runtime the scheme is
    made for (onnxruntime; OpenVINO for NNCF's). A quantized model
    that is slower or worse beyond tolerance says so (manifest warnings, a line each); with `strict`
    that is an error. Returns the manifest to write. `consent`: the entry points the artifact may
    import to rebuild its PyTorch model (the one it was exported from). `operators` ("measured"): for a
    scheme that can choose, quantize only the nodes whose int8 form is not slower here, each timed on
    its own input (`_choose_nodes`); "all": every one."""
    with scratch_directory("float") as float_copy:
        # the float artifact as onnxruntime reads it, for the speed comparison: not torch's weights file
        for name in [*manifest.files, MANIFEST_FILE]:
            if name != WEIGHTS_FILE:  # names may lie in a folder of the artifact (its bundled code/)
                (float_copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(directory / name, float_copy / name)
        manifest = _quantize(directory, manifest, scheme, per_channel, progress, consent, float_copy, operators)
    speed = manifest.quantization["speed"]
    if speed["verdict"] == "no clear difference" and speed["preempted_rounds"]:
        progress(f"note: int8 against float under {speed.get('runtime', 'onnxruntime')}: no verdict, "
                 f"{speed['preempted_rounds']} of "
                 f"{2 * speed['rounds']} timing rounds preempted (a busy machine)")
    warnings = quality_warnings(manifest.quantization, manifest.metrics)
    for warning in warnings:
        progress(f"warning: {warning}")
    if warnings and strict:
        raise QualityError(f"{manifest.model}: {warnings[0]} (--strict)")
    return dataclasses.replace(manifest, warnings=[*manifest.warnings, *warnings])


def _quantize_graphs(directory: Path, graphs: Sequence[str], quantizer, per_channel: bool, calibration,
                     nodes: dict[str, list[str]] | None, float_layers: Sequence[str]) -> None:
    """Quantize `graphs` of `directory` in place (where `nodes` is given, only its nodes per graph, and a
    graph without any stays as it is; `float_layers` never), their shared weights file written again
    where the artifact has one."""
    for name in graphs:
        if nodes is not None and not nodes.get(name):
            continue
        quantized = directory / f".{name}.int8"
        options = {"float_layers": float_layers} if nodes is None else {"float_layers": float_layers,
                                                                         "nodes": nodes[name]}
        quantizer.onnx(directory / name, quantized, per_channel, calibration, **options)
        quantized.replace(directory / name)
    if (directory / SHARED_WEIGHTS_FILE).exists():  # the quantized graphs hold their weights inline: share them again
        share_weights(directory, graphs)


def _choose_nodes(float_copy: Path, graphs: Sequence[str], quantizer, per_channel: bool, calibration, pipeline,
                  feeds: Sequence[dict], references: Sequence[list], consent: Sequence[str], progress,
                  float_layers: Sequence[str]) -> dict[str, dict]:
    """Which weight-bearing nodes to quantize, each timed on its own input (`operator_choice`); where
    the model generates tokens, only as many as keep its greedy tokens (`_keep_greedy_tokens`)."""
    def run_float() -> None:
        pipeline.load("onnxruntime", float_copy, 1, consent=consent).run(feeds[0])

    def quantize(source: Path, target: Path, unit_calibration: list[dict]) -> None:
        # a node alone is calibrated on its own input (the model's data does not feed it)
        quantizer.onnx(source, target, per_channel, unit_calibration)

    def agreement_of(nodes: dict[str, list[str]]) -> float:
        with scratch_directory("int8-trial") as trial:
            shutil.copytree(float_copy, trial, dirs_exist_ok=True)
            _quantize_graphs(trial, graphs, quantizer, per_channel, calibration, nodes, float_layers)
            session = pipeline.load(quantizer.runtime, trial, 1, consent=consent)
            return float(np.mean([token_agreement(r[-1], session.run(f)[-1]) for f, r in zip(feeds, references)]))

    chosen = choose_units(float_copy, graphs, run_float, quantizer.op_types, float_layers, quantize, progress,
                          quantizer.runtime)
    if pipeline.generates_tokens:
        _keep_greedy_tokens(chosen, agreement_of, progress)
    for key, c in chosen.items():
        count = sum(map(len, c["nodes"].values()))
        ratio = "" if c["int8_over_float"] is None else f"; {c['int8_over_float']:.2f}x float's time"
        progress(f"int8 {key} ({count} node{'s' * (count != 1)}): {'quantized' if c['quantized'] else 'stays float'} "
                 f"({c['reason']}{ratio})")
    return chosen


def _keep_greedy_tokens(chosen: dict[str, dict], agreement_of, progress) -> None:
    """Take signatures back to float until the quantized model keeps MIN_TOKEN_AGREEMENT of the float
    model's greedy tokens (`agreement_of(graph -> nodes)`): first those that pay only in size, all
    together, then the faster ones one at a time, the least faster first. Speed is not worth the
    model's answers; each signature taken back says so, with the agreement it was measured at."""
    size_only = [key for key, c in chosen.items() if c["quantized"] and c["verdict"] != "faster"]
    faster = sorted((key for key, c in chosen.items() if c["quantized"] and c["verdict"] == "faster"),
                    key=lambda key: -chosen[key]["int8_over_float"])
    for dropping in ([size_only] if size_only else []) + [[key] for key in faster]:
        agreement = agreement_of(chosen_nodes(chosen))
        progress(f"int8 of the chosen nodes keeps {100 * agreement:.0f}% of the float model's greedy tokens")
        if agreement >= MIN_TOKEN_AGREEMENT:
            return
        for key in dropping:
            kept = f"with it {100 * agreement:.0f}% of greedy tokens kept"
            chosen[key].update(quantized=False, greedy_token_agreement=agreement, reason=(
                f"faster ({chosen[key]['int8_over_float']:.2f}x float's time), but {kept} (below "
                f"{100 * MIN_TOKEN_AGREEMENT:.0f}%)" if key in faster else
                f"no clear difference in speed, and {kept}: only size would pay, at the model's answers"))


def _next_token_agreement(sessions: dict, feeds: Sequence[dict], references: Sequence[list]) -> dict[str, float]:
    """Per runtime whose session can score a continuation: the share of the float model's greedy tokens
    it predicts after the float model's own prefix (one near-tie flipped costs one token, not the rest of
    the continuation as in `greedy_token_agreement`)."""
    out = {}
    for runtime, session in sessions.items():
        if not isinstance(session, ScoresContinuations):
            continue
        shares = [session.next_token_agreement(f, r[-1]) for f, r in zip(feeds, references)]
        if all(share is not None for share in shares):
            out[runtime] = float(np.mean(shares))
    return out


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
    nodes = None
    if operators == "measured" and quantizer.op_types:
        chosen = _choose_nodes(float_copy, graphs, quantizer, per_channel, calibration, pipeline, feeds,
                               references, consent, progress, float_layers)
        record["operators"] = chosen
        nodes = chosen_nodes(chosen)
    count = None if nodes is None else sum(map(len, nodes.values()))
    progress(f"quantizing: {quantizer.description}" + (", per channel" if per_channel else "")
             + ("" if count is None else f"; {count} node{'s' * (count != 1)}" if count else
                "; no node (the graphs stay float)"))
    _quantize_graphs(directory, graphs, quantizer, per_channel, calibration, nodes, float_layers)
    manifest = dataclasses.replace(manifest, quantization=record, files=file_sizes(directory))
    write_text_atomic(directory / MANIFEST_FILE, manifest.to_json())  # the torch loader reads it

    progress("measuring the quantized model against the float one")
    runtime = quantizer.runtime  # where the scheme's graphs are meant to run: their speed and metric are its
    sessions = {name: pipeline.load(name, directory, 1, consent=consent) for name in (runtime, "torch")}
    outputs = {runtime: [s.run(f) for f in feeds] for runtime, s in sessions.items()}
    record["error"] = {runtime: error_statistics([a for r in references for a in r], [a for o in outs for a in o])
                       for runtime, outs in outputs.items()}
    if pipeline.generates_tokens:  # the last output is the greedy tokens
        record["greedy_token_agreement"] = {
            runtime: float(np.mean([token_agreement(r[-1], o[-1]) for r, o in zip(references, outs)]))
            for runtime, outs in outputs.items()}
        forced = _next_token_agreement(sessions, feeds, references)
        if forced:
            record["next_token_agreement"] = forced
    progress(f"timing int8 against float under {runtime} (interleaved rounds)")
    float_session = pipeline.load(runtime, float_copy, 1, consent=consent)
    quantized_session = sessions[runtime]
    timings = time_interleaved(lambda: float_session.run(feeds[0]), lambda: quantized_session.run(feeds[0]),
                               rounds=SPEED_ROUNDS, timer=timed_call)
    # the first call's rounds, and the second's
    record["speed"] = {**speed_verdict(timings.dense, timings.csr), "runtime": runtime}
    if spec.evaluate is not None:
        # the evaluation scores a model called like the PyTorch one: the scheme's runtime stands in for it
        # where the pipeline can call its graphs that way (a decoding evaluation cannot)
        progress("evaluating the quantized model")
        quantized_metrics = {"torch": spec.evaluate(load_torch_model(directory, consent=consent)[0])}
        if pipeline.scoring_model is not None:
            quantized_metrics[runtime] = spec.evaluate(pipeline.scoring_model(directory, spec.input_names,
                                                                              GraphOpener.on_cpu(runtime)))
        record["metrics"] = quantized_metrics
        record["metric_delta"] = {runtime: {k: v - manifest.metrics[k] for k, v in values.items()
                                            if k in manifest.metrics}
                                  for runtime, values in quantized_metrics.items()}
    return dataclasses.replace(manifest, quantization=record)
