"""torchvision's classification models as users bring them (random weights, small inputs): they shrink
with parity where torch-pruning can follow them, and are refused in one line where it cannot."""

import pytest

tvm = pytest.importorskip("torchvision.models")

from deploykit.core.errors import DeployKitError  # noqa: E402
from deploykit.export.build import export_artifact  # noqa: E402
from deploykit.model.spec import InputSpec, ModelSpec  # noqa: E402
from deploykit.prune.base import PruningPlan  # noqa: E402

IMAGE = (InputSpec("image", ("batch", 3, 64, 64)),)


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, build=lambda: getattr(tvm, name)(weights=None, num_classes=10), inputs=IMAGE,
                     outputs=("logits",))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_shrink_with_parity(name, tmp_path):
    m = export_artifact(_spec(name), PruningPlan("l1-structured", 0.3), "dense-shrunk", tmp_path / "a").manifest
    assert m.parameters < 0.85 * m.parameters_before_conversion
    assert m.onnx_parity_error <= m.parity_tolerance and max(m.form_parity_max_abs_error.values()) <= 1e-5


def test_a_graph_torch_pruning_cannot_follow_is_refused_in_one_line(tmp_path):
    # shufflenet's channel shuffle (a reshape torch-pruning divides by zero on)
    with pytest.raises(DeployKitError) as refused:
        export_artifact(_spec("shufflenet_v2_x0_5"), PruningPlan("l1-structured", 0.3), "dense-shrunk", tmp_path / "a")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "cannot build this model's dependency graph" in message
    assert "unstructured methods (magnitude, random) with --form dense or csr do" in message
    assert not (tmp_path / "a").exists()
    # and what the message offers works
    m = export_artifact(_spec("shufflenet_v2_x0_5"), PruningPlan("magnitude", 0.8, scope="layer"), "csr",
                        tmp_path / "b").manifest
    assert m.onnx_parity_error <= m.parity_tolerance
