import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from deploykit.model.catalog import get_model

REPO = Path(__file__).resolve().parents[1]

# Benchmarks run by the tests keep their results in a store of their own, not the user's, and see
# only the shipped profiles.
_SCRATCH = Path(tempfile.mkdtemp(prefix="deploykit-tests-"))
os.environ["DEPLOYKIT_STORE"] = str(_SCRATCH / "results.sqlite")
os.environ["DEPLOYKIT_PROFILES"] = str(_SCRATCH / "profiles")


@pytest.fixture(scope="session")
def mlp_spec():
    return get_model("mlp-sst2")


@pytest.fixture
def mlp(mlp_spec):
    return mlp_spec.make()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """mlp-sst2 at magnitude 0.5, dense: the artifact the trust and fuzz suites copy and damage."""
    from deploykit.export.build import export_artifact
    from deploykit.prune.base import PruningPlan

    path = tmp_path_factory.mktemp("artifact") / "art"
    export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.5"), "dense", path)
    return path


@pytest.fixture
def copy(artifact, tmp_path):
    """A function making a fresh copy of `artifact` under the test's folder (default name "a")."""

    def make(name="a"):
        target = tmp_path / name
        shutil.copytree(artifact, target)
        return target

    return make


@pytest.fixture(scope="module")
def matmul_onnx(tmp_path_factory):
    """mm.onnx: y = x @ W, x of shape (batch, 4), float: the smallest ONNX file to bench."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = tmp_path_factory.mktemp("onnx") / "mm.onnx"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
