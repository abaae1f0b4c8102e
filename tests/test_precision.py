"""Precision as a measured axis (issue 38): offered per runtime, run only where the machine computes it
natively, its quality measured in it."""

import json

import numpy as np
import onnx
import pytest

from deploykit.core.errors import ArtifactError, UsageError
from deploykit.export.build import export_artifact
from deploykit.model.artifact import read_manifest
from deploykit.pipelines.catalog import PIPELINES
from deploykit.prune.base import PruningPlan
from deploykit.runtime import precisions
from deploykit.runtime.devices import place
from deploykit.runtime.graphs import float16_graph
from deploykit.runtime.precisions import cpu_precisions
from deploykit.runtime.profiles import current_profile, known_profiles, profile_from_dict
from deploykit.runtime.session import Target

BF16_HERE = "bf16" in cpu_precisions()


def test_a_cpu_computes_what_its_flags_say():
    assert cpu_precisions(frozenset({"avx2", "avx512f"})) == ("f32",)
    assert cpu_precisions(frozenset({"avx512_bf16"})) == ("f32", "bf16")
    assert cpu_precisions(frozenset({"amx_bf16", "amx_fp16"})) == ("f32", "bf16", "f16")
    assert cpu_precisions(frozenset({"asimdhp"})) == ("f32", "f16")  # an Arm CPU with FP16 arithmetic


def test_a_precision_the_cpu_would_emulate_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx2"}))
    placement = place(("torch",), ("cpu",), current_profile(), precisions=("f32", "bf16"))
    assert [(t.runtime, t.precision) for t in placement.targets] == [("torch", "f32")]
    assert any("torch on cpu at bf16: skipped: this CPU computes bf16 natively only with AVX-512 BF16 or AMX" in n
               and "emulated" in n for n in placement.notes)


def test_a_precision_no_runtime_of_the_run_offers_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--precision bf16: no runtime of this run offers it \(onnxruntime: f32, f16\)"):
        place(("onnxruntime",), ("cpu",), current_profile(), precisions=("bf16",))


def test_a_runtime_that_does_not_offer_a_precision_says_so():
    placement = place(("torch", "onnxruntime"), ("cpu",), current_profile(), precisions=("f32", "bf16"))
    assert "onnxruntime at bf16: not measured: onnxruntime offers f32, f16" in placement.notes
    assert ("onnxruntime", "f32") in [(t.runtime, t.precision) for t in placement.targets]


def test_onnxruntime_float16_is_offered_only_where_its_kernels_compute_it():
    placement = place(("onnxruntime",), ("cpu",), current_profile(), precisions=("f32", "f16"))
    assert [t.precision for t in placement.targets] == ["f32"]
    assert any("onnxruntime on CPUExecutionProvider at f16: skipped" in n for n in placement.notes)


def test_the_float16_graph_keeps_float32_inputs_and_outputs(artifact):
    model = onnx.load_from_string(float16_graph(artifact / "model.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_bad_precisions_on_the_command_line_exit_2(cli, artifact, tmp_path):
    unknown = cli("bench", str(artifact), "--precision", "f64", "--no-store")
    assert unknown.returncode == 2 and "unknown precision 'f64'; known: f32, bf16, f16" in unknown.stderr
    none = cli("bench", str(artifact), "--runtime", "onnxruntime", "--precision", "bf16", "--no-store",
               "--json", str(tmp_path / "rows.json"))
    assert none.returncode == 2 and "no runtime of this run offers it" in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1 and not (tmp_path / "rows.json").exists()


def test_torch_autocast_computes_in_bf16_and_returns_float32(artifact):
    pipeline = PIPELINES.get("forward")
    feeds = pipeline.inputs(artifact, read_manifest(artifact), 2, 0, None)
    f32 = pipeline.load("torch", artifact, 1).run(feeds)
    bf16 = pipeline.load("torch", artifact, 1, Target("torch", "cpu", precision="bf16")).run(feeds)
    assert bf16[0].dtype == np.float32 and bf16[0].shape == f32[0].shape
    error = np.max(np.abs(bf16[0] - f32[0]))
    assert 0 < error < 0.1 * max(1.0, float(np.max(np.abs(f32[0]))))  # changed, as bf16 does, not broken


@pytest.mark.skipif(not BF16_HERE, reason="this CPU does not compute bf16 natively: the bench skips it")
def test_a_bf16_row_carries_its_own_quality_and_the_table_names_the_fastest(cli, tmp_path):
    pytest.importorskip("openvino")
    directory = tmp_path / "a"
    export_artifact("mlp-sst2-trained", PruningPlan("magnitude", 0.5), "dense", directory)
    result = cli("bench", str(directory), "--runtime", "torch,openvino", "--precision", "f32,bf16", "--threads", "1",
                 "--min-time", "0.02", "--warmup", "0.01", "--timing-rounds", "2", "--no-store",
                 "--json", str(tmp_path / "rows.json"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["records"]
    assert sorted((r["runtime"], r["precision"]) for r in rows) == [
        ("openvino", "bf16"), ("openvino", "f32"), ("torch", "bf16"), ("torch", "f32")]
    for row in rows:
        assert set(row["metrics"]) == {"accuracy"}
        assert (row["parity_tolerance"] is None) == (row["precision"] == "bf16")
    assert [r["device"] for r in rows if r["runtime"] == "openvino" and r["precision"] == "bf16"] == ["CPU latency bf16"]
    assert "measuring mlp-sst2-trained magnitude:0.5 form=dense's quality under torch at bf16" in result.stderr
    assert "precision" in result.stdout and "note: fastest on " in result.stdout


def test_shipped_profiles_say_which_precisions_they_compute():
    profiles = known_profiles()
    assert profiles["intel-i7-11800h"].cpu.precisions == ("f32",)  # Tiger Lake: VNNI, no AVX-512 BF16
    assert profiles["nvidia-t4-cloud"].gpu.precisions == ("f32", "f16")  # Turing: no bf16
    assert all(p.runtime.openvino_devices == ("CPU",) for p in profiles.values())


def test_a_profile_naming_an_unknown_precision_is_refused():
    with pytest.raises(ArtifactError, match="unknown precision 'f8'"):
        profile_from_dict({"name": "x", "description": "x", "cpu": {"model": "m", "precisions": ["f32", "f8"]}}, "x.toml")


def test_a_fleet_task_asks_its_runtime_only_for_the_precisions_it_offers():
    from deploykit.bench.settings import Grid
    from deploykit.fleet.fanout import Shipped, configurations

    shipped = Shipped("mlp-sst2", "magnitude:0.5", "dense", ref=None, digest="d", consent=())
    grid = Grid(runtimes=("torch", "onnxruntime"), precisions=("bf16",))
    tasks = configurations([shipped], ["laptop"], grid)
    assert [(c.runtime, c.grid(grid).precisions) for c in tasks] == [("torch", ("bf16",))]  # onnxruntime has no bf16
    both = Grid(runtimes=("torch", "onnxruntime"), precisions=("f32", "bf16"))
    assert [(c.runtime, c.grid(both).precisions) for c in configurations([shipped], ["laptop"], both)] == [
        ("torch", ("f32", "bf16")), ("onnxruntime", ("f32",))]
