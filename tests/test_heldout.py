"""Models shaped like the pretrained ones people bring (`models/examples/heldout.py`): several output
heads, an output layer that is not the last module run, PReLU, an LSTM, a permute before a flatten,
TorchScript, ONNX files with weights in Constant nodes or a scalar input."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO

from deploykit.export.build import export_artifact
from deploykit.model.sources import ModelOptions, resolve_model
from deploykit.prune.base import PruningPlan, detect_output_layers, output_layers_by_output

HELDOUT = REPO / "models" / "examples" / "heldout.py"


def spec(name, **options):
    return resolve_model(f"{HELDOUT}:{name}", ModelOptions(**options))


def built(name):
    s = spec(name)
    return s.make(), s.example_inputs(2)


def one_error_line(stderr: str) -> bool:
    """The refusal is one line, after the progress lines, and no traceback."""
    lines = stderr.strip().splitlines()
    return lines[-1].startswith("deploykit: error: ") and sum("error" in line for line in lines) == 1 and \
        "Traceback" not in stderr


def test_every_head_is_an_output_layer_wherever_it_runs():
    assert output_layers_by_output(*built("two_heads")) == {"output_0": ["classifier"], "output_1": ["regressor"]}
    # the one-unit scorer runs after the head: both produce the output
    assert detect_output_layers(*built("late_head")) == ["head", "score"]


def test_a_layer_feeding_another_producer_of_the_same_output_is_not_one():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()
    found = output_layers_by_output(bert, (torch.randint(0, 100, (2, 8)),))
    # the residual stream's earlier blocks feed the last one: only the last block's projection is its producer
    assert found == {"last_hidden_state": ["encoder.layer.1.output.dense"], "pooler_output": ["pooler.dense"]}


def test_magnitude_leaves_both_heads_dense_and_says_which_output_each_makes(cli, tmp_path):
    r = cli("export", "--model", f"{HELDOUT}:two_heads", "--prune", "magnitude:0.9", "--scope", "layer",
            "--form", "csr", "--no-measure", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "(classifier.weight): excluded: produces the output 'output_0'" in r.stdout
    assert "(regressor.weight): excluded: produces the output 'output_1'" in r.stdout
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["excluded_modules"] == ["classifier", "regressor"]
    assert not {"classifier.weight", "regressor.weight"} & set(manifest["pruned_parameters"])


def test_structured_pruning_keeps_every_output_width(tmp_path):
    result = export_artifact(spec("two_heads"), PruningPlan.parse("l1-structured:0.3"), "dense-shrunk", tmp_path / "a")
    m = result.manifest
    assert max(m.onnx_parity_max_abs_error.values()) < 1e-4
    # the backbone shrank; the heads lost input channels only
    assert m.shape_changes["backbone.3"][1] != m.shape_changes["backbone.3"][0]
    assert m.shape_changes["classifier"][1].endswith("-> 6, 1x1)")
    assert m.shape_changes["regressor"][1].endswith("-> 4, 1x1)")


def test_prelu_channels_go_with_their_convolution(tmp_path):
    result = export_artifact(spec("prelu_cnn"), PruningPlan.parse("l1-structured:0.3"), "dense-shrunk", tmp_path / "a")
    changes = result.manifest.shape_changes
    assert changes["features.2"][0] == "PReLU(weight=[32])" and changes["features.2"][1] != changes["features.2"][0]
    assert "features.8" not in changes  # the single shared slope stays as it is
    assert max(result.manifest.onnx_parity_max_abs_error.values()) < 1e-4
    assert max(result.manifest.form_parity_max_abs_error.values()) < 1e-5


def test_a_permute_before_a_flatten_keeps_the_producer_whole_and_says_why(cli, tmp_path):
    r = cli("export", "--model", f"{HELDOUT}:permute_flatten", "--prune", "l1-structured:0.3", "--form",
            "dense-shrunk", "--round-to", "1", "--no-measure", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert ("(conv2.weight): its channels cannot be removed: conv2 (feeds classifier through a permute and a "
            "flatten") in r.stdout
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["shape_changes"]) == {"conv1", "conv2"}  # conv1 lost channels, conv2 its inputs only
    assert manifest["shape_changes"]["conv2"][1] == "Conv2d(11 -> 16, 3x3)"


def test_espnet_subsampling_flatten_keeps_its_convolution_under_a_global_plan(tmp_path):
    result = export_artifact("espnet-st-small", PruningPlan.parse("l1-structured:0.5"), "dense-shrunk", tmp_path / "a")
    changes = result.manifest.shape_changes
    # its output channels feed a permute and a flatten: they stay (its inputs shrink with conv.0)
    assert changes["encoder.embed.conv.2"][1].endswith("-> 64, 3x3)")
    assert changes["encoder.embed.conv.0"][1] != changes["encoder.embed.conv.0"][0]


def test_lstm_flops_are_counted_by_formula():
    from deploykit.model.summary import flop_count

    model, inputs = built("lstm_encoder")
    counted = flop_count(model, inputs[:1] if False else (inputs[0][:1],))
    # 3 layers of 4 gates, hidden 128, input 40 then 128, 20 steps; the projection 128 -> 64
    per_step = (2 * 4 * 128 * (40 + 128) + 16 * 128) + 2 * (2 * 4 * 128 * (128 + 128) + 16 * 128)
    assert counted.by_module["lstm"] == 20 * per_step
    assert counted.total == 20 * per_step + 2 * 128 * 64
    assert counted.uncounted == ()


def test_attention_flops_are_counted_on_the_same_path_as_their_projections():
    from deploykit.model.summary import flop_count

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    # projections in 3 x 5 x 32 x 32 and out 5 x 32 x 32 multiply-adds, scores and mixing 2 x 5 x 5 x 32
    expected = 2 * (3 * 5 * 32 * 32 + 5 * 32 * 32 + 2 * 5 * 5 * 32)
    assert flop_count(Attend().eval(), (torch.randn(1, 5, 32),)).total == expected


def test_a_module_no_formula_counts_is_named():
    from deploykit.model.summary import flop_count

    class Opaque(torch.nn.Module):  # multiplies by its weight through an operator without a FLOP formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.cdist(x, self.weight)

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), Opaque())
    assert flop_count(net, (torch.randn(1, 8),)).uncounted == ("1",)


def test_an_unstructured_plan_with_dense_shrunk_warns_and_strict_refuses(cli, tmp_path):
    args = ("export", "--model", f"{HELDOUT}:two_heads", "--prune", "magnitude:0.5", "--form", "dense-shrunk",
            "--no-measure")
    r = cli(*args, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "warning: magnitude:0.5 with --form dense-shrunk removed nothing" in r.stdout + r.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert any("removed nothing" in w for w in manifest["warnings"])
    r = cli(*args, "--strict", "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and "removed nothing" in r.stderr and not (tmp_path / "b").exists()


def test_prune_output_that_changes_nothing_says_so(cli, tmp_path):
    r = cli("export", "--model", f"{HELDOUT}:two_heads", "--prune", "l1-structured:0.3", "--form", "dense-shrunk",
            "--prune-output", "--no-measure", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "--prune-output changed nothing: the output layers classifier, regressor kept every weight" in r.stdout


def test_a_recurrent_model_under_a_structured_plan_names_the_way_forward(cli, tmp_path):
    r = cli("export", "--model", f"{HELDOUT}:lstm_encoder", "--prune", "l1-structured:0.3", "--form", "dense-shrunk",
            "--no-measure", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and one_error_line(r.stderr)
    assert "lstm holds weights l1-structured does not prune" in r.stderr and "magnitude or random" in r.stderr


def test_a_scripted_module_exports_unpruned_and_refuses_pruning_in_one_line(cli, tmp_path):
    r = cli("export", "--model", f"{HELDOUT}:scripted", "--no-measure", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert max(manifest["onnx_parity_max_abs_error"].values()) < 1e-4
    r = cli("bench", str(tmp_path / "a"), "--trust-code", "--runtime", "torch", "--min-time", "0.01",
            "--timing-rounds", "1", "--no-store")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--model", f"{HELDOUT}:scripted", "--prune", "magnitude:0.5", "--no-measure",
            "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and one_error_line(r.stderr)
    assert "cannot prune a TorchScript module" in r.stderr and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    import sys

    sys.path.insert(0, str(HELDOUT.parent))
    try:
        import heldout
    finally:
        sys.path.remove(str(HELDOUT.parent))
    root = tmp_path_factory.mktemp("heldout-onnx")
    count = heldout.write_constant_weights_onnx(root / "constants.onnx")
    heldout.write_scalar_input_onnx(root / "scalar.onnx")
    return root, count


def folded(path, out):
    """The same model with every Constant node's value (the If's taken branch inlined) as an initializer."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant":
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        elif node.op_type == "If":
            taken = next(a.g for a in node.attribute if a.name == "then_branch").node[0]
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(taken.attribute[0].t), node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.remove(next(i for i in graph.initializer if i.name == "always"))
    onnx.save(proto, str(out))
    return sum(int(np.prod(i.dims)) for i in proto.graph.initializer)


def test_weights_in_constant_nodes_and_if_branches_are_counted_as_when_folded(onnx_files, tmp_path):
    from deploykit.results.audit import audit_onnx_file

    root, count = onnx_files
    assert folded(root / "constants.onnx", tmp_path / "folded.onnx") == count  # onnx's own count of the folded form
    as_written = audit_onnx_file(root / "constants.onnx")
    assert as_written.parameters == audit_onnx_file(tmp_path / "folded.onnx").parameters == count
    names = [row.parameter for row in as_written.rows]
    assert any(name.startswith("If_") and "/then_branch/" in name for name in names)


def test_a_size_gate_counts_constant_weights(onnx_files, cli, tmp_path):
    root, count = onnx_files
    budget = tmp_path / "budget.toml"
    budget.write_text('["constants.onnx"]\nmax_parameters = 1000\n')
    r = cli("audit", str(root / "constants.onnx"), "--budget", str(budget))
    assert r.returncode != 0 and f"{count:,}" in r.stdout + r.stderr


def test_a_scalar_input_takes_its_value(onnx_files, cli):
    root, _ = onnx_files
    r = cli("bench", str(root / "scalar.onnx"), "--no-store", "--min-time", "0.01", "--timing-rounds", "1")
    assert r.returncode == 2 and "--input-value sr=int:0:HIGH" in r.stderr and "a number" in r.stderr
    r = cli("bench", str(root / "scalar.onnx"), "--input-value", "sr=16000", "--no-store", "--min-time", "0.01",
            "--timing-rounds", "1", "--batch", "1,4", "--json", "-")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)["records"]
    assert [rec["input_values"] for rec in records] == [{"sr": "16000"}, {"sr": "16000"}]


@pytest.mark.parametrize("value, says", [
    ("sr=16000.5", "input 'sr' is int64; value '16000.5' is not an integer"),
    ("rate=16000", "--input-value names rate, not inputs of scalar.onnx (its inputs: audio, sr)"),
    ("sr=arange:3", "input 'sr' has 0 axes; 'arange:3' names axis 3"),
    ("audio=int:0:5", "input 'audio' is float32; int:LOW:HIGH is for integer inputs"),
    ("sr", "expected NAME=VALUE"),
])
def test_an_input_value_that_does_not_fit_is_one_line(onnx_files, cli, value, says):
    root, _ = onnx_files
    r = cli("bench", str(root / "scalar.onnx"), "--input-value", value, "--no-store")
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_input_values_fill_as_documented():
    from deploykit.model.spec import InputSpec, value_array

    rng = np.random.default_rng(0)
    mask = InputSpec("mask", ("batch", "seq"), "int64", values="ones")
    assert value_array(mask, (2, 3), rng).tolist() == [[1, 1, 1], [1, 1, 1]]
    positions = InputSpec("positions", ("batch", "seq"), "int64", values="arange")
    assert value_array(positions, (2, 3), rng).tolist() == [[0, 1, 2], [0, 1, 2]]
    ids = InputSpec("ids", ("batch", "seq"), "int64", values="int:5:7")
    assert set(np.unique(value_array(ids, (4, 50), rng))) == {5, 6}
    assert value_array(InputSpec("sr", (), "int64", values="16000"), (), rng) == 16000


def test_an_entry_points_scalar_example_is_recorded_as_its_value(tmp_path):
    (tmp_path / "rate.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.p = torch.nn.Linear(8, 4)\n"
        "    def forward(self, audio, sr):\n"
        "        return self.p(audio * (sr.float() / 16000.0))\n"
        "def build():\n"
        "    return M().eval(), (torch.randn(2, 8), torch.tensor(16000))\n")
    s = resolve_model(f"{tmp_path / 'rate.py'}:build")
    assert s.inputs[1].shape == () and s.inputs[1].values == "16000"
    assert int(s.example_inputs(3)[1]) == 16000
    m = export_artifact(s, PruningPlan(), "dense", tmp_path / "a").manifest
    assert m.inputs[1] == {"name": "sr", "shape": [], "dtype": "int64", "high": None, "values": "16000"}


def test_outputs_that_barely_depend_on_the_input_are_flagged():
    from deploykit.convert.onnx_export import trivial_outputs

    varying = np.random.default_rng(0).standard_normal((4, 3))
    flat = 3.7e-5 + 1e-7 * varying
    assert trivial_outputs([varying], ["y"], 1e-4) == []
    (said,) = trivial_outputs([flat], ["y"], 1e-4)
    assert said.startswith("output 'y' changes by at most") and "it barely depends on the input" in said


def test_audit_refuses_an_artifact_whose_manifest_lists_a_missing_parameter(cli, copy):
    directory = copy()
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["parameter_names"] = [*manifest["parameter_names"], "attn.in_proj_weight"]
    path.write_text(json.dumps(manifest))
    r = cli("audit", str(directory), "--no-verify")  # as an export that wrote it so would have recorded it
    assert r.returncode != 0
    assert "the manifest lists parameter 'attn.in_proj_weight', which weights.safetensors does not hold" in r.stderr


def test_an_input_value_a_pipeline_would_not_use_is_refused(cli, tmp_path):
    r = cli("export", "--model", "gpt2-tiny", "--input-value", "input_ids=ones", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and one_error_line(r.stderr) and not (tmp_path / "a").exists()
    assert "gpt2-tiny runs as text-generation, whose inputs the pipeline makes itself" in r.stderr
