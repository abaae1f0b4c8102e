import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from deploykit.convert.kernel_choice import KernelTimings, Round, decide
from deploykit.convert.onnx_export import check_parity, max_abs_errors, torch_outputs
from deploykit.core.errors import ArtifactError, ExportError, OutputPathError, ParityError
from deploykit.core.ort import ort_session
from deploykit.export.build import export_artifact
from deploykit.model.artifact import read_manifest
from deploykit.model.spec import InputSpec, ModelSpec
from deploykit.prune.base import PruningPlan
from deploykit.runtime.loading import load_torch_model


@pytest.fixture(scope="module")
def csr_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mlp-csr"
    return export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.9"), "csr", out)


def test_artifact_holds_weights_onnx_and_manifest(csr_artifact):
    directory = csr_artifact.directory
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx", "weights.safetensors"]
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    manifest = read_manifest(directory)
    assert manifest == csr_artifact.manifest
    assert manifest.model == "mlp-sst2" and manifest.form == "csr" and manifest.opset == 17
    assert manifest.plan["method"] == "magnitude" and manifest.plan["amount"] == 0.9
    assert manifest.parameters == 1_412_354
    assert manifest.files == {p.name: p.stat().st_size for p in directory.iterdir() if p.name != "manifest.json"}
    assert manifest.files["weights.safetensors"] < 0.14 * 5_649_416
    # csr is "sparse where it wins": candidates were timed both ways in interleaved rounds, kept raw, and
    # the choice is the rule's on those rounds; the others were never candidates
    kernels = manifest.form_recipe["kernels"]
    assert sorted(kernels) == ["mlp.0", "mlp.2", "mlp.4"] and manifest.form_recipe["kernel_batch"] == 1
    for decision in kernels.values():
        if "dense_rounds_ms" not in decision:
            assert decision["choice"] == "dense" and decision["reason"].startswith("not timed")
            continue
        timings = KernelTimings(*(tuple(Round(m, low) for m, low in zip(decision[f"{k}_rounds_ms"],
                                                                        decision[f"{k}_rounds_min_ms"]))
                                  for k in ("dense", "csr")))
        assert (decision["choice"], decision["noisy"]) == decide(timings)[:2]
    assert manifest.converted_layers == [n for n, d in kernels.items() if d["choice"] == "csr"]
    # sparse initializers where smaller (values + int64 indices): mlp.0 at 97% sparsity, not the 22% layers
    assert set(manifest.onnx_sparse_initializers) == {"mlp.0.weight"}
    assert manifest.files["model.onnx"] < 0.25 * 5_649_416
    assert manifest.weight_bytes["mlp.0.weight"] < manifest.files["weights.safetensors"]
    assert manifest.excluded_modules == ["mlp.6"]
    assert manifest.onnx_parity_error <= 1e-4
    assert manifest.versions["torch"].startswith("2.10.0") and "onnxruntime" in manifest.versions
    rows = {row["name"]: row for row in manifest.sparsity}
    assert rows["mlp.6.weight"]["sparsity"] == 0 and not rows["mlp.6.weight"]["pruned"]
    assert manifest.pruned_sparsity == pytest.approx(0.9, abs=1e-6)
    assert manifest.nonzero_parameters == sum(row["nonzero"] for row in manifest.sparsity)


def manifest_batch(result):
    return result.manifest.form_recipe["kernel_batch"]


def test_torch_model_reloads_with_the_recorded_kernels(csr_artifact, mlp_spec):
    model, manifest = load_torch_model(csr_artifact.directory, batch=manifest_batch(csr_artifact))
    reference, _ = load_torch_model(csr_artifact.directory, for_runtime=False)
    kinds = {name: type(model.get_submodule(name)).__name__ for name in manifest.form_recipe["kernels"]}
    assert kinds == {n: "CSRLinear" if n in manifest.converted_layers else "Linear" for n in kinds}
    assert isinstance(reference.mlp[0], nn.Linear)
    inputs = mlp_spec.example_inputs(7, seed=5)
    np.testing.assert_allclose(torch_outputs(model, inputs)[0], torch_outputs(reference, inputs)[0], atol=1e-5)


def test_csr_kernels_match_dense_within_1e_5(csr_artifact, mlp_spec):
    from deploykit.convert.sparse import swap_to_csr

    reference, manifest = load_torch_model(csr_artifact.directory, for_runtime=False)
    model, swapped = swap_to_csr(copy.deepcopy(reference), list(manifest.form_recipe["kernels"]))
    assert swapped == ["mlp.0", "mlp.2", "mlp.4"]
    for batch in (1, 32):
        inputs = mlp_spec.example_inputs(batch, seed=6)
        np.testing.assert_allclose(torch_outputs(model, inputs)[0], torch_outputs(reference, inputs)[0], atol=1e-5)


def test_onnx_batch_axis_is_dynamic(csr_artifact, mlp_spec):
    session = ort_session(csr_artifact.directory / "model.onnx", threads=1)
    reference, _ = load_torch_model(csr_artifact.directory, for_runtime=False)
    for batch in (1, 5):
        inputs = mlp_spec.example_inputs(batch, seed=9)
        (out,) = session.run(None, {"bow": inputs[0].numpy()})
        assert out.shape == (batch, 2)
        np.testing.assert_allclose(out, torch_outputs(reference, inputs)[0], atol=1e-4)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputPathError, match="already exists"):
        export_artifact("mlp-sst2", PruningPlan(), "dense", out)
    assert (out / "keep").exists()
    # --overwrite replaces only what deploykit wrote: a directory of someone's files is not that
    with pytest.raises(OutputPathError, match="it is not a deploykit artifact"):
        export_artifact("mlp-sst2", PruningPlan(), "dense", out, overwrite=True)
    assert (out / "keep").read_text() == "x"
    (out / "keep").unlink()
    out.rmdir()
    export_artifact("mlp-sst2", PruningPlan(), "dense", out)
    export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.5"), "dense", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


class TracesDifferently(nn.Module):
    """Its ONNX graph adds 1 that eager PyTorch does not: a real parity failure."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.fc(x)
        return y + 1.0 if torch.jit.is_tracing() else y


def test_parity_failure_names_the_output_and_writes_nothing(tmp_path):
    spec = ModelSpec("traces-differently", TracesDifferently, (InputSpec("x", ("batch", 4)),), ("y",))
    with pytest.raises(ParityError) as info:
        export_artifact(spec, PruningPlan(), "dense", tmp_path / "out")
    assert info.value.output == "y" and info.value.max_abs_error == pytest.approx(1.0)
    assert "onnxruntime vs PyTorch parity failed on output 'y': max abs error 1" in str(info.value)
    assert list(tmp_path.iterdir()) == []


class NoOnnxSymbolic(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x.reshape(-1, 2, 2))  # runs in eager; ONNX has no such operator


def test_exporter_failure_is_an_export_error_and_writes_nothing(tmp_path):
    spec = ModelSpec("no-onnx-symbolic", NoOnnxSymbolic, (InputSpec("x", ("batch", 4)),), ("y",))
    with pytest.raises(ExportError, match=r"^ONNX export failed \(UnsupportedOperatorError\): .*'aten::linalg_svdvals'"):
        export_artifact(spec, PruningPlan(), "dense", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_manifest_problems_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="not a deploykit artifact"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="cannot read"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "deploykit.artifact", "format_version": 1}))
    with pytest.raises(ArtifactError, match="missing fields"):
        read_manifest(tmp_path)


def test_kernel_choice_follows_measurement_far_from_the_crossover():
    from deploykit.convert.sparse import choose_kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 4)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand(2048, 2048) < 0.999] = 0  # 99.9% sparse: CSR does ~1/1000 of the work
        model[1].weight[torch.rand(2048, 2048) < 0.05] = 0  # 5% sparse: CSR only adds overhead
    decisions = choose_kernels(model, (torch.randn(1, 2048),))
    assert set(decisions) == {"0", "1"}  # the dense output layer has no zeros: not a candidate
    # real timing: on a preempted machine the decision falls back to dense, and says the rounds were noisy
    assert decisions["0"]["choice"] == "csr" or decisions["0"]["noisy"], decisions["0"]["reason"]
    assert decisions["1"]["choice"] == "dense"
    assert decisions["0"]["sparsity"] == pytest.approx(0.999, abs=2e-3)


@pytest.mark.parametrize("model, prune, form", [
    ("mlp-sst2", "magnitude:0.5", "dense"),
    ("mlp-sst2", "magnitude:0.9", "csr"),
    ("vae", "l1-structured:0.5", "dense-shrunk"),
])
def test_manifest_figures_describe_the_shipped_model(tmp_path, model, prune, form):
    from deploykit.model.artifact import count_weights

    plan = PruningPlan.parse(prune, scope="layer")
    m = export_artifact(model, plan, form, tmp_path / "a").manifest
    assert (m.parameters, m.nonzero_parameters) == count_weights(tmp_path / "a", m)  # counted in the file
    assert m.overall_sparsity == pytest.approx(1 - m.nonzero_parameters / m.parameters)
    assert m.remaining_flops_fraction == pytest.approx(m.sparse_flops / m.flops_before_conversion)
    assert m.sparse_flops <= m.flops <= m.flops_before_conversion
    assert m.overall_sparsity_before_conversion == pytest.approx(
        1 - m.nonzero_parameters_before_conversion / m.parameters_before_conversion)
    if form == "dense-shrunk":  # every remaining weight is nonzero: what is left is what runs
        assert m.nonzero_parameters == m.parameters < m.parameters_before_conversion
        assert m.overall_sparsity == 0 and m.overall_sparsity_before_conversion > 0.2
        assert m.sparse_flops == m.flops < m.flops_before_conversion
        assert m.remaining_flops_fraction == pytest.approx(m.flops / m.flops_before_conversion)
    else:  # nothing removed: the figures before and after conversion agree
        assert (m.parameters, m.nonzero_parameters) == (m.parameters_before_conversion,
                                                        m.nonzero_parameters_before_conversion)
        assert m.flops == m.flops_before_conversion and m.sparse_flops == m.sparse_flops_before_conversion
        assert m.pruned_sparsity == pytest.approx(m.pruned_sparsity_before_conversion)


class Underflows(nn.Module):
    """Outputs zero for every input (a random-init network whose activations underflow, say)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * 0.0


class IgnoresItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.fc.weight.data.zero_()  # only the bias is left: the same output for every input

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("module, says", [
    (Underflows, "output 'y' is identically zero on the parity inputs: parity on it proves nothing"),
    (IgnoresItsInput, "output 'y' is the same for every parity input (it does not depend on the input)"),
])
def test_parity_on_trivial_outputs_is_a_warning_and_an_error_when_strict(tmp_path, module, says):
    from deploykit.core.errors import QualityError

    spec = ModelSpec("trivial", module, (InputSpec("x", ("batch", 4)),), ("y",))
    messages = []
    manifest = export_artifact(spec, PruningPlan(), "dense", tmp_path / "a", progress=messages.append).manifest
    assert any(says in w for w in manifest.warnings) and f"warning: {manifest.warnings[0]}" in messages
    with pytest.raises(QualityError, match="--strict"):
        export_artifact(spec, PruningPlan(), "dense", tmp_path / "b", strict=True)
    assert not (tmp_path / "b").exists()


def test_parity_reports_the_relative_error_too(csr_artifact):
    m = csr_artifact.manifest
    assert set(m.onnx_parity_max_rel_error) == {"logits"}
    assert 0 <= m.onnx_parity_max_rel_error["logits"] <= m.onnx_parity_max_abs_error["logits"] * 1e6


def test_a_plan_that_empties_a_layer_stops_naming_it_unless_allowed(tmp_path):
    from deploykit.core.errors import UsageError

    # global magnitude at 0.95: mlp.0's small initial weights (5000 inputs) all fall under the threshold
    with pytest.raises(UsageError, match=r"prunes 1 layer to 100%, so nothing passes through it: mlp\.0; .*"
                                         r"--allow-layer-collapse"):
        export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.95"), "dense", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    m = export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.95", allow_layer_collapse=True), "dense",
                        tmp_path / "a").manifest
    assert "layers pruned to 100% (allowed by the plan): mlp.0" in m.notes
    rows = {row["name"]: row for row in m.sparsity}
    assert rows["mlp.0.weight"]["nonzero"] == 0 and rows["mlp.2.weight"]["nonzero"] > 0  # per layer, for review


def test_parity_check_fails_on_the_worst_output_and_on_nan():
    check_parity("ok", {"a": 1e-5, "b": 0.0}, 1e-4)  # within tolerance: nothing raised
    with pytest.raises(ParityError, match="'b'"):
        check_parity("x", {"a": 0.0, "b": 1.0}, 1e-4)  # the worst output is the one named
    with pytest.raises(ParityError):
        check_parity("x", {"a": float("nan")}, 1e-4)  # NaN compares false with everything: not a pass


def test_max_abs_errors_counts_both_directions_and_refuses_other_shapes_and_counts():
    reference = [np.array([1.0, -2.0], dtype=np.float32), np.zeros((2, 3), dtype=np.float32)]
    below = [np.array([0.5, -2.0], dtype=np.float32), np.zeros((2, 3), dtype=np.float32)]
    assert max_abs_errors(reference, below, ["y", "z"]) == {"y": 0.5, "z": 0.0}  # actual below reference
    transposed = [reference[0], np.zeros((3, 2), dtype=np.float32)]  # same size, another shape
    assert max_abs_errors(reference, transposed, ["y", "z"]) == {"y": 0.0, "z": float("inf")}
    assert max_abs_errors(reference, reference[:1], ["y", "z"]) == {"y": float("inf"), "z": float("inf")}
