import pytest
import torch
from torch import nn

from deploykit.core.errors import UnknownNameError, UsageError
from deploykit.core.sparsity import sparsity_table
from deploykit.prune.base import (
    PRUNERS,
    Outcome,
    PruningPlan,
    detect_output_layers,
    parse_prune_spec,
    prune_model,
    strip_masks,
)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_global_magnitude_round_reproduces_the_studys_table_layout(mlp, mlp_spec):
    plan = PruningPlan("magnitude", 0.33, exclude_output=False)
    result = prune_model(mlp, plan, mlp_spec.example_inputs(2))
    table = sparsity_table(mlp, result.pruned_parameters)
    rows = {r.name: r for r in table.rows}
    pruned_numel = sum(rows[f"mlp.{i}.weight"].numel for i in (0, 2, 4, 6))
    # "all pruned parameters" is exactly the requested fraction; biases stay dense
    assert table.pruned_overall == round(0.33 * pruned_numel) / pruned_numel
    assert all(rows[f"mlp.{i}.bias"].sparsity == 0 for i in (0, 2, 4, 6))
    assert table.overall == pytest.approx(table.pruned_overall * pruned_numel / 1_412_354)
    # global: layers are pruned unevenly, unlike per-layer scope
    assert len({round(rows[f"mlp.{i}.weight"].sparsity, 3) for i in (0, 2, 4, 6)}) > 1


def test_global_magnitude_keeps_the_largest_weights(mlp, mlp_spec):
    before = _weights(mlp)
    result = prune_model(mlp, PruningPlan("magnitude", 0.6), mlp_spec.example_inputs(2))
    strip_masks(mlp)
    after = mlp.state_dict()
    kept = torch.cat([before[n][after[n] != 0].abs() for n in result.pruned_parameters])
    dropped = torch.cat([before[n][after[n] == 0].abs() for n in result.pruned_parameters])
    assert kept.min() >= dropped.max()
    for name in result.pruned_parameters:  # survivors keep their values exactly
        survivors = after[name] != 0
        assert torch.equal(after[name][survivors], before[name][survivors])


def test_layer_scope_prunes_each_layer_by_the_fraction(mlp, mlp_spec):
    result = prune_model(mlp, PruningPlan("magnitude", 0.5, scope="layer"), mlp_spec.example_inputs(2))
    table = sparsity_table(mlp, result.pruned_parameters)
    pruned = [row for row in table.rows if row.pruned]
    assert {row.name for row in pruned} == set(result.pruned_parameters) and len(pruned) >= 2
    for row in pruned:
        assert row.zeros == round(0.5 * row.numel), row.name


def test_output_layer_is_detected_and_left_dense_by_default(mlp, mlp_spec):
    assert detect_output_layers(mlp, mlp_spec.example_inputs(1)) == ["mlp.6"]
    result = prune_model(mlp, PruningPlan("magnitude", 0.9), mlp_spec.example_inputs(2))
    assert result.excluded_modules == ("mlp.6",)
    assert "mlp.6.weight" not in result.pruned_parameters
    assert int((mlp.mlp[6].weight == 0).sum()) == 0


def test_output_layer_can_be_pruned_and_patterns_excluded(mlp, mlp_spec):
    plan = PruningPlan("magnitude", 0.5, scope="layer", exclude=("mlp.0",), exclude_output=False)
    result = prune_model(mlp, plan, mlp_spec.example_inputs(2))
    assert result.pruned_parameters == ("mlp.2.weight", "mlp.4.weight", "mlp.6.weight")
    assert int((mlp.mlp[0].weight == 0).sum()) == 0
    assert int((mlp.mlp[6].weight == 0).sum()) == 256


def test_random_pruning_is_seeded_and_differs_from_magnitude(mlp_spec):
    def mask(method, seed):
        model = mlp_spec.make()
        prune_model(model, PruningPlan(method, 0.5, seed=seed), mlp_spec.example_inputs(2))
        return model.mlp[2].weight_mask.clone()

    assert torch.equal(mask("random", 1), mask("random", 1))
    assert not torch.equal(mask("random", 1), mask("random", 2))
    assert not torch.equal(mask("random", 1), mask("magnitude", 1))


def test_strip_masks_leaves_no_trace_of_torch_prune(mlp, mlp_spec):
    keys = set(mlp.state_dict())
    prune_model(mlp, PruningPlan("magnitude", 0.7), mlp_spec.example_inputs(2))
    masked = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    assert any(name.endswith("weight_orig") for name in masked)
    zeros_before = sparsity_table(mlp).nonzero
    strip_masks(mlp)
    names = [n for n, _ in mlp.named_parameters()] + [n for n, _ in mlp.named_buffers()]
    assert not [n for n in names if n.endswith(("_orig", "_mask"))]
    assert all(not m._forward_pre_hooks for m in mlp.modules())
    assert set(mlp.state_dict()) == keys
    assert sparsity_table(mlp).nonzero == zeros_before
    assert all(isinstance(p, nn.Parameter) for p in mlp.parameters())


def test_zero_sparsity_prunes_nothing(mlp, mlp_spec):
    before = _weights(mlp)
    prune_model(mlp, PruningPlan("magnitude", 0.0), mlp_spec.example_inputs(2))
    assert all(torch.equal(before[n], p) for n, p in mlp.state_dict().items())


@pytest.mark.parametrize(
    "text, message",
    [
        ("magnitude:1.0", "sparsity 1 is outside [0, 1)"),
        ("magnitude:-0.1", "sparsity -0.1 is outside [0, 1)"),
        ("magnitude", "bad pruning spec 'magnitude'; expected METHOD:SPARSITY"),
        ("magnitude:abc", "bad sparsity 'abc'"),
    ],
)
def test_bad_prune_specs(text, message):
    with pytest.raises(UsageError) as info:
        parse_prune_spec(text)
    assert message in str(info.value)


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownNameError, match="known: act-structured, fpgm, grasp, imp, l1-structured, l2-structured, magnitude, random, random-structured, snip, sparsegpt, synflow, wanda$"):
        PruningPlan.parse("snap:0.5")


def test_plan_that_excludes_everything_is_an_error(mlp, mlp_spec):
    with pytest.raises(UsageError, match="nothing to prune"):
        prune_model(mlp, PruningPlan("magnitude", 0.5, exclude=("mlp.*",)), mlp_spec.example_inputs(2))


def test_a_pruner_that_prunes_nothing_is_caught(mlp, mlp_spec, monkeypatch):
    class DoesNothing:
        def apply(self, ctx):
            return Outcome("weights", requested=705_536, masked=705_536)  # claims success, masks nothing

    monkeypatch.setitem(PRUNERS._entries, "noop", DoesNothing())
    with pytest.raises(RuntimeError, match="masked 0 weights where 705536 were requested"):
        prune_model(mlp, PruningPlan("noop", 0.5), mlp_spec.example_inputs(2))


def test_weights_the_plan_leaves_dense_are_listed_with_why():
    from deploykit.prune.base import unpruned_weights

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.proj(self.embed(ids))
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

    inputs = (torch.randint(0, 10, (2, 4)),)
    net = Net().eval()
    result = prune_model(net, PruningPlan("magnitude", 0.5, layer_types=("linear",)), inputs)
    found = unpruned_weights(net, result)
    # the packed projection MultiheadAttention reads itself is a linear weight too
    assert set(result.pruned_parameters) == {"proj.weight", "attn.out_proj.weight", "attn.in_proj_weight"}
    assert set(found) == {"embed.weight", "head.weight"}  # biases are not weights
    assert "the plan prunes linear layers" in found["embed.weight"]
    assert found["head.weight"].startswith("excluded")
    assert unpruned_weights(net, prune_model(Net().eval(), PruningPlan(), inputs)) == {}  # nothing asked
    from deploykit.prune.base import PruneResult

    structured = PruneResult(PruningPlan("l1-structured", 0.5), ("proj.weight",), ("head",))  # as a channel pruner ends
    found = unpruned_weights(Net().eval(), structured)
    assert found["attn.in_proj_weight"] == ("a weight MultiheadAttention reads itself: l1-structured prunes layers' "
                                            "weights; magnitude and random prune it entry by entry")


class _Reads(nn.Module):
    """A custom layer that reads its own weight, beside a positional table that is not a weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.positions = nn.Parameter(torch.randn(1, 4, 8))

    def forward(self, x):
        return torch.nn.functional.linear(x + self.positions, self.weight)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_pruning_reaches_weights_outside_linear_and_conv_modules(scope):
    from deploykit.prune.base import strip_masks, unpruned_weights

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.custom = _Reads()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.custom(x)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.lstm(h)[0][:, -1])

    torch.manual_seed(0)
    net, inputs = Net().eval(), (torch.randn(2, 4, 8),)
    result = prune_model(net, PruningPlan("magnitude", 0.75, scope=scope), inputs)
    reached = {"custom.weight", "attn.in_proj_weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"}
    assert reached <= set(result.pruned_parameters)
    assert set(unpruned_weights(net, result)) == {"custom.positions", "head.weight"}
    masked = net(*inputs)
    strip_masks(net)
    torch.testing.assert_close(net(*inputs), masked)  # the zeros are in the weights the layers read
    params = dict(net.named_parameters())
    zeros = sum(int((params[name] == 0).sum()) for name in result.pruned_parameters)
    total = sum(params[name].numel() for name in result.pruned_parameters)
    if scope == "layer":
        assert all(int((params[n] == 0).sum()) == round(0.75 * params[n].numel()) for n in reached)
    assert zeros == round(0.75 * total) if scope == "global" else zeros >= 0.75 * total - len(result.pruned_parameters)
