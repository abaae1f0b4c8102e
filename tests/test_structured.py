import warnings

import pytest
import torch
from torch import nn

from deploykit.convert.onnx_export import torch_outputs
from deploykit.convert.shrink import replay, shrink
from deploykit.core.errors import UsageError
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.model.spec import TRACE_BATCH
from deploykit.model.summary import count_parameters
from deploykit.prune.base import PruningPlan, load_plan_file, parse_rule, prune_model, strip_masks
from deploykit.prune.channels import UnsupportedLayerError
from deploykit.runtime.loading import load_torch_model


def _pruned(name, plan):
    spec = get_model(name)
    model = spec.make()
    result = prune_model(model, plan, spec.example_inputs(TRACE_BATCH), spec.output_layers, spec=spec)
    strip_masks(model)
    return spec, model, result


@pytest.mark.parametrize("method", ["l1-structured", "l2-structured", "fpgm", "random-structured"])
def test_structured_pruners_zero_whole_rows_with_their_bias(method):
    _, model, result = _pruned("lenet-300-100", PruningPlan(method, 0.5, scope="layer"))
    for layer, rows in (("fc1", 300), ("fc2", 100)):
        module = getattr(model, layer)
        dead = (module.weight == 0).all(dim=1) & (module.bias == 0)
        assert int(dead.sum()) == rows // 2, layer
        assert int((module.weight != 0).all(dim=1).sum()) == rows - rows // 2  # the rest untouched
    assert int((model.fc3.weight == 0).all(dim=1).sum()) == 0  # output layer rows never pruned
    assert result.outcome.unit == "channels" and result.outcome.requested == result.outcome.masked == 200


def test_importance_criteria_pick_different_channels():
    def dead_rows(method, seed=0):
        _, model, _ = _pruned("lenet-300-100", PruningPlan(method, 0.5, scope="layer", seed=seed))
        return (model.fc1.weight == 0).all(dim=1)

    assert not torch.equal(dead_rows("l1-structured"), dead_rows("fpgm"))
    assert torch.equal(dead_rows("random-structured", 1), dead_rows("random-structured", 1))
    assert not torch.equal(dead_rows("random-structured", 1), dead_rows("random-structured", 2))


def test_l1_structured_removes_the_rows_of_smallest_norm():
    spec = get_model("lenet-300-100")
    norms = spec.make().fc2.weight.detach().abs().sum(dim=1)
    _, model, _ = _pruned("lenet-300-100", PruningPlan("l1-structured", 0.3, scope="layer"))
    dead = (model.fc2.weight == 0).all(dim=1)
    # group importance averages the fc2 rows with fc3's matching input columns, so compare loosely:
    # the pruned rows' mean L1 norm is below the survivors'
    assert norms[dead].mean() < norms[~dead].mean()


def test_residual_channels_are_pruned_together_in_resnet():
    _, model, _ = _pruned("resnet18", PruningPlan("l1-structured", 0.5, scope="layer"))
    # conv1 (the stem) and every layer1 block's second conv add into one residual stream
    stem_dead = (model.bn1.weight == 0) & (model.bn1.bias == 0)
    assert int(stem_dead.sum()) == 32
    for block in model.layer1:
        dead = (block.bn2.weight == 0) & (block.bn2.bias == 0)
        assert torch.equal(dead, stem_dead)


@pytest.mark.parametrize(
    "name, amount, expected",
    [
        # 5000*128+128 + 2*(128*128+128) + 128*2+2
        ("mlp-sst2", 0.5, 673_410),
        # fc1 784*150+150, fc2 150*50+50, fc3 50*10+10
        ("lenet-300-100", 0.5, 125_810),
        # fc1 784*80+80, fc21/fc22 2*(80*4+4), fc3 4*80+80, fc4 80*784+784: the VAE study's 784 -> 80 shapes
        ("vae", 0.8, 127_352),
    ],
)
def test_dense_shrunk_parameter_counts_are_exact(name, amount, expected):
    spec, model, _ = _pruned(name, PruningPlan("l1-structured", amount, scope="layer"))
    inputs = spec.example_inputs(3, seed=4)
    before = torch_outputs(model, inputs)[0]
    result = shrink(model, spec.example_inputs(TRACE_BATCH), keep=spec.output_layers or [])
    assert count_parameters(result.model)[0] == expected
    assert (torch_outputs(result.model, inputs)[0] - before).__abs__().max() <= 1e-5


def test_vae_heads_shrink_together_and_output_width_is_kept():
    spec, model, _ = _pruned("vae", PruningPlan("l1-structured", 0.8, scope="layer"))
    result = shrink(model, spec.example_inputs(TRACE_BATCH), keep=["fc4"])
    m = result.model
    assert (m.fc1.out_features, m.fc21.out_features, m.fc22.out_features, m.fc3.in_features) == (80, 4, 4, 4)
    assert (m.fc4.in_features, m.fc4.out_features) == (80, 784)
    assert result.removed == {"fc1": 320, "fc21": 16, "fc3": 320}


def test_replaying_the_history_rebuilds_the_shapes():
    spec, model, _ = _pruned("resnet18", PruningPlan("fpgm", 0.5, scope="layer"))
    result = shrink(model, spec.example_inputs(TRACE_BATCH), keep=["fc"])
    fresh = replay(spec.make(trained=False), spec.example_inputs(TRACE_BATCH), result.history)
    fresh.load_state_dict(result.model.state_dict())  # strict: every shape must match
    inputs = spec.example_inputs(2, seed=3)
    assert (torch_outputs(fresh, inputs)[0] - torch_outputs(result.model, inputs)[0]).__abs__().max() == 0


class WithInstanceNorm(nn.Module):
    """InstanceNorm1d: torch-pruning prunes its channels, deploykit cannot read which of its
    parameters produce them (no entry in `_PRODUCER_SLICES`)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 3)
        self.act = nn.InstanceNorm1d(6, affine=True)
        self.conv2 = nn.Conv1d(6, 2, 3)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def test_unsupported_layer_is_named_or_left_dense_in_best_effort():
    model = WithInstanceNorm().eval()
    with torch.no_grad():
        model.conv1.weight[:3] = 0
        model.conv1.bias[:3] = 0
    inputs = (torch.randn(2, 4, 10),)
    with pytest.raises(UnsupportedLayerError, match=r"cannot shrink the group of conv1: it contains act \(InstanceNorm1d\)"):
        shrink(model, inputs, keep=["conv2"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = shrink(model, inputs, keep=["conv2"], best_effort=True)
    assert result.removed == {} and result.model.conv1.out_channels == 6
    assert any("left dense" in str(w.message) for w in caught)


def test_prelu_slopes_go_with_their_channels():
    model = nn.Sequential(nn.Linear(8, 6), nn.PReLU(6), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
    inputs = (torch.randn(4, 8),)
    expected = model(*inputs)
    result = shrink(model, inputs, keep=["2"])
    assert result.removed == {"0": 3} and result.model[1].weight.shape == (3,)
    torch.testing.assert_close(result.model(*inputs), expected)


def test_structured_pruning_without_any_group_is_an_error():
    with pytest.raises(UsageError, match="no torch-pruning group for: embedding"):
        _pruned("textclf-agnews", PruningPlan("l1-structured", 0.5))


def test_rules_set_per_module_sparsity():
    plan = PruningPlan("magnitude", 0.2, scope="layer", rules=(("fc1", 0.8), ("fc*", 0.5)))
    _, model, _ = _pruned("lenet-300-100", plan)
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-4)
    assert float((model.fc2.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-4)
    assert plan.amount_for("conv9") == 0.2


def test_plan_files(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text('method = "l1-structured"\nsparsity = 0.3\nscope = "layer"\n[rules]\n"fc1" = 0.6\n')
    plan = PruningPlan(**load_plan_file(path))
    assert plan == PruningPlan("l1-structured", 0.3, scope="layer", rules=(("fc1", 0.6),))
    path.write_text("sparsity = 0.3\nlayers = 2\n")
    with pytest.raises(UsageError, match="unknown key 'layers'"):
        load_plan_file(path)
    path.write_text("sparsity = \n")
    with pytest.raises(UsageError, match=r"malformed plan file .*line 1"):
        load_plan_file(path)
    with pytest.raises(UsageError, match="bad rule 'fc1'"):
        parse_rule("fc1")
    with pytest.raises(UsageError, match="sparsity 1.5 is outside"):
        parse_rule("fc1=1.5")


def test_shrunk_artifact_reloads_with_its_shapes(tmp_path):
    result = export_artifact("lenet-5", PruningPlan("l2-structured", 0.5, scope="layer"), "dense-shrunk", tmp_path / "a")
    m = result.manifest
    assert m.shape_changes["conv1"] == ["Conv2d(1 -> 6, 5x5)", "Conv2d(1 -> 3, 5x5)"]
    assert m.shape_changes["fc3"] == ["Linear(84 -> 10)", "Linear(42 -> 10)"]
    assert m.parameters < m.parameters_before_conversion and m.flops < m.flops_before_conversion
    model, _ = load_torch_model(tmp_path / "a")
    # removing all-zero channels changes no prediction: the shrunk model scores what the pruned one did
    assert get_model("lenet-5").evaluate(model)["accuracy"] == m.metrics["accuracy"]
    assert model.conv2.out_channels == 8 and model.fc1.in_features == 200


def test_gpt2_heads_and_mlp_shrink_consistently_and_replay():
    from deploykit.model.zoo.gpt2 import build_gpt2

    def tiny():
        torch.manual_seed(0)
        return build_gpt2(n_layer=2, n_embd=64, n_head=4, vocab_size=500).eval()

    model = tiny()
    inputs = (torch.randint(0, 500, (2, 10)),)
    plan = PruningPlan("l2-structured", 0.5, scope="layer", rules=(("*.mlp.c_fc", 0.75),))
    result = prune_model(model, plan, inputs)
    assert result.excluded_modules == ("model.lm_head", "model.transformer.wte")  # tied: never pruned
    strip_masks(model)
    before = torch_outputs(model, inputs)[0]
    shrunk = shrink(model, inputs, keep=["model.lm_head"])
    for block in shrunk.model.model.transformer.h:
        assert (block.attn.num_heads, block.attn.split_size, block.attn.c_attn.nf) == (2, 32, 96)
        assert (block.mlp.c_fc.nf, block.mlp.c_proj.weight.shape[0]) == (64, 64)
    assert (torch_outputs(shrunk.model, inputs)[0] - before).__abs__().max() <= 1e-5
    # heads go last, every layer's together (one config head count sizes the decoder's cache)
    assert [entry[:2] for entry in shrunk.block_history] == [
        ["model.transformer.h.0.mlp", "hidden"], ["model.transformer.h.1.mlp", "hidden"],
        ["model.transformer.h.0.attn", "heads"], ["model.transformer.h.1.attn", "heads"]]
    fresh = replay(tiny(), inputs, shrunk.history, shrunk.block_history)
    fresh.load_state_dict(shrunk.model.state_dict())
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight
    assert (torch_outputs(fresh, inputs)[0] - before).__abs__().max() <= 1e-5


class ConcatBranches(nn.Module):
    """Two conv branches concatenated along channels, then a conv consuming all 16 channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_concatenated_branches_shrink_with_the_right_consumer_channels():
    model = ConcatBranches().eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    prune_model(model, PruningPlan("l1-structured", 0.5, scope="layer"), inputs, output_layers=["head"])
    strip_masks(model)
    before = torch_outputs(model, inputs)[0]
    result = shrink(model, inputs, keep=["head"])
    assert (model.a.out_channels, model.b.out_channels, model.head.in_channels) == (4, 4, 8)
    assert (torch_outputs(result.model, inputs)[0] - before).__abs__().max() <= 1e-5


def test_round_to_keeps_every_shrunk_width_a_multiple_and_prunes_no_more_than_asked(tmp_path):
    from torch import nn

    from deploykit.prune.structured import aligned

    assert aligned(list(range(10)), 16, 8) == list(range(8))  # 6 kept -> 8 kept: two fewer removed
    assert aligned([3, 1], 16, 8) == [] and aligned([3, 1], 16, 1) == [3, 1]
    result = export_artifact("resnet18", PruningPlan("l1-structured", 0.3, scope="layer", round_to=8), "dense-shrunk",
                             tmp_path / "a")
    model, _ = load_torch_model(tmp_path / "a")
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and result.manifest.shape_changes
    plain = export_artifact("resnet18", PruningPlan("l1-structured", 0.3, scope="layer"), "dense-shrunk", tmp_path / "b")
    assert result.manifest.parameters >= plain.manifest.parameters  # rounding removes fewer, never more
    assert result.manifest.plan["round_to"] == 8


def test_a_dependency_graph_past_its_time_limit_stops_in_one_line(tmp_path, monkeypatch):
    import time

    import torch_pruning as tp

    from deploykit.core.deadline import TimeLimitError

    original = tp.DependencyGraph.build_dependency

    def slow(self, *args, **kwargs):  # as torch-pruning is on swin_t: minutes in its graph
        time.sleep(5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", slow)
    start = time.monotonic()
    with pytest.raises(TimeLimitError, match=r"dependency graph .* took longer than 0.5 s") as stopped:
        export_artifact("vae", PruningPlan("l1-structured", 0.5, graph_timeout_s=0.5), "dense-shrunk", tmp_path / "a")
    assert time.monotonic() - start < 4 and "--graph-timeout" in str(stopped.value)
    assert len(str(stopped.value).splitlines()) == 1 and not (tmp_path / "a").exists()
    with pytest.raises(UsageError, match="graph timeout must be a number of seconds"):
        PruningPlan("l1-structured", 0.5, graph_timeout_s=0)
