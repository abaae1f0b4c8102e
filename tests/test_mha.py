"""Heads of torch's nn.MultiheadAttention as units: `HeadPrunedAttention` computes what the module
computes, for every way it is called; heads masked by the structured pruners are removed exactly;
torchvision's ViT loses heads through the CLI's export path and loads back from its artifact."""

import pytest
import torch
from torch import nn

from deploykit.export.build import export_artifact
from deploykit.model.artifact import count_weights
from deploykit.model.spec import InputSpec, ModelSpec
from deploykit.prune.base import PruningPlan
from deploykit.prune.blocks import handler_for
from deploykit.prune.mha import HeadPrunedAttention
from deploykit.runtime.loading import load_torch_model

E, H, L, S, B = 16, 4, 5, 7, 3


def _masks():
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=1)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    return {
        "none": {},
        "bool-2d": dict(attn_mask=causal),
        "float-2d": dict(attn_mask=torch.randn(L, S)),
        "per-head-3d": dict(attn_mask=torch.randn(B * H, L, S)),
        "padding": dict(key_padding_mask=padding),
        "both": dict(attn_mask=causal, key_padding_mask=padding),
        "weights-per-head": dict(need_weights=True, average_attn_weights=False),
        "no-weights": dict(need_weights=False),
    }


@pytest.mark.parametrize("mask", sorted(_masks()))
@pytest.mark.parametrize("layout", ["batch-first", "sequence-first", "other-key-width", "no-bias"])
def test_all_heads_kept_computes_what_multihead_attention_computes(layout, mask):
    torch.manual_seed(0)
    kdim = 12 if layout == "other-key-width" else None
    mha = nn.MultiheadAttention(E, H, batch_first=layout == "batch-first", kdim=kdim, vdim=kdim,
                                bias=layout != "no-bias").eval()
    query = torch.randn(B, L, E) if layout == "batch-first" else torch.randn(L, B, E)
    key = torch.randn(B, S, kdim or E) if layout == "batch-first" else torch.randn(S, B, kdim or E)
    kwargs = _masks()[mask]
    copy = HeadPrunedAttention.from_mha(mha, range(H))
    with torch.no_grad():
        expected, got = mha(query, key, key, **kwargs), copy(query, key, key, **kwargs)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)


def test_unbatched_input_and_training_mode_follow_the_module():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.5)
    copy = HeadPrunedAttention.from_mha(mha, range(H))
    x = torch.randn(L, E)
    torch.testing.assert_close(copy.eval()(x, x, x)[0], mha.eval()(x, x, x)[0], atol=1e-6, rtol=1e-5)
    assert copy(x, x, x)[0].shape == (L, E) and copy(x, x, x)[1].shape == (L, L)
    copy.train()
    assert not torch.equal(copy(x, x, x)[0], copy(x, x, x)[0])  # dropout on the attention weights


def _zero_heads(mha: nn.MultiheadAttention, heads) -> None:
    """What the structured pruners' masks leave: the heads' query, key and value rows zero."""
    d = mha.head_dim
    with torch.no_grad():
        for part in range(3):
            for h in heads:
                rows = slice(part * E + h * d, part * E + (h + 1) * d)
                mha.in_proj_weight[rows] = 0
                mha.in_proj_bias[rows] = 0


@pytest.mark.parametrize("mask", ["none", "per-head-3d", "both"])
def test_removing_zeroed_heads_leaves_the_output_unchanged(mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    _zero_heads(mha, [1, 2])
    x, memory = torch.randn(B, L, E), torch.randn(B, S, E)
    kwargs = _masks()[mask]
    handler = handler_for(mha)
    pruned = handler.remove(mha, [1, 2])
    assert (pruned.num_heads, pruned.q_proj.out_features, pruned.heads.tolist()) == (2, 8, [0, 3])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, memory, memory, need_weights=False, **kwargs)[0],
                                   mha(x, memory, memory, need_weights=False, **kwargs)[0], atol=1e-6, rtol=1e-5)
    again = handler_for(pruned)  # pruned again (iterative pruning): by its own handler, in place
    x_ref = pruned(x, x, x, need_weights=False)[0]
    _zero = pruned.v_proj.weight.detach().clone()
    assert again.remove(pruned, []) is None and torch.equal(pruned.v_proj.weight, _zero)
    torch.testing.assert_close(pruned(x, x, x, need_weights=False)[0], x_ref)
    with torch.no_grad():  # its second head (original 3) zeroed, as the pruners' masks leave it, then removed
        for projection in (pruned.q_proj, pruned.k_proj, pruned.v_proj):
            projection.weight[4:] = 0
            projection.bias[4:] = 0
        masked = pruned(x, memory, memory, need_weights=False, **kwargs)[0]
        again.remove(pruned, [1])
        assert (pruned.num_heads, pruned.q_proj.out_features, pruned.out_proj.in_features) == (1, 4, 4)
        assert pruned.heads.tolist() == [0]
        torch.testing.assert_close(pruned(x, memory, memory, need_weights=False, **kwargs)[0], masked,
                                   atol=1e-6, rtol=1e-5)


def test_modules_whose_heads_cannot_be_taken_apart_keep_them():
    assert handler_for(nn.MultiheadAttention(E, H, add_bias_kv=True)) is None
    assert handler_for(nn.MultiheadAttention(E, H, add_zero_attn=True)) is None
    assert handler_for(nn.MultiheadAttention(E, H)) is not None


def _tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=5).eval()


def test_torchvision_vit_loses_heads_exactly_and_loads_back(tmp_path):
    spec = ModelSpec("tiny-vit", _tiny_vit, (InputSpec("pixels", (1, 3, 32, 32)),), ("logits",))
    result = export_artifact(spec, PruningPlan("l1-structured", 0.5, scope="layer"), "dense-shrunk",
                             tmp_path / "a")
    m = result.manifest
    changes = m.shape_changes
    for i in range(2):
        block = f"encoder.layers.encoder_layer_{i}.self_attention"
        assert changes[block] == ["MultiheadAttention(32, heads=4)", "MultiheadAttention(32, heads=2 of 4)"]
        assert changes[f"{block}.out_proj"] == ["Linear(32 -> 32)", "Linear(16 -> 32)"]
    assert max(m.form_parity_max_abs_error.values()) <= 1e-5 and m.onnx_parity_error <= 1e-4
    model, _ = load_torch_model(result.directory, spec=spec)
    assert isinstance(model.encoder.layers[0].self_attention, HeadPrunedAttention)
    assert sum(p.numel() for p in model.parameters()) == m.parameters
    # its counts are read back from the weights file under the converted names (no in_proj_weight left)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" not in m.parameter_names
    assert count_weights(result.directory, m) == (m.parameters, m.nonzero_parameters)


def test_a_transformer_encoder_layer_runs_its_standard_path_around_the_pruned_heads():
    """torch's TransformerEncoderLayer reads its attention's packed projections to choose a fused fast
    path; around the pruned module it takes its standard path, which computes the same."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True).eval()
    _zero_heads(layer.self_attn, [0, 3])
    x = torch.randn(B, L, E)
    with torch.no_grad():
        expected = layer(x)
        layer.self_attn = handler_for(layer.self_attn).remove(layer.self_attn, [0, 3])
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        padding = torch.zeros(B, L, dtype=torch.bool)
        padding[:, -1] = True
        assert layer(x, src_key_padding_mask=padding).shape == (B, L, E)
