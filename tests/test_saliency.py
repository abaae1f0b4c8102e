"""SNIP, GraSP and SynFlow: exact densities, determinism, and scores that match what they claim to measure."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deploykit.core.errors import UsageError
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.model.spec import InputSpec, ModelSpec
from deploykit.prune.base import PRUNERS, PruneContext, PruningPlan, parse_prune_spec, prune_model, strip_masks

SALIENCY = ["snip", "grasp", "synflow"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(count):
    g = torch.Generator().manual_seed(3)
    return [((torch.randn(8, 20, generator=g),), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


SPEC = ModelSpec(name="mlp", build=MLP, inputs=(InputSpec("x", ("batch", 20)),), outputs=("y",), data=_batches)


def _masks(spec, plan):
    model = spec.make()
    prune_model(model, plan, spec.example_inputs(2), spec=spec)
    return {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("weight_mask")}


@pytest.mark.parametrize("method", SALIENCY + ["magnitude", "random"])
@pytest.mark.parametrize("amount", [0.3, 0.77, 0.99])
def test_global_density_is_exact(method, amount):
    # at 0.99 a global ranking empties fc1 (allowed here: the property is the count, not the model)
    masks = _masks(SPEC, PruningPlan(method, amount, allow_layer_collapse=True))
    total = sum(m.numel() for m in masks.values())
    assert set(masks) == {"fc1.weight_mask", "fc2.weight_mask"}  # the output layer stays dense
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(amount * total)


@pytest.mark.parametrize("method", SALIENCY)
def test_layer_scope_density_is_exact_per_layer(method):
    masks = _masks(SPEC, PruningPlan(method, 0.61, scope="layer", rules=(("fc2", 0.25),)))
    assert int((masks["fc1.weight_mask"] == 0).sum()) == round(0.61 * 320)
    assert int((masks["fc2.weight_mask"] == 0).sum()) == round(0.25 * 192)


@pytest.mark.parametrize("method", SALIENCY)
def test_deterministic_and_not_random(method):
    first = _masks(SPEC, PruningPlan(method, 0.8))
    again = _masks(SPEC, PruningPlan(method, 0.8))
    assert all(torch.equal(first[k], again[k]) for k in first)
    randomly = _masks(SPEC, PruningPlan("random", 0.8))
    assert any(not torch.equal(first[k], randomly[k]) for k in first)


def test_snip_prunes_connections_no_data_reaches():
    def dead_half(count):  # features 10..19 are always zero: weights reading them cannot change the loss
        return [((torch.cat([x[:, :10], torch.zeros(8, 10)], dim=1),), y) for (x,), y in _batches(count)]

    spec = ModelSpec(name="mlp", build=MLP, inputs=SPEC.inputs, outputs=("y",), data=dead_half)
    masks = _masks(spec, PruningPlan("snip", 0.5, scope="layer", exclude=("fc2",)))
    fc1 = masks["fc1.weight_mask"]
    assert torch.equal(fc1[:, 10:], torch.zeros(16, 10)) and torch.equal(fc1[:, :10], torch.ones(16, 10))


def test_synflow_prunes_the_inputs_of_a_unit_with_no_way_out():
    def build():
        model = MLP()
        with torch.no_grad():
            model.fc2.weight[:, :4] = 0  # hidden units 0..3 of fc1 reach nothing: no synaptic flow
        return model

    spec = ModelSpec(name="mlp", build=build, inputs=SPEC.inputs, outputs=("y",))  # data-free: no data hook
    masks = _masks(spec, PruningPlan("synflow", 0.25, scope="layer", exclude=("fc2",)))
    fc1 = masks["fc1.weight_mask"]
    assert int((fc1 == 0).sum()) == 80 and torch.equal(fc1[:4], torch.zeros(4, 20))


def test_grasp_scores_are_weight_times_hessian_gradient_product():
    spec = SPEC
    model = spec.make()
    weights = [model.fc1.weight, model.fc2.weight]
    batches = _batches(4)

    def loss_of(flat):  # the tempered loss summed over the batches, as a function of the two weights
        w1, w2 = flat[:320].view(16, 20), flat[320:].view(12, 16)
        total = 0
        for (x,), y in batches:
            h = torch.relu(F.linear(torch.relu(F.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias))
            total = total + F.cross_entropy(model.out(h) / 200.0, y)
        return total

    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    g = torch.autograd.functional.jacobian(loss_of, flat)
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    expected = flat * (hessian @ g)
    ctx = PruneContext(model, PruningPlan("grasp", 0.5), {"fc1": 0.5, "fc2": 0.5}, ("out",), spec.example_inputs(2), spec)
    scores = PRUNERS.get("grasp").scores(ctx)
    got = torch.cat([scores["fc1"].reshape(-1), scores["fc2"].reshape(-1)])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-12)


def test_compression_convention():
    assert parse_prune_spec("grasp:c2") == {"method": "grasp", "compression": 2.0}
    assert parse_prune_spec("snip:c=0.5") == {"method": "snip", "compression": 0.5}
    plan = PruningPlan.parse("synflow:c1")
    assert plan.amount == pytest.approx(0.9) and plan.label() == "synflow:c1"
    for text, message in (("grasp:cx", "bad compression 'x'"), ("grasp:c9", r"compression 9 is outside \(0, 6\]")):
        with pytest.raises(UsageError, match=message):
            PruningPlan.parse(text)


def test_manifest_records_compression_sparsity_and_remaining_flops(tmp_path):
    result = export_artifact(SPEC, PruningPlan.parse("snip:c1"), "csr", tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["plan"]["compression"] == 1.0 and manifest["plan"]["amount"] == pytest.approx(0.9)
    dense = manifest["flops_before_conversion"]
    # fc1 and fc2 keep 10% of their multiply-adds; the output layer and the adds of biases all stay
    assert manifest["sparse_flops"] < 0.25 * dense and manifest["sparse_flops"] > 0.1 * dense
    assert manifest["remaining_flops_fraction"] == pytest.approx(manifest["sparse_flops"] / dense)
    assert result.prune_result.outcome.masked == round(0.9 * 512)


def test_data_aware_pruners_need_a_data_hook():
    spec = ModelSpec(name="nodata", build=MLP, inputs=SPEC.inputs, outputs=("y",))
    for method in ("snip", "grasp"):
        with pytest.raises(UsageError, match=f"{method} scores weights on data, and nodata has no data hook.*synflow"):
            _masks(spec, PruningPlan(method, 0.5))


def test_saliency_methods_prune_linear_and_conv_by_default():
    spec = ModelSpec(name="emb", build=lambda: nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(32, 16),
                                                              nn.ReLU(), nn.Linear(16, 2)),
                     inputs=(InputSpec("ids", ("batch", 4), "int64", 30),), outputs=("y",))
    assert set(_masks(spec, PruningPlan("synflow", 0.5))) == {"2.weight_mask"}
    assert set(_masks(spec, PruningPlan("magnitude", 0.5))) == {"0.weight_mask", "2.weight_mask"}
    both = _masks(spec, PruningPlan("synflow", 0.5, layer_types=("linear", "embedding")))
    assert set(both) == {"0.weight_mask", "2.weight_mask"}
    with pytest.raises(UsageError, match="unknown layer type 'lstm'"):
        PruningPlan("synflow", 0.5, layer_types=("lstm",))


def test_at_init_prunes_initial_weights_then_trains(tmp_path):
    trained = []

    def train(model):
        with torch.no_grad():
            trained.append(float(model.fc1.weight.abs().sum()))  # sees the pruned initial weights
            for p in model.parameters():  # "training" moves every weight (weight_orig under a mask), as an
                p.add_(1.0)               # optimizer step does; the masks must keep pruned ones at 0

    spec = ModelSpec(name="mlp", build=MLP, inputs=SPEC.inputs, outputs=("y",), data=_batches, train=train)
    result = export_artifact(spec, PruningPlan("snip", 0.5, at_init=True), "dense", tmp_path / "a")
    fresh = spec.make(trained=False)
    pruned = _masks(ModelSpec(name="mlp", build=MLP, inputs=SPEC.inputs, outputs=("y",), data=_batches),
                    PruningPlan("snip", 0.5))
    assert trained == [float((fresh.fc1.weight * pruned["fc1.weight_mask"]).abs().sum())]
    assert result.table.pruned_overall == pytest.approx(0.5, abs=1e-3)  # still half zero after training
    with pytest.raises(UsageError, match="--at-init trains the pruned model, and mlp has no training hook"):
        export_artifact(SPEC, PruningPlan("snip", 0.5, at_init=True), "dense", tmp_path / "b")
    with pytest.raises(UsageError, match="imp retrains between its rounds itself"):
        PruningPlan("imp", 0.5, at_init=True)


def test_cli_sweeps_compressions(cli, tmp_path):
    r = cli("bench", "--model", "lenet-300-100", "--prune", "synflow:c0.5,c1", "--form", "csr", "--runtime",
            "onnxruntime", "--min-iters", "5", "--min-time", "0", "--warmup", "0", "--no-store", "--json")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)["records"]
    assert [rec["prune"] for rec in records] == ["none", "synflow:c0.5", "synflow:c1"]  # the unpruned model first
    assert records[2]["sparsity"] == pytest.approx(0.9)


def test_stripped_saliency_masks_are_plain_zeros():
    model = SPEC.make()
    prune_model(model, PruningPlan("grasp", 0.7), SPEC.example_inputs(2), spec=SPEC)
    strip_masks(model)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in [*model.named_parameters(), *model.named_buffers()])
    zeros = int((model.fc1.weight == 0).sum() + (model.fc2.weight == 0).sum())
    assert zeros == round(0.7 * 512)


def test_plan_file_takes_compression_layer_types_and_at_init(tmp_path):
    from deploykit.prune.base import load_plan_file

    path = tmp_path / "plan.toml"
    path.write_text('method = "grasp"\ncompression = 2\nlayer_types = ["linear", "embedding"]\nat_init = true\n')
    plan = PruningPlan(**load_plan_file(path))
    assert (plan.method, plan.compression, plan.layer_types, plan.at_init) == ("grasp", 2, ("linear", "embedding"), True)
    assert plan.amount == pytest.approx(0.99)


def test_grasp_finite_difference_product_matches_double_backprop():
    from deploykit.prune.saliency import GraSP, _summed_grads

    model = SPEC.make()
    names = ["fc1", "fc2"]
    batches = _batches(2)

    def loss_of(m, inputs, targets):
        return F.cross_entropy(m(*inputs) / 200.0, targets)

    g = [part.detach() for part in _summed_grads(model, names, loss_of, batches)]
    exact = GraSP._hessian_product(model, names, loss_of, batches, g)
    approx = GraSP._hessian_product_by_differences(model, names, loss_of, batches, g)
    for e, a in zip(exact, approx):
        assert torch.allclose(a, e, rtol=1e-3, atol=1e-9 * float(e.abs().max()))


def test_grasp_runs_on_an_embedding_bag_model():
    # EmbeddingBag has no double backward: GraSP takes the finite-difference product there
    masks = _masks(get_model("textclf-agnews"), PruningPlan("grasp", 0.99, exclude_output=False,
                                                            layer_types=("linear", "embedding")))
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.99 * total)
