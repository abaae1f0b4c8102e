"""Calibration-aware pruning: calibration data, wanda and sparsegpt (unstructured and N:M), act-structured
with least-squares reconstruction, recovery by distillation, and what export says of them."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from deploykit.core.errors import UsageError
from deploykit.model.calibration import HELD_OUT_ITEMS, calibration_data
from deploykit.model.spec import InputSpec, ModelSpec
from deploykit.prune.base import PruningPlan, prune_model, strip_masks
from deploykit.prune.oneshot import lowest_per_row, sparsegpt
from deploykit.prune.patterns import parse_pattern

FAST = ["--warmup", "0.01", "--min-time", "0.05", "--min-iters", "20", "--threads", "1"]


class Mixed(nn.Module):
    """A conv (3 -> 8), a depthwise conv, a self-attention (nn.MultiheadAttention), an MLP, a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.depthwise(torch.relu(self.conv(x)))).flatten(2).transpose(1, 2)
        h, _ = self.attn(h, h, h)
        return self.head(torch.relu(self.fc(h))).mean(1)


def _spec(calibration=None, build=Mixed, inputs=(InputSpec("x", ("batch", 4, 6, 6)),)):
    return ModelSpec(name="mixed", build=build, inputs=list(inputs), outputs=["y"], calibration=calibration)


def _hook(count):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, 6, 6, generator=g),) for _ in range(count)]


# -- plans ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"method": "wanda", "amount": 0.5, "pattern": "2-4"}, "bad pattern '2-4'"),
    ({"method": "wanda", "amount": 0.5, "pattern": "4:4"}, "N must be below M"),
    ({"method": "wanda", "amount": 0.7, "pattern": "2:4"}, "a sparsity of 0.5; the plan asks 0.7"),
    ({"method": "l1-structured", "amount": 0.5, "pattern": "2:4"},
     "applies to magnitude, random, wanda, sparsegpt, not l1-structured"),
    ({"method": "magnitude", "amount": 0.5, "reconstruct": True}, "--reconstruct applies to act-structured"),
    ({"method": "magnitude", "amount": 0.5, "calibration": "c.npz"}, "magnitude prunes without data"),
    ({"method": "wanda", "amount": 0.5, "calibration_samples": 0}, "calibration samples must be an integer"),
    ({"method": "sparsegpt", "amount": 0.5, "calibration_samples": 4}, "sparsegpt needs at least 8 calibration items"),
    ({"method": "magnitude", "amount": 0.5, "recover_steps": 10, "at_init": True}, "--recover distils"),
])
def test_plan_options_are_refused_where_they_do_not_apply(fields, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        PruningPlan(**fields)


def test_plan_labels_say_pattern_reconstruction_and_recovery():
    assert PruningPlan(method="wanda", amount=0.5, pattern="2:4").label() == "wanda:0.5,2:4"
    assert PruningPlan(method="act-structured", amount=0.3, reconstruct=False).label() == "act-structured:0.3,no reconstruct"
    assert PruningPlan(method="sparsegpt", amount=0.5, recover_steps=200).label() == "sparsegpt:0.5,recover 200"
    assert PruningPlan(method="wanda", amount=0.5).described() == "wanda:0.5"  # per layer: no "(global)"
    assert PruningPlan(method="magnitude", amount=0.5, recover_steps=5).uses_calibration


# -- calibration data ------------------------------------------------------------------------------------

def test_a_model_without_calibration_data_is_refused_naming_both_ways():
    with pytest.raises(UsageError) as caught:
        calibration_data(_spec(), None, 16, "wanda")
    assert "--calibration FILE" in str(caught.value) and "ModelSpec.calibration" in str(caught.value)
    assert "tensors named x" in str(caught.value)


def test_random_calibration_is_allowed_with_a_warning():
    data = calibration_data(_spec(), "random", 20, "wanda")
    assert data.items == 20 and sum(len(b[0]) for b in data.batches) == 20
    assert sum(len(b[0]) for b in data.held_out) == HELD_OUT_ITEMS
    assert "random" in data.warning


def test_the_spec_hook_gives_calibration_and_held_out_items():
    data = calibration_data(_spec(_hook), None, 20, "wanda")
    assert sum(len(b[0]) for b in data.batches) == 20 and data.held_out
    assert "calibration hook" in data.source


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((20, 4, 6, 6), np.float32)}, "holds y; the model's inputs are x (x missing; y unknown)"),
    ({"x": np.zeros((20, 4, 6), np.float32)}, "has 3 axes"),
    ({"x": np.zeros((20, 3, 6, 6), np.float32)}, "size 3 on axis 1; the input's is 4"),
    ({"x": np.zeros((20, 4, 6, 6), np.int64)}, "is int64; the input takes float32"),
    ({"x": np.full((20, 4, 6, 6), np.nan, np.float32)}, "NaN"),
    ({"x": np.zeros((10, 4, 6, 6), np.float32)}, "holds 10 items; wanda is asked to calibrate on 16"),
])
def test_calibration_files_are_checked_against_the_inputs(tmp_path, arrays, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calibration_data(_spec(), _npz(tmp_path / "c.npz", **arrays), 16, "wanda")


def test_integer_inputs_take_integers_within_their_range(tmp_path):
    spec = _spec(inputs=(InputSpec("ids", ("batch", "seq"), "int64", high=10),))
    with pytest.raises(UsageError, match=r"holds values in \[0, 12\]; the input takes \[0, 10\)"):
        calibration_data(spec, _npz(tmp_path / "c.npz", ids=np.arange(13 * 4).reshape(4, 13) % 13), 4, "wanda")
    with pytest.raises(UsageError, match="is float32; the input takes int64"):
        calibration_data(spec, _npz(tmp_path / "d.npz", ids=np.zeros((4, 3), np.float32)), 4, "wanda")


def test_a_safetensors_file_and_an_npz_file_give_the_same_items(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 4, 6, 6)).astype(np.float32)
    save_file({"x": x}, str(tmp_path / "c.safetensors"))
    a = calibration_data(_spec(), str(tmp_path / "c.safetensors"), 24, "wanda")
    b = calibration_data(_spec(), _npz(tmp_path / "c.npz", x=x), 24, "wanda")
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a.batches, b.batches))
    assert sum(len(h[0]) for h in a.held_out) == 16  # the 16 items beyond the 24
    assert "sha256" in a.source


def test_damaged_calibration_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    for name in ("bad.npz", "bad.safetensors"):
        with pytest.raises(UsageError, match="is not a readable"):
            calibration_data(_spec(), str(tmp_path / name), 4, "wanda")
    with pytest.raises(UsageError, match="expected .npz or .safetensors"):
        calibration_data(_spec(), str(tmp_path / "c.pt"), 4, "wanda")


# -- wanda and sparsegpt ---------------------------------------------------------------------------------

def _pruned(method, **fields):
    torch.manual_seed(0)
    spec = _spec(_hook)
    model = spec.make()
    result = prune_model(model, PruningPlan(method=method, amount=0.5, calibration_samples=16, **fields),
                         spec.example_inputs(2), spec=spec)
    return model, result


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_every_layer_kind_is_pruned_exactly_per_row(method):
    model, result = _pruned(method)
    assert set(result.pruned_parameters) == {"conv.weight", "depthwise.weight", "attn.in_proj_weight",
                                             "attn.out_proj.weight", "fc.weight"}
    strip_masks(model)
    for name in ("fc.weight", "attn.in_proj_weight", "attn.out_proj.weight"):
        zeros = (getattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) == 0).sum(dim=1)
        if method == "wanda":  # the paper's per-output comparison group: each row loses half its inputs
            assert zeros.tolist() == [4] * len(zeros), name
    assert (model.depthwise.weight.reshape(8, -1) == 0).sum().item() == result.outcome.details["layers"][
        "depthwise.weight"]["rows"] * 0 + 8 * round(0.5 * 9)
    assert result.outcome.masked == result.outcome.requested
    details = result.outcome.details
    assert details["calibration"]["items"] == 16 and 0 <= details["agreement"]["agreement_cosine"] <= 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_n_m_patterns_keep_n_of_every_m_along_the_input(method):
    model, _ = _pruned(method, pattern="2:4", exclude=("conv", "depthwise"))
    strip_masks(model)
    groups = (model.fc.weight != 0).reshape(16, 2, 4).sum(dim=2)
    assert groups.max().item() <= 2 and (model.fc.weight == 0).sum().item() == 16 * 4


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_patterns_remove_whole_blocks_of_calibrated_scores(method):
    model, result = _pruned(method, pattern="4x4", exclude=("conv", "depthwise", "attn"))
    strip_masks(model)
    blocks = (model.fc.weight != 0).reshape(4, 4, 2, 4)
    assert torch.equal(blocks.any(3).any(1), blocks.all(3).all(1))  # each 4x4 block all kept or all gone
    assert (model.fc.weight == 0).sum().item() == 64 and result.outcome.masked == result.outcome.requested == 64


def test_conv_n_m_groups_run_along_input_channels():
    torch.manual_seed(0)
    spec = _spec(_hook)
    model = spec.make()
    prune_model(model, PruningPlan(method="wanda", amount=0.5, pattern="2:4", calibration_samples=8,
                                   exclude=("depthwise", "attn", "fc")), spec.example_inputs(2), spec=spec)
    strip_masks(model)
    nonzero = (model.conv.weight != 0)  # (8 out, 4 in, 3, 3): at each kernel position, 2 of the 4 channels
    assert nonzero.sum(dim=1).eq(2).all()


def test_a_pattern_that_does_not_divide_a_layer_names_it():
    with pytest.raises(UsageError, match="conv.weight has 4 input channels per group, not a multiple of 8"):
        _pruned("wanda", pattern="4:8")


def test_later_layers_are_pruned_on_what_the_pruned_earlier_layers_give():
    """Wanda on two Linear layers: the second's mask is the one its inputs from the *pruned* first give."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 2)

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    def hook(count):
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(8, 6, generator=g),) for _ in range(count)]

    torch.manual_seed(0)
    spec = ModelSpec(name="two", build=Two, inputs=[InputSpec("x", ("batch", 6))], outputs=["y"], calibration=hook)
    model = spec.make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, PruningPlan(method="wanda", amount=0.5, calibration_samples=16), spec.example_inputs(2),
                spec=spec)
    x = torch.cat([b[0] for b in hook(2)])
    a_pruned = model.a.weight.detach()
    h = torch.relu(x @ a_pruned.t() + original["a.bias"])
    expected, _ = lowest_per_row(original["b.weight"].abs() * h.norm(dim=0)[None, :], 0.5)
    assert torch.equal(model.b.weight_mask.bool(), expected)
    h_unpruned = torch.relu(x @ original["a.weight"].t() + original["a.bias"])
    unexpected, _ = lowest_per_row(original["b.weight"].abs() * h_unpruned.norm(dim=0)[None, :], 0.5)
    assert not torch.equal(expected, unexpected)  # the test can tell the two orders apart


def test_sparsegpts_update_lowers_the_layer_error_below_its_mask_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    for pattern in (None, parse_pattern("2:4"), parse_pattern("4x4")):
        updated, keep, count = sparsegpt(w, x.t() @ x / len(x), 0.5, pattern)
        assert count == 256 and int((~keep).sum()) == 256 and not updated[~keep].any()

        def error(v):
            return float(((x @ (w - v).t()) ** 2).sum())
        assert error(updated) < 0.9 * error(w * keep)


def test_a_layer_the_calibration_pass_never_runs_is_named():
    class Unused(Mixed):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(8, 8)

    torch.manual_seed(0)
    spec = _spec(_hook, build=Unused)
    with pytest.raises(UsageError, match="spare.weight never ran on the calibration inputs"):
        prune_model(spec.make(), PruningPlan(method="wanda", amount=0.5, calibration_samples=8),
                    spec.example_inputs(2), spec=spec)


# -- act-structured and recovery --------------------------------------------------------------------------

def test_act_structured_reconstruction_restores_what_l1_structured_loses():
    from deploykit.model.catalog import get_model

    spec = get_model("lenet-300-100")
    accuracy = {}
    for method, fields in (("l1-structured", {}), ("act-structured", {})):
        model = spec.make()
        result = prune_model(model, PruningPlan(method=method, amount=0.8, **fields), spec.example_inputs(2),
                             spec.output_layers, spec=spec)
        strip_masks(model)
        accuracy[method] = spec.evaluate(model)["accuracy"]
    refits = result.outcome.details["reconstruction"]
    assert set(refits) == {"fc2", "fc3"}
    assert all(r["reconstructed"] and r["error_after"] < r["error_before"] for r in refits.values())
    trained = spec.training_record(None)["result"]["accuracy"]
    assert accuracy["act-structured"] > trained - 0.05 > accuracy["l1-structured"]


def test_recovery_lowers_the_distillation_loss_and_keeps_the_masks():
    model, result = _pruned("wanda", recover_steps=30)
    recovery = result.outcome.details["recovery"]
    assert recovery["steps"] == 30 and recovery["loss_after"] < recovery["loss_before"]
    strip_masks(model)
    assert (model.fc.weight == 0).sum().item() == 16 * 4  # what was pruned stays pruned


# -- the command line ------------------------------------------------------------------------------------

def test_export_with_act_structured_says_quality_reconstruction_and_speed(cli, tmp_path):
    out = tmp_path / "a"
    result = cli("export", "--model", "lenet-300-100", "--prune", "act-structured:0.5", "--form", "dense-shrunk",
                 "--round-to", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "accuracy of the pruned model" in result.stdout
    assert "on 128 calibration items from lenet-300-100's calibration hook" in result.stdout
    assert "outputs against the unpruned model on 32 held-out calibration items: cosine" in result.stdout
    assert "reconstruction: 2 of 2 layers reading removed channels re-fitted" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["method"] == "act-structured" and manifest["pruning"]["seconds"] > 0
    assert set(manifest["pruning"]["reconstruction"]) == {"fc2", "fc3"}
    assert "agreement_cosine" in manifest["metrics"]


def test_bad_calibration_input_stops_before_anything_is_written(cli, tmp_path):
    np.savez(tmp_path / "c.npz", pixels=np.zeros((200, 784), np.float32))
    out = tmp_path / "a"
    result = cli("export", "--model", "lenet-300-100", "--prune", "wanda:0.5", "--calibration", str(tmp_path / "c.npz"),
                 "--out", str(out))
    assert result.returncode == 2 and not out.exists()
    assert [line for line in result.stderr.splitlines() if "error" in line] == [result.stderr.splitlines()[-1]]
    assert "holds pixels; the model's inputs are image" in result.stderr
    result = cli("export", "--model", "lenet-300-100", "--prune", "wanda:0.5", "--pattern", "4:8", "--out", str(out))
    assert result.returncode == 2 and "fc2.weight has 300 inputs, not a multiple of 8" in result.stderr and not out.exists()


def test_an_own_model_without_calibration_is_refused(cli, tmp_path):
    (tmp_path / "net.py").write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 8), "
                                     "torch.nn.ReLU(), torch.nn.Linear(8, 2))\n")
    out = tmp_path / "a"
    result = cli("export", "--model", f"{tmp_path / 'net.py'}:build", "--input-shape", "batch,8", "--prune",
                 "sparsegpt:0.5", "--out", str(out))
    assert result.returncode == 2 and not out.exists(), result.stderr
    assert "--calibration FILE" in result.stderr and "ModelSpec.calibration" in result.stderr
    result = cli("export", "--model", f"{tmp_path / 'net.py'}:build", "--input-shape", "batch,8", "--prune",
                 "sparsegpt:0.5", "--calibration", "random", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "warning: calibrated on random inputs" in result.stdout + result.stderr


def test_bench_shows_the_agreement_beside_the_speed(cli, tmp_path):
    result = cli("bench", "--model", "lenet-300-100", "--prune", "wanda:0.5", "--form", "dense", "--runtime",
                 "onnxruntime", *FAST, "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["records"]
    pruned = [r for r in rows if r["prune"].startswith("wanda")]
    assert pruned and all("agreement_cosine" in r["metrics"] and "accuracy" in r["metrics"] for r in pruned)
    assert "agreement_cosine" in result.stdout


def test_an_entry_point_can_give_the_calibration_batches(tmp_path):
    (tmp_path / "data.py").write_text("import torch\n\ndef batches(count):\n"
                                      "    return [(torch.randn(8, 4, 6, 6),) for _ in range(count)]\n\n"
                                      "def wrong(count):\n    return [(torch.zeros(8, 4, 6, 6, dtype=torch.int64),)]\n")
    data = calibration_data(_spec(), f"{tmp_path / 'data.py'}:batches", 24, "wanda")
    assert sum(len(b[0]) for b in data.batches) == 24 and "entry point" in data.source
    with pytest.raises(UsageError, match="is int64; the input takes float32"):
        calibration_data(_spec(), f"{tmp_path / 'data.py'}:wrong", 4, "wanda")


def test_act_structured_refits_gpt2s_projections_after_its_mlp_channels():
    """GPT-2's MLP channels and heads are units torch-pruning does not see: their readers (c_proj) come
    from the block handlers, so they are scored by activation and re-fitted too."""
    pytest.importorskip("transformers")
    from deploykit.model.catalog import get_model

    spec = get_model("gpt2-tiny")
    model = spec.make()
    result = prune_model(model, PruningPlan(method="act-structured", amount=0.3, scope="layer", calibration="random",
                                            calibration_samples=16), spec.example_inputs(2), spec.output_layers,
                         spec=spec)
    refits = result.outcome.details["reconstruction"]
    assert {"model.transformer.h.0.mlp.c_proj", "model.transformer.h.1.mlp.c_proj"} <= set(refits)
    assert all(r["error_after"] <= r["error_before"] for r in refits.values())
    assert not result.outcome.details["weight_scored_groups"]


def test_sparsegpt_prunes_inputs_calibration_never_excited_first_and_counts_them():
    """The reference implementation zeroes their weights beyond the mask; here they go first, within it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    x[:, 3] = 0
    w = torch.randn(8, 16, generator=g)
    updated, keep, count = sparsegpt(w, x.t() @ x / len(x), 0.5, None)
    assert not keep[:, 3].any() and count == 64 and int((updated == 0).sum()) == 64


def test_thin_statistics_are_said():
    from deploykit.prune.oneshot import calibration_warnings

    said = calibration_warnings("sparsegpt", {"fc": {"rows": 128, "inputs": 5000, "unseen_inputs": 4000}})
    assert "4,000 of 5,000" in said[0] and "128 rows for 5,000 inputs" in said[1]


def test_a_hook_that_fails_or_gives_the_wrong_tensors_is_one_line():
    def failing(count):
        raise ValueError("no data here")

    with pytest.raises(UsageError, match="the calibration hook of mixed failed: ValueError: no data here"):
        calibration_data(_spec(failing), None, 8, "wanda")
    with pytest.raises(UsageError, match=r"each batch must be a tuple of 1 tensor \(x\)"):
        calibration_data(_spec(lambda count: [("not a tensor",)]), None, 8, "wanda")
