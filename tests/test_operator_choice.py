"""int8's node-by-node choice: which nodes are units, the inputs they are timed on, and what shares a timing."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.core.ort import ort_session, recording_feeds
from deploykit.export import operator_choice
from deploykit.export.operator_choice import capture_activations, signature, units_of


def _graph(tmp_path):
    """x (1, T, 8) -> two 8x8 projections of the same shape, their product (attention-like), an 8x4 one."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("wq", (8, 8)), ("wk", (8, 8)), ("wo", (8, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("MatMul", ["scores", "q"], ["mixed"], name="mix"),
             helper.make_node("MatMul", ["mixed", "wo"], ["y"], name="out_proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return model, path


def test_units_are_the_nodes_with_a_weight(tmp_path):
    model, _ = _graph(tmp_path)
    units = units_of(model, "g.onnx", ("MatMul",), excluded=())
    # the product of two activations carries no weight: quantizing it would save no bytes
    assert [u.node for u in units] == ["q_proj", "k_proj", "out_proj"]
    assert [u.node for u in units_of(model, "g.onnx", ("MatMul",), excluded=["out_proj"])] == ["q_proj", "k_proj"]
    assert units_of(model, "g.onnx", ("Conv",), excluded=()) == []
    shapes = helper.make_node("Gather", ["table", "x_index"], ["picked"], name="shape_lookup")
    model.graph.initializer.append(numpy_helper.from_array(np.arange(4, dtype=np.int64), "table"))
    model.graph.node.append(shapes)
    unnamed = helper.make_node("MatMul", ["y", "wq"], ["z"])
    model.graph.node.append(unnamed)
    # an integer table is not a weight int8 rewrites; a node without a name cannot be asked for by name
    assert [u.node for u in units_of(model, "g.onnx", ("MatMul", "Gather"), excluded=())] == [
        "q_proj", "k_proj", "out_proj"]


def test_sessions_record_the_feeds_of_their_last_run_only_while_asked(tmp_path):
    _, path = _graph(tmp_path)
    first, last = (np.full((1, n, 8), n, dtype=np.float32) for n in (3, 5))
    with recording_feeds() as calls:
        session = ort_session(path, threads=1)
        session.run(None, {"x": first})
        session.run(None, {"x": last})
        assert [i.name for i in session.get_inputs()] == ["x"]  # otherwise the session itself
    assert list(calls) == [path.resolve()] and calls[path.resolve()]["x"] is last
    assert not hasattr(ort_session(path, threads=1), "_calls")  # outside, a plain session


def test_nodes_are_timed_on_their_real_input_and_equal_signatures_share_one_timing(tmp_path):
    model, path = _graph(tmp_path)
    units = units_of(model, "g.onnx", ("MatMul",), excluded=())
    x = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32)
    activations = capture_activations(path, model, {"x": x}, [u.activation for u in units])
    assert np.array_equal(activations["x"], x) and activations["mixed"].shape == (1, 5, 8)
    keys = [signature(u, activations[u.activation]) for u in units]
    assert keys == ["g.onnx MatMul 1x5x8 @ 8x8", "g.onnx MatMul 1x5x8 @ 8x8", "g.onnx MatMul 1x5x8 @ 8x4"]


def test_a_node_timed_alone_runs_float_and_int8_and_says_when_int8_has_no_form(tmp_path):
    pytest.importorskip("onnxruntime")
    from deploykit.convert.quantize import QUANTIZERS

    model, path = _graph(tmp_path)
    unit = units_of(model, "g.onnx", ("MatMul",), excluded=())[0]
    x = np.ones((1, 64, 8), dtype=np.float32)
    int8 = QUANTIZERS.get("int8")
    verdict = operator_choice.time_unit(model, unit, x, lambda a, b, calibration: int8.onnx(a, b, False, calibration))
    assert verdict["rounds"] == operator_choice.SPEED_ROUNDS and verdict["verdict"] in (
        "faster", "slower", "no clear difference")
    unchanged = operator_choice.time_unit(model, unit, x, lambda a, b, calibration: b.write_bytes(a.read_bytes()))
    assert unchanged is None


def test_a_graph_the_pipeline_does_not_run_follows_its_twins_or_stays_float(tmp_path, monkeypatch):
    from deploykit.export.operator_choice import choose_units, chosen_nodes

    model, path = _graph(tmp_path)
    other = tmp_path / "full.onnx"  # the same layers in a second graph, and one of its own
    extra = helper.make_node("MatMul", ["y", "wo2"], ["y2"], name="extra_proj")
    model.graph.node.append(extra)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "wo2"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    onnx.save(model, str(other))
    monkeypatch.setattr(operator_choice, "time_unit", lambda source, unit, activation, quantize, runtime: {
        "verdict": "faster", "int8_over_float": 0.5, "rounds": 5, "preempted_rounds": 0})

    def run_pipeline():  # what the pipeline runs: only g.onnx
        ort_session(path, threads=1).run(None, {"x": np.ones((1, 5, 8), dtype=np.float32)})

    chosen = choose_units(tmp_path, ["g.onnx", "full.onnx"], run_pipeline, ("MatMul",), [],
                          quantize=None, progress=lambda _: None)
    assert chosen["g.onnx MatMul 1x5x8 @ 8x8"]["nodes"] == {"g.onnx": ["q_proj", "k_proj"],
                                                          "full.onnx": ["q_proj", "k_proj"]}
    alone = chosen["full.onnx (not run by the pipeline)"]
    assert alone["nodes"] == {"full.onnx": ["extra_proj"]} and alone["quantized"] is False
    assert chosen_nodes(chosen) == {"g.onnx": ["q_proj", "k_proj", "out_proj"],
                                    "full.onnx": ["q_proj", "k_proj", "out_proj"]}


def test_microsecond_nodes_are_timed_in_batches_and_reported_per_call():
    import time

    long_call = operator_choice._batch_of(lambda: time.sleep(0.002))
    assert long_call.calls == 1  # a call longer than a sample is its own sample
    short_call = operator_choice._batch_of(lambda: None)
    assert short_call.calls >= 100  # far below a timer tick: many calls per sample
    ran = []
    operator_choice._Batch(lambda: ran.append(1), 7)()
    assert len(ran) == 7
    per_call = operator_choice._timed_batch(operator_choice._Batch(lambda: time.sleep(0.0005), 4))
    assert 0.5 <= per_call.median_ms < 2.0 and per_call.floor_ms <= per_call.median_ms


def test_a_batched_round_is_preempted_by_a_slow_majority_not_by_one_fast_sample():
    from deploykit.export.operator_choice import BatchRound

    assert not BatchRound(median_ms=1.0, floor_ms=0.9).preempted
    assert BatchRound(median_ms=1.0, floor_ms=0.4).preempted  # most samples took over twice the fast tenth
