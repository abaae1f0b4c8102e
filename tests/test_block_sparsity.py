"""Block and N:M patterns for every pruner that takes one, and the bsr form (issue 37)."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from deploykit.convert.kernel_choice import ROUNDS, Round, decide_layer
from deploykit.convert.sparse import (
    BSRLinear,
    CSRLinear,
    block_of,
    runs_as_matrix,
    sparse_candidates,
    swap_kernels,
    to_sparse_modules,
)
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.storage import load_weights
from deploykit.prune.base import PruningPlan, load_plan_file, parse_pattern_rule, prune_model, strip_masks
from deploykit.runtime.loading import load_torch_model


def _stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 10))


def _tiles(weight, block):
    r, c = block
    grid = (weight != 0).reshape(weight.shape[0] // r, r, weight.shape[1] // c, c)
    return grid.any(3).any(1), grid.all(3).all(1)


# -- the grammar -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("8x8", "8x8"), ("block:16X16", "16x16"), (" 1x4 ", "1x4"), ("2:4", "2:4"),
                                            ("none", ""), ("", "")])
def test_patterns_are_read_in_every_spelling(text, expected):
    assert PruningPlan(method="magnitude", amount=0.5 if ":" not in text else 0.5, pattern=text).pattern == expected


@pytest.mark.parametrize("text, message", [
    ("0x4", "both sides must be positive"), ("-1x2", "both sides must be positive"), ("4x0", "both sides must be positive"),
    ("1x1", "a 1x1 block is unstructured"), ("8x", "bad pattern '8x'"), ("2048x2", "at most 1024"),
    ("0:4", "1 <= N"), ("4:4", "N must be below M"),
])
def test_bad_patterns_are_refused_in_one_line(text, message):
    with pytest.raises(UsageError, match=message):
        PruningPlan(method="magnitude", amount=0.5, pattern=text)


def test_pattern_rules_and_labels():
    plan = PruningPlan(method="random", amount=0.5, pattern="8x8", pattern_rules=(parse_pattern_rule("2=1x4"),
                                                                                 ("4", "none")))
    assert plan.pattern_for("0").text == "8x8" and plan.pattern_for("2").text == "1x4" and plan.pattern_for("4") is None
    assert plan.label() == "random:0.5,8x8+2 pattern rules"
    with pytest.raises(UsageError, match="applies to magnitude, random, wanda, sparsegpt, not fpgm"):
        PruningPlan(method="fpgm", amount=0.5, pattern_rules=(("a", "8x8"),))
    with pytest.raises(UsageError, match="bad pattern rule"):
        parse_pattern_rule("8x8")


def test_plan_files_take_a_pattern_and_pattern_rules(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text('method = "magnitude"\nsparsity = 0.5\npattern = "8x8"\n[pattern_rules]\n"fc2" = "1x4"\n')
    plan = PruningPlan(**load_plan_file(path))
    assert (plan.pattern, plan.pattern_rules) == ("8x8", (("fc2", "1x4"),))
    path.write_text('method = "magnitude"\nsparsity = 0.5\n[pattern_rules]\n"fc2" = 4\n')
    with pytest.raises(UsageError, match="pattern_rules must be a table of strings"):
        load_plan_file(path)


# -- pruning in blocks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("block", [(8, 8), (1, 4), (4, 1), (16, 16)])
def test_blocks_are_removed_whole_and_the_sparsity_is_counted_in_weights(method, block):
    model = _stack()
    plan = PruningPlan(method=method, amount=0.75, pattern=f"{block[0]}x{block[1]}", scope="layer")
    result = prune_model(model, plan, [torch.randn(2, 64)])
    strip_masks(model)
    for layer in (model[0], model[2]):
        kept, full = _tiles(layer.weight, block)
        assert torch.equal(kept, full)  # every block is all kept or all zero
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.75)
    assert result.outcome.masked == result.outcome.requested == round(0.75 * 64 * 96) + round(0.75 * 96 * 128)


def test_magnitude_blocks_go_by_their_l2_norm():
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(64, dtype=torch.float32).reshape(8, 8) + 1)
        layer.weight[0:4, 4:8] = 100.0  # the top-right block has the largest norm
        layer.weight[4:8, 0:4] = 0.5  # the bottom-left one the smallest
    model = nn.Sequential(layer, nn.Linear(8, 2))
    prune_model(model, PruningPlan(method="magnitude", amount=0.25, pattern="4x4"), [torch.randn(1, 8)])
    strip_masks(model)
    assert not model[0].weight[4:8, 0:4].any() and int((model[0].weight == 0).sum()) == 16


def test_global_scope_ranks_blocks_across_layers():
    model = _stack()
    with torch.no_grad():
        model[2].weight.mul_(100)  # the second layer's blocks all outrank the first's
    prune_model(model, PruningPlan(method="magnitude", amount=0.3, pattern="8x8"), [torch.randn(2, 64)])
    strip_masks(model)
    assert not model[2].weight.eq(0).any()
    assert int(model[0].weight.eq(0).sum()) == round(0.3 * (64 * 96 + 96 * 128) / 64) * 64


def test_a_block_that_does_not_divide_a_layer_prunes_it_on_a_padded_grid():
    model = nn.Sequential(nn.Linear(60, 100), nn.ReLU(), nn.Linear(100, 3))
    prune_model(model, PruningPlan(method="magnitude", amount=0.5, pattern="8x8"), [torch.randn(1, 60)])
    strip_masks(model)
    zero = model[0].weight == 0
    assert abs(int(zero.sum()) - 3000) <= 32  # the nearest count a tile (full 64, or an edge one) allows
    padded = torch.nn.functional.pad(zero, (0, 4, 0, 4), value=True)
    kept = ~padded.reshape(13, 8, 8, 8).all(3).all(1)
    assert torch.equal(kept, (~padded).reshape(13, 8, 8, 8).any(3).any(1))


def test_n_m_on_magnitude_keeps_n_of_every_m_along_the_input():
    model = _stack()
    prune_model(model, PruningPlan(method="magnitude", amount=0.5, pattern="2:4"), [torch.randn(2, 64)])
    strip_masks(model)
    for layer in (model[0], model[2]):
        assert torch.equal((layer.weight != 0).reshape(layer.out_features, -1, 4).sum(2),
                           torch.full((layer.out_features, layer.in_features // 4), 2))


def test_layers_smaller_than_the_block_stay_unpruned_with_the_reason():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 2))
    result = prune_model(model, PruningPlan(method="magnitude", amount=0.5, pattern="8x8"), [torch.randn(1, 64)])
    assert result.exclusion_reasons["2"] == "the block 8x8 is larger than its 4x64 weight"
    assert "2.weight" not in result.pruned_parameters and "0.weight" in result.pruned_parameters
    with pytest.raises(UsageError, match="the block fits none of the 1 layers"):
        prune_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                    PruningPlan(method="magnitude", amount=0.5, pattern="8x8"), [torch.randn(1, 4)])


def test_a_block_that_would_split_attention_heads_is_refused():
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)  # heads of 16
    x = torch.randn(2, 5, 64)
    with pytest.raises(UsageError, match="would split attention heads of self_attn"):
        prune_model(copy.deepcopy(layer), PruningPlan(method="magnitude", amount=0.5, pattern="32x32"), [x])
    result = prune_model(layer, PruningPlan(method="magnitude", amount=0.5, pattern="16x16", scope="layer"), [x])
    assert "self_attn.in_proj_weight" in result.pruned_parameters


def test_gpt2_heads_are_found_through_its_packed_projection():
    from deploykit.model.sources import resolve_model

    spec = resolve_model("gpt2-tiny")  # heads of 16 in a packed (in, out) Conv1D
    with pytest.raises(UsageError, match="would split attention heads of model.transformer.h.0.attn.c_attn: its "
                                         "outputs"):
        prune_model(spec.make(trained=False), PruningPlan(method="magnitude", amount=0.5, pattern="32x8"),
                    spec.example_inputs(1), spec=spec)
    result = prune_model(spec.make(trained=False), PruningPlan(method="magnitude", amount=0.5, pattern="16x16",
                                                               scope="layer"), spec.example_inputs(1), spec=spec)
    assert "model.transformer.h.0.attn.c_attn.weight" in result.pruned_parameters


def test_a_pattern_on_an_embedding_is_refused_and_embeddings_are_left_by_default():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 32), nn.Linear(32, 4))
    tokens = torch.randint(0, 100, (2, 3))
    with pytest.raises(UsageError, match="pattern 4x4 on the embedding 0"):
        prune_model(copy.deepcopy(model), PruningPlan(method="magnitude", amount=0.5, pattern="4x4",
                                                      layer_types=("embedding", "linear")), [tokens])
    result = prune_model(model, PruningPlan(method="magnitude", amount=0.5, pattern="4x4"), [tokens])
    assert result.pruned_parameters == ("1.weight",)


def test_an_n_m_rule_must_match_the_layers_sparsity():
    with pytest.raises(UsageError, match="a sparsity of 0.5; the plan gives it 0.75"):
        prune_model(_stack(), PruningPlan(method="magnitude", amount=0.75, pattern="8x8",
                                          pattern_rules=(("2", "2:4"),)), [torch.randn(1, 64)])


# -- the bsr form -----------------------------------------------------------------------------------------------

def _block_pruned(layer, block=8, sparsity=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out, inp = layer.weight.shape[0], layer.weight[0].numel()
        keep = (torch.rand(out // block, inp // block, generator=g) >= sparsity)
        layer.weight.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1).reshape(layer.weight.shape))
    return layer


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(64, 32), torch.randn(5, 7, 64)),
    (lambda: nn.Linear(64, 32, bias=False), torch.randn(1, 64)),
    (lambda: nn.Conv2d(64, 32, 1), torch.randn(2, 64, 3, 5)),
    (lambda: nn.Conv1d(64, 32, 1), torch.randn(2, 64, 9)),
])
@pytest.mark.parametrize("kernel", [CSRLinear, BSRLinear])
def test_sparse_kernels_compute_what_the_layer_does(make, x, kernel):
    torch.manual_seed(0)
    layer = _block_pruned(make())
    assert runs_as_matrix(layer) and block_of(layer) == 8
    with torch.inference_mode():
        assert torch.allclose(kernel(layer, 8)(x), layer(x), atol=1e-5)


def test_gpt2_conv1d_runs_on_sparse_kernels():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = transformers.pytorch_utils.Conv1D(32, 64)  # (in 64, out 32), stored transposed
    with torch.no_grad():
        layer.weight[:8, :] = 0  # 8 inputs: an 8-wide block column of the (out, in) matrix
        layer.weight[:, :16] = 0
    x = torch.randn(2, 3, 64)
    assert runs_as_matrix(layer) and block_of(layer) == 8
    with torch.inference_mode():
        for kernel in (CSRLinear, BSRLinear):
            assert torch.allclose(kernel(layer, 8)(x), layer(x), atol=1e-5)


def test_layers_a_sparse_kernel_cannot_take():
    assert not runs_as_matrix(nn.Conv2d(8, 8, 3)) and not runs_as_matrix(nn.Conv2d(8, 8, 1, stride=2))
    assert not runs_as_matrix(nn.Conv2d(8, 8, 1, groups=2)) and not runs_as_matrix(nn.Conv2d(8, 8, 1, padding=1))
    unstructured = nn.Linear(64, 64)
    with torch.no_grad():
        unstructured.weight[torch.rand(64, 64) < 0.9] = 0
    assert block_of(unstructured) is None  # zeros in no square block: BSR is not a candidate


def _fake_timer(modules: dict, times: dict):
    """A timer that runs the call once and gives the round time of the kernel whose module ran."""
    ran = []
    for name, module in modules.items():
        module.register_forward_hook(lambda *_a, name=name: ran.append(name))

    def timer(call):
        call()
        return Round(times[ran[-1]], times[ran[-1]] * 0.9)
    return timer


def test_the_fastest_kernel_that_beats_dense_in_every_round_is_chosen():
    layer = _block_pruned(nn.Linear(1024, 1024), sparsity=0.95)  # both kernels' candidates at batch 1
    sparse = {"bsr": BSRLinear(layer, 8), "csr": CSRLinear(layer)}
    times = {"dense": 10.0, "bsr": 3.0, "csr": 6.0}
    timer = _fake_timer({"dense": layer, **sparse}, times)
    decision = decide_layer(layer, sparse, torch.randn(1, 1024), 1, timer=timer)
    assert decision["choice"] == "bsr" and decision["bsr_ms"] == 3.0 and decision["csr_ms"] == 6.0
    assert len(decision["bsr_rounds_ms"]) == len(decision["dense_rounds_ms"]) == ROUNDS
    times.update(bsr=9.5, csr=9.5)  # neither beats dense by the margin: dense, the safe choice
    assert decide_layer(layer, sparse, torch.randn(1, 1024), 1, timer=timer)["choice"] == "dense"


def test_a_small_layer_is_never_timed():
    layer = _block_pruned(nn.Linear(64, 64), sparsity=0.9)
    decision = decide_layer(layer, {"bsr": BSRLinear(layer, 8), "csr": CSRLinear(layer)}, torch.randn(1, 64), 1,
                            timer=lambda call: pytest.fail("timed"))
    assert decision["choice"] == "dense" and "bsr never a candidate" in decision["reason"]


def test_a_hostile_recipe_is_refused():
    model = _stack()
    _block_pruned(model[2])
    inputs = (torch.randn(1, 64),)
    recipe = {"kernels": {"2": {"choice": "bsr", "block": 8}}, "kernel_batch": 1, "threads": torch.get_num_threads(),
              "offered": ["bsr", "csr"]}
    swapped, names = to_sparse_modules(copy.deepcopy(model), inputs, recipe)
    assert names == ["2"] and isinstance(swapped[2], BSRLinear)
    with torch.inference_mode():
        assert torch.allclose(swapped(*inputs), model(*inputs), atol=1e-5)
    for kernels, message in (({"2": {"choice": "bsr", "block": 7}}, "does not divide"),
                             ({"2": {"choice": "bsr", "block": True}}, "does not divide"),
                             ({"nope": {"choice": "csr"}}, "not a pruned layer"),
                             ({"2": {"choice": "eval"}}, "not a pruned layer"),
                             ({"2": "csr"}, "must map layer names to decisions")):
        with pytest.raises(ArtifactError, match=message):
            to_sparse_modules(copy.deepcopy(model), inputs, {**recipe, "kernels": kernels})
    with pytest.raises(ArtifactError, match="unknown kernels"):
        to_sparse_modules(copy.deepcopy(model), inputs, {**recipe, "offered": ["os.system"]})


def test_only_called_layers_with_zeros_are_candidates():
    model = _stack()
    _block_pruned(model[2])
    assert sparse_candidates(model, (torch.randn(1, 64),)) == ["2"]
    swapped, _ = swap_kernels(copy.deepcopy(model), {"2": {"choice": "csr"}})
    assert isinstance(swapped[2], CSRLinear) and "stored=" in swapped[2].extra_repr()


# -- the command line -------------------------------------------------------------------------------------------

def test_export_bsr_writes_kept_blocks_and_the_torch_runtime_matches(cli, tmp_path):
    out = tmp_path / "a"
    result = cli("export", "--model", "mlp-sst2", "--prune", "magnitude:0.8", "--block", "8x8", "--form", "bsr",
                 "--scope", "layer", "--no-measure", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "kernel mlp.0:" in result.stdout and "a bsr artifact's model.onnx holds dense initializers" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["pattern"] == "8x8" and manifest["form_recipe"]["offered"] == ["bsr", "csr"]
    assert manifest["form_recipe"]["kernels"]["mlp.0"]["block"] == 8
    with safe_open(str(out / "weights.safetensors"), framework="pt") as handle:
        records = json.loads(handle.metadata()["encodings"])
    assert records["mlp.0.weight"]["kind"] == "blocks" and records["mlp.0.weight"]["block"] in ([8, 8], [16, 16])
    weights = load_weights(out / "weights.safetensors")
    assert float((weights["mlp.0.weight"] == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
    runtime, _ = load_torch_model(out)
    reference, _ = load_torch_model(out, for_runtime=False)
    x = torch.rand(3, 5000)
    with torch.inference_mode():
        assert torch.allclose(runtime(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--block", "0x4"], "bad block '0x4': both sides must be positive"),
    (["--block", "2:4"], "--block takes a block RxC"),
    (["--pattern", "8x8", "--block", "4x4"], "name two patterns"),
    (["--block", "8x8", "--layer-types", "embedding"], "nothing to prune"),
    (["--block", "512x512"], "the block fits none of the 3 layers"),
    (["--pattern-rule", "mlp.0"], "bad pattern rule"),
])
def test_bad_block_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, args, message):
    out = tmp_path / "a"
    result = cli("export", "--model", "mlp-sst2", "--prune", "magnitude:0.5", *args, "--out", str(out))
    assert result.returncode == 2 and not out.exists()
    assert message in result.stderr and "Traceback" not in result.stderr
