"""OpenVINO as a runtime (issue 38, part 1): the forward and onnx-file pipelines, its settings recorded."""

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from deploykit.core.errors import ArtifactError
from deploykit.core.extras import MissingExtraError
from deploykit.export.build import export_artifact
from deploykit.model.onnxfile import with_dense_initializers
from deploykit.pipelines.catalog import PIPELINES
from deploykit.prune.base import PruningPlan
from deploykit.runtime.session import RUNTIMES

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def csr_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "csr"
    export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.9"), "csr", path)
    return path


def test_openvino_runs_an_artifact_as_onnxruntime_does_with_its_settings_said(csr_artifact):
    manifest = json.loads((csr_artifact / "manifest.json").read_text())
    assert manifest["onnx_sparse_initializers"]  # the graph OpenVINO's reader cannot take as it is
    pipeline = PIPELINES.get("forward")
    feeds = {"bow": np.random.default_rng(0).random((3, 5000), dtype=np.float32)}
    ov = pipeline.load("openvino", csr_artifact, 1)
    ort = pipeline.load("onnxruntime", csr_artifact, 1)
    (ours,), (theirs,) = ov.run(feeds), ort.run(feeds)
    assert ours.shape == (3, 2) and np.allclose(ours, theirs, atol=1e-5)
    assert (ov.info.runtime, ov.info.threads, ov.info.device) == ("openvino", 1, "CPU latency f32")
    assert ov.info.version.startswith("20") and ov.files == ("model.onnx",)
    assert set(ov.stages(feeds)) == {"forward"}


def test_a_bench_row_under_openvino_is_recorded_with_parity(cli, csr_artifact, tmp_path):
    result = cli("bench", str(csr_artifact), "--runtime", "openvino", "--batch", "2", "--threads", "1",
                 "--min-time", "0.02", "--warmup", "0.01", "--timing-rounds", "2", "--no-store", "--json",
                 str(tmp_path / "rows.json"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["records"]
    assert [(r["runtime"], r["device"], r["threads"]) for r in rows] == [("openvino", "CPU latency f32", 1)]
    assert rows[0]["parity_max_abs_error"] < 1e-4
    assert "openvino densify sparse initializers" in result.stdout


def test_a_pipeline_it_does_not_load_is_refused_in_one_line():
    with pytest.raises(Exception, match="runtime 'openvino' cannot run 'text-generation' artifacts"):
        PIPELINES.get("text-generation").load("openvino", ".", 1)


def test_without_the_extra_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ModuleNotFoundError
    with pytest.raises(MissingExtraError, match=r"pip install 'deploykit\[openvino\]'"):
        RUNTIMES.get("openvino").available_devices()


def _sparse_model(indices, dims=(2, 3)):
    values = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "w")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array(indices, dtype=np.int64)), list(dims))
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(dims))],
                              sparse_initializer=[sparse])
    return helper.make_model(graph)


def test_sparse_initializers_are_made_dense_and_damaged_ones_refused(tmp_path):
    dense = with_dense_initializers(_sparse_model([1, 5]), tmp_path / "m.onnx")
    assert not dense.graph.sparse_initializer
    assert numpy_helper.to_array(dense.graph.initializer[0]).tolist() == [[0, 1, 0], [0, 0, 2]]
    coordinates = with_dense_initializers(_sparse_model([[0, 1], [1, 2]]), tmp_path / "m.onnx")
    assert numpy_helper.to_array(coordinates.graph.initializer[0]).tolist() == [[0, 1, 0], [0, 0, 2]]
    for bad in ([1, 6], [-1, 2], [[0, 3], [1, 2]], [1]):
        with pytest.raises(ArtifactError, match="sparse initializer 'w'"):
            with_dense_initializers(_sparse_model(bad), tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match="more than this machine's free memory"):
        with_dense_initializers(_sparse_model([1, 5], dims=(2**31, 2**31)), tmp_path / "m.onnx")
