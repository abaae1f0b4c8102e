"""Which weight-bearing operators of an artifact's graphs dynamic int8 quantizes: each timed on its own
input, as csr's kernel choice times each layer.

Dynamic int8 pays unevenly. A MatMul with a large weight and many input rows runs faster on integer
kernels; a small one, a decoder step's single row, or a ConvInteger can be slower than float, because
quantizing the activation on every call costs more than the integer product saves. Timing one
operator type at a time (every MatMul at once) cannot tell those apart, and timing the whole pipeline
hides an encoder's loss inside the decoding loop's time. So every node that carries a weight (the
nodes onnxruntime's dynamic quantizer would rewrite) is timed alone: its real input, captured from a
float run of the artifact's own pipeline on its benchmark input, fed to a one-node graph, float
against that graph as the quantizer rewrites it, in interleaved rounds on one thread, in the runtime
the scheme is made for (onnxruntime; OpenVINO for NNCF's schemes). Nodes with the
same signature (graph, operator, input and weight shapes, attributes) share one measurement, and the
manifest keeps one decision per signature with the nodes it covers.

Our own code: onnxruntime's quantizer takes the list of nodes to quantize but does not measure, and
its tools time whole models only.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deploykit.convert.kernel_choice import PREEMPTED, Round, time_interleaved
from deploykit.convert.quantize import gemm_to_matmul, nodes_of_layers
from deploykit.core.fsutil import scratch_directory
from deploykit.core.measure import measure
from deploykit.core.ort import ort_session, recording_feeds
from deploykit.runtime.graphs import GraphOpener

#: int8 must take at least 1 + SLOWER (or at most 1 - FASTER) of float's time in every round to be called so
SLOWER = FASTER = 0.10
#: interleaved float/int8 rounds, each at least ROUND_MIN_TIME_S and ROUND_MIN_CALLS calls
SPEED_ROUNDS, ROUND_MIN_TIME_S, ROUND_MIN_CALLS = 5, 0.05, 3
#: a node is warmed up for UNIT_WARMUP_S, then timed in samples of at least SAMPLE_MIN_S of back-to-back
#: calls: a decoder step's nodes take microseconds, and timed call by call their samples show the timer's
#: and the scheduler's granularity (a round's median over twice its fastest call on a quiet machine)
UNIT_WARMUP_S, SAMPLE_MIN_S = 0.02, 5e-4
#: a batched round is preempted when its median exceeds PREEMPTED times this percentile of its samples
FLOOR_PERCENTILE = 10
#: which input of a weight-bearing node is the weight, and which the activation it is called on
WEIGHT_INPUT = {"MatMul": 1, "Conv": 1, "Gather": 0}
ACTIVATION_INPUT = {"MatMul": 0, "Conv": 0, "Gather": 1}


def _round_of(call):
    """One timing round of `call` (its Measurement): at least ROUND_MIN_TIME_S and ROUND_MIN_CALLS samples."""
    return measure(call, warmup_s=0.0, min_time_s=ROUND_MIN_TIME_S, min_iters=ROUND_MIN_CALLS)


def timed_call(call) -> Round:
    m = _round_of(call)
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


@dataclass(frozen=True)
class Unit:
    """One weight-bearing node of a graph (as the quantizer sees it: Gemm already rewritten as MatMul)."""

    graph: str
    node: str
    op_type: str
    #: the node's activation input and its weight's name
    activation: str
    weight: str
    #: the node itself and the initializers it reads (what its one-node graph is made of)
    proto: object = field(compare=False, repr=False)
    constants: tuple = field(compare=False, repr=False)


def units_of(model, graph: str, op_types: Sequence[str], excluded: Sequence[str]) -> list[Unit]:
    """The named nodes of `model` (a graph file named `graph`) of `op_types` whose weight is a float
    initializer and whose other inputs are initializers too, apart from the activation: what the
    dynamic quantizer rewrites. Nodes named in `excluded` are left out. A MatMul of two activations (attention scores)
    carries no weight: quantizing it saves no bytes, so it is not a unit and stays float."""
    from onnx import TensorProto

    weights = {init.name: init for init in model.graph.initializer}
    floats = {name for name, init in weights.items() if init.data_type == TensorProto.FLOAT}
    out = []
    for node in model.graph.node:
        # the quantizer is told nodes by name, and rewrites float weights only (not a Gather of shapes)
        if (node.op_type not in op_types or node.op_type not in WEIGHT_INPUT or not node.name
                or node.name in excluded or node.input[WEIGHT_INPUT[node.op_type]] not in floats):
            continue
        weight, activation = node.input[WEIGHT_INPUT[node.op_type]], node.input[ACTIVATION_INPUT[node.op_type]]
        others = [name for name in node.input if name and name not in (weight, activation)]
        if weight in weights and activation not in weights and all(name in weights for name in others):
            constants = tuple(weights[name] for name in dict.fromkeys(node.input) if name in weights)
            out.append(Unit(graph, node.name, node.op_type, activation, weight, node, constants))
    return out


def _with_outputs(model, names: Sequence[str]):
    """A copy of `model` that also outputs the values `names` (intermediate activations)."""
    from onnx import helper

    copy = type(model)()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in dict.fromkeys(names):
        if name not in existing:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def capture_activations(path: Path, model, feeds: dict, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values `names` take in `model` (the graph at `path`, rewritten) when fed `feeds`: run with
    onnxruntime's optimisations off, so that every intermediate keeps its name."""
    import onnx

    with scratch_directory("activations") as tmp:
        probe = tmp / path.name
        onnx.save(_with_outputs(model, names), str(probe))
        session = ort_session(probe, threads=1, optimization="disabled", probe=True)
        wanted = list(dict.fromkeys(names))
        graph_inputs = {i.name for i in session.get_inputs()}
        values = session.run(wanted, {k: v for k, v in feeds.items() if k in graph_inputs})
    return dict(zip(wanted, values))


def _one_node_model(source, unit: Unit, activation: np.ndarray):
    """`unit`'s node alone, its weights as initializers, its activation the graph's input (`source`, the
    graph it is from, gives the opset and IR version)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [unit.proto], "unit",
        [helper.make_tensor_value_info(unit.activation, helper.np_dtype_to_tensor_dtype(activation.dtype),
                                       activation.shape)],
        [helper.make_tensor_value_info(unit.proto.output[0], TensorProto.FLOAT, None)],
        initializer=list(unit.constants))
    model = helper.make_model(graph, opset_imports=source.opset_import)
    model.ir_version = source.ir_version
    return model


def signature(unit: Unit, activation: np.ndarray) -> str:
    """What a node's speed under int8 depends on: its graph, operator, input and weight shapes and
    attributes (nodes sharing it share one measurement)."""
    from onnx import helper

    weight = next(init for init in unit.constants if init.name == unit.weight)
    attributes = {a.name: helper.get_attribute_value(a) for a in unit.proto.attribute}
    text = (f"{unit.graph} {unit.op_type} {'x'.join(map(str, activation.shape)) or 'scalar'} @ "
            f"{'x'.join(map(str, weight.dims))}")
    if attributes:
        digest = hashlib.sha256(repr(sorted(attributes.items())).encode()).hexdigest()[:8]
        text += f" [{digest}]"
    return text


def time_unit(source, unit: Unit, activation: np.ndarray, quantize: Callable[[Path, Path, list[dict]], None],
              runtime: str = "onnxruntime") -> dict | None:
    """float against int8 for one node on its input, interleaved, in `runtime` on the CPU
    (`quantize(float path, int8 path, calibration)` rewrites a graph; the node's own input is its
    calibration); None when the quantizer leaves the node as it is (it has no int8 form)."""
    import onnx

    with scratch_directory("unit") as tmp:
        plain, quantized = tmp / "float.onnx", tmp / "int8.onnx"
        onnx.save(_one_node_model(source, unit, activation), str(plain))
        feeds = {unit.activation: activation}
        quantize(plain, quantized, [feeds])
        if [n.op_type for n in onnx.load(str(quantized)).graph.node] == [unit.op_type]:
            return None
        opener = GraphOpener.on_cpu(runtime)
        sessions = [opener(path) for path in (plain, quantized)]
        plain_run, int8_run = (_batch_of(lambda s=session: s.run(None, feeds)) for session in sessions)
        timings = time_interleaved(plain_run, int8_run, rounds=SPEED_ROUNDS, timer=_timed_batch)
    return speed_verdict(timings.dense, timings.csr)


@dataclass(frozen=True)
class _Batch:
    """`call` made `calls` times back to back (one timed sample)."""

    call: Callable[[], object]
    calls: int

    def __call__(self) -> None:
        for _ in range(self.calls):
            self.call()


def _batch_of(call: Callable[[], object]) -> _Batch:
    """`call` warmed up, in batches as long as a sample of SAMPLE_MIN_S needs."""
    warm = measure(call, warmup_s=UNIT_WARMUP_S, min_time_s=0.0, min_iters=ROUND_MIN_CALLS)
    return _Batch(call, max(1, math.ceil(SAMPLE_MIN_S * 1e3 / max(warm.median_ms, 1e-6))))


@dataclass(frozen=True)
class BatchRound:
    """One round of a node's batched samples, per call: its median and its FLOOR_PERCENTILE sample.

    Preempted when the median exceeds PREEMPTED times that floor: a batch of calls that happens to
    run twice as fast as the others is an outlier on a VM (seen at 1.9x on a quiet machine), so the
    fastest sample, which csr's one-call samples are judged against, would flag quiet rounds."""

    median_ms: float
    floor_ms: float

    @property
    def preempted(self) -> bool:
        return self.median_ms > PREEMPTED * self.floor_ms


def _timed_batch(batch: _Batch) -> BatchRound:
    """One round of `batch`, per call."""
    m = _round_of(batch)
    return BatchRound(m.median_ms / batch.calls, m.percentile_ms(FLOOR_PERCENTILE) / batch.calls)


def decision(verdict: dict) -> tuple[bool, str]:
    """(quantize, why) for one signature's verdict: float where int8 is slower in every round, or where
    preempted rounds leave it unknown (the choice that cannot make the model slower); int8 otherwise."""
    if verdict["verdict"] == "slower":
        return False, "slower than float in every round"
    if verdict["verdict"] == "faster":
        return True, "faster than float"
    if verdict["preempted_rounds"]:
        return False, "timing rounds preempted by other load: kept float, the safe choice"
    return True, "no clear difference in speed; smaller"


def choose_units(directory: Path, graphs: Sequence[str], run_pipeline: Callable[[], object], op_types: Sequence[str],
                 float_layers: Sequence[str], quantize: Callable[[Path, Path, list[dict]], None], progress,
                 runtime: str = "onnxruntime") -> dict[str, dict]:
    """Signature -> decision record (operator, its nodes by graph, quantize or not and why, the rounds)
    for the weight-bearing nodes of `graphs` in `directory` (a float copy of the artifact).

    `run_pipeline()` loads the artifact's pipeline from that copy and runs it on its benchmark input
    (loaded inside, its sessions record their feeds): each graph's last call is the input its nodes
    are timed on (a decoder's last step: the cache at its longest). A graph the pipeline does not run
    there (GPT-2's full-sequence graph, which scores perplexity) has no input to time on: its nodes
    follow their twins, the nodes of the same name and weight in a graph that ran (optimum's graphs
    of one model share them), and a node without a twin stays float, in a record that says so."""
    import onnx

    with recording_feeds() as calls:
        run_pipeline()
    chosen: dict[str, dict] = {}
    twins: dict[tuple[str, str], str] = {}  # (node, weight) -> signature
    no_int8_form: set[str] = set()
    unrun = []
    for graph in graphs:
        path = directory / graph
        feeds = calls.get(path.resolve())
        model = gemm_to_matmul(onnx.load(str(path)))
        units = units_of(model, graph, op_types, nodes_of_layers(model.graph, float_layers))
        if feeds is None:
            unrun.append((graph, units))
            continue
        activations = capture_activations(path, model, feeds, [u.activation for u in units]) if units else {}
        for unit in units:
            key = signature(unit, activations[unit.activation])
            if key not in chosen and key not in no_int8_form:
                progress(f"timing int8 against float: {key}")
                verdict = time_unit(model, unit, activations[unit.activation], quantize, runtime)
                if verdict is None:
                    no_int8_form.add(key)
                    continue
                keep, reason = decision(verdict)
                chosen[key] = {"op": unit.op_type, "nodes": {}, "quantized": keep, "reason": reason, **verdict}
            if key in chosen:
                chosen[key]["nodes"].setdefault(graph, []).append(unit.node)
                twins[(unit.node, unit.weight)] = key
    for graph, units in unrun:
        for unit in units:
            key = twins.get((unit.node, unit.weight), f"{graph} (not run by the pipeline)")
            if key not in chosen:
                chosen[key] = {"op": None, "nodes": {}, "quantized": False, "int8_over_float": None,
                               "verdict": "not timed", "reason": "no twin in a graph the pipeline runs on its "
                               "benchmark input, so no input to time it on: stays float"}
            chosen[key]["nodes"].setdefault(graph, []).append(unit.node)
    return chosen


def chosen_nodes(chosen: dict[str, dict]) -> dict[str, list[str]]:
    """Graph -> names of the nodes to quantize."""
    out: dict[str, list[str]] = {}
    for record in chosen.values():
        if record["quantized"]:
            for graph, nodes in record["nodes"].items():
                out.setdefault(graph, []).extend(nodes)
    return out
