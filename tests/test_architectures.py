"""Structured pruning + dense-shrunk on architectures the zoo does not contain.

Each architecture either works (the shrunk model is smaller, exact against the masked model, and its
ONNX export matches) or fails with an error naming the module that stops it; both are pinned here, at
several sizes each. Hints (`deploykit.model.hints`) then make some of the failures work without editing
deploykit.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deploykit.core.errors import UsageError
from deploykit.export.build import export_artifact
from deploykit.model.hints import LayerHandler, PruningHints
from deploykit.model.spec import InputSpec, ModelSpec
from deploykit.prune.base import PruningPlan
from deploykit.prune.channels import UnsupportedLayerError
from deploykit.runtime.loading import load_torch_model


class DepthwiseSeparable(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean(dim=(2, 3)))


class Grouped(nn.Module):
    """A grouped convolution between two plain ones: only the last one's channels may go."""

    def __init__(self, c, groups=4):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.g = nn.Conv2d(c, 2 * c, 3, padding=1, groups=groups)
        self.b = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.g(torch.relu(self.a(x))))))
        return self.head(x.mean(dim=(2, 3)))


class ConcatSkip(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.c3 = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        return self.head(torch.relu(self.c3(torch.cat([a, b], dim=1))).mean(dim=(2, 3)))


class SharedEmbedding(nn.Module):
    """One embedding feeding two branches."""

    def __init__(self, d, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.left = nn.Linear(d, 2 * d)
        self.right = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, 3)

    def forward(self, tokens):
        e = self.emb(tokens)
        return self.out((torch.relu(self.left(e)) + torch.relu(self.right(e))).mean(dim=1))


class TiedEmbedding(nn.Module):
    """The embedding matrix reused as the output projection, functionally."""

    def __init__(self, d, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, 2 * d)
        self.back = nn.Linear(2 * d, d)

    def forward(self, tokens):
        return self.back(torch.relu(self.mid(self.emb(tokens)))) @ self.emb.weight.t()


class Recurrent(nn.Module):
    def __init__(self, d, cell, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.rnn = cell(d, d + 8, batch_first=True)
        self.fc = nn.Linear(d + 8, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, tokens):
        x, _ = self.rnn(torch.relu(self.proj(self.emb(tokens))))
        return self.out(torch.relu(self.fc(x[:, -1])))


class Scale(nn.Module):
    """A user's layer: a learned per-channel scale (torch-pruning follows it as elementwise)."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma


class WithScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(16, d)
        self.scale = Scale(d)
        self.fc2 = nn.Linear(d, 4)

    def forward(self, x):
        return self.fc2(self.scale(torch.relu(self.fc1(x))))


class Attention(nn.Module):
    def __init__(self, d, heads=4):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff1 = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.ff2(torch.relu(self.ff1(h)))
        return self.out(h.mean(dim=1))


class FunctionalLinear(nn.Module):
    """A user's Linear applied with F.linear: opaque to torch-pruning."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.n_out = n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * n_in ** -0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class CustomLinearNet(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = FunctionalLinear(16, d)
        self.fc2 = nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


IMAGE = (InputSpec("x", ("batch", 3, 8, 8)),)
TOKENS = (InputSpec("tokens", ("batch", "seq"), "int64", 50),)
class EmbeddingIntoLSTM(nn.Module):
    """An embedding straight into an LSTM whose last step feeds the classifier (torch-pruning scores
    none of the LSTM's group: deploykit scores its producing slices)."""

    def __init__(self, d, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, 2 * d, batch_first=True)
        self.fc = nn.Linear(2 * d, 4)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.fc(out[:, -1])


VECTOR = (InputSpec("x", ("batch", 16)),)
SEQUENCE = (InputSpec("x", ("batch", "seq", 8)),)


def _spec(name, build, inputs, **fields):
    return ModelSpec(name=name, build=build, inputs=inputs, outputs=("y",), **fields)


def _export(spec, tmp_path, plan=PruningPlan("l1-structured", 0.5)):
    return export_artifact(spec, plan, "dense-shrunk", tmp_path / "artifact")


def _assert_shrunk_and_exact(result, changed, spec):
    m = result.manifest
    assert m.parameters < m.parameters_before_conversion
    assert set(changed) <= set(m.shape_changes), m.shape_changes
    assert max(m.form_parity_max_abs_error.values()) <= 1e-5
    assert m.onnx_parity_error <= 1e-4
    # the artifact loads back: the recorded removal replays onto a freshly built model
    model, _ = load_torch_model(result.directory, spec=spec)
    assert sum(p.numel() for p in model.parameters()) == m.parameters


WORKS = [
    # name, builder(size), inputs, modules whose shape must change
    ("depthwise", DepthwiseSeparable, IMAGE, ["stem.0", "stem.1", "dw.0", "dw.1", "pw.0", "pw.1", "head"]),
    ("grouped", Grouped, IMAGE, ["b", "head"]),
    ("concat-skip", ConcatSkip, IMAGE, ["c1", "c2", "c3", "head"]),
    ("shared-embedding", SharedEmbedding, TOKENS, ["emb", "left", "right", "out"]),
    ("lstm", lambda d: Recurrent(d, nn.LSTM), TOKENS, ["proj", "rnn", "fc", "out"]),
    ("embedding-into-lstm", EmbeddingIntoLSTM, TOKENS, ["emb", "rnn"]),
    ("custom-scale", WithScale, VECTOR, ["fc1", "fc2"]),
]


@pytest.mark.parametrize("size", [8, 16, 24])
@pytest.mark.parametrize("name,build,inputs,changed", WORKS, ids=[w[0] for w in WORKS])
def test_architectures_that_shrink(name, build, inputs, changed, size, tmp_path):
    spec = _spec(name, lambda: build(size), inputs)
    _assert_shrunk_and_exact(_export(spec, tmp_path), changed, spec)


def test_depthwise_conv_keeps_one_channel_per_group(tmp_path):
    spec = _spec("depthwise", lambda: DepthwiseSeparable(16), IMAGE)
    model, _ = load_torch_model(_export(spec, tmp_path).directory, spec=spec)
    assert model.dw[0].groups == model.dw[0].in_channels == model.dw[0].out_channels == model.stem[0].out_channels < 16


def test_grouped_convolution_groups_are_left_whole(tmp_path):
    result = _export(_spec("grouped", lambda: Grouped(16), IMAGE), tmp_path)
    assert "a" not in result.manifest.shape_changes and "g" not in result.manifest.shape_changes
    skipped = result.prune_result.outcome.details["skipped_normalised_groups"]
    assert any("g (convolution in 4 groups" in reason for reasons in skipped.values() for reason in reasons)


FAILS = [
    # name, builder(size), inputs, error type, message pattern naming the module
    ("tied-embedding", TiedEmbedding, TOKENS, UnsupportedLayerError,
     r"removing channels of the group of emb broke the forward pass .*exclude emb"),
    ("gru", lambda d: Recurrent(d, nn.GRU), TOKENS, UnsupportedLayerError,
     r"torch-pruning could not follow the channels .*layers it cannot read: rnn \(GRU\)"),
]


def test_multihead_attention_loses_whole_heads_and_keeps_its_width(tmp_path):
    # nn.MultiheadAttention's embed_dim (the residual stream) stays, named with the reason; its heads go
    # as units (2 of 4 at 0.5), and the feed-forward shrinks
    spec = _spec("attention", lambda: Attention(16), SEQUENCE)
    result = _export(spec, tmp_path)
    changes = result.manifest.shape_changes
    assert changes["attn"] == ["MultiheadAttention(16, heads=4)", "MultiheadAttention(16, heads=2 of 4)"]
    assert changes["attn.out_proj"] == ["Linear(16 -> 16)", "Linear(8 -> 16)"] and "ff1" in changes
    skipped = result.prune_result.outcome.details["skipped_normalised_groups"]
    assert any("attn (nn.MultiheadAttention: its embed_dim is split into its heads; only whole heads can go)" in reason
               for reasons in skipped.values() for reason in reasons)
    _assert_shrunk_and_exact(result, ["attn", "ff1"], spec)


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("name,build,inputs,error,pattern", FAILS, ids=[f[0] for f in FAILS])
def test_architectures_that_fail_say_which_module(name, build, inputs, error, pattern, size, tmp_path):
    with pytest.raises(error, match=pattern):
        _export(_spec(name, lambda: build(size), inputs), tmp_path)
    assert not (tmp_path / "artifact").exists()


def test_excluding_the_named_module_gets_past_the_failure(tmp_path):
    # attention: excluding the block keeps the residual stream's width; the feed-forward still shrinks
    plan = PruningPlan("l1-structured", 0.5, exclude=("attn",))
    result = _export(_spec("attention", lambda: Attention(32), SEQUENCE), tmp_path, plan)
    assert set(result.manifest.shape_changes) == {"ff1", "ff2"}
    assert "attn" in result.manifest.excluded_modules and "attn.out_proj" in result.manifest.excluded_modules


def test_custom_layer_is_not_pruned_without_a_hint_and_is_with_one(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "hinted").mkdir()
    plain = _export(_spec("custom-linear", lambda: CustomLinearNet(32), VECTOR), tmp_path / "plain")
    assert "fc1" not in plain.manifest.shape_changes  # opaque: left at its width
    assert not any(name.startswith("fc1.") for name in plain.manifest.pruned_parameters)

    handler = LayerHandler(out=(("weight", 0), ("bias", 0)), inp=(("weight", 1),), out_size="n_out")
    hinted = _spec("custom-linear", lambda: CustomLinearNet(32), VECTOR,
                   pruning_hints=PruningHints(layers={FunctionalLinear: handler}))
    result = _export(hinted, tmp_path / "hinted")
    _assert_shrunk_and_exact(result, ["fc1", "fc2"], hinted)
    model, _ = load_torch_model(result.directory, spec=hinted)
    assert model.fc1.weight.shape[0] == model.fc1.n_out == model.fc2.in_features < 32


def test_ignored_layers_hint_keeps_a_width_and_its_group(tmp_path):
    def widths(hints, directory):
        directory.mkdir()
        spec = _spec("shared-embedding", lambda: SharedEmbedding(16), TOKENS, pruning_hints=hints)
        model, _ = load_torch_model(_export(spec, directory).directory, spec=spec)
        return model.left.out_features, model.right.out_features, model.emb.embedding_dim

    left, right, emb = widths(None, tmp_path / "plain")
    assert left == right < 32 and emb < 16
    # left's outputs are added to right's: keeping left's width keeps right's; the embedding still shrinks
    left, right, emb = widths(PruningHints(ignored_layers=("left",)), tmp_path / "hinted")
    assert (left, right) == (32, 32) and emb < 16


def test_attention_hint_marks_projections_not_removable(tmp_path):
    class Heads(nn.Module):
        """A hand-written attention: q/k/v reshaped into 4 heads of 4."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            return (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(b, t, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.block = Heads()
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.block(torch.relu(self.inp(x))).mean(dim=1))

    plan = PruningPlan("l1-structured", 0.5, exclude=("inp",))
    # unhinted, v's channels are masked and then cannot be removed (the reshape into heads rejects them)
    with pytest.raises(UnsupportedLayerError, match=r"group of block\.v broke the forward pass"):
        _export(_spec("heads", Net, SEQUENCE), tmp_path)
    hinted = _spec("heads", Net, SEQUENCE, pruning_hints=PruningHints(attention=("block",)))
    projection = r" \(a projection of an attention module whose heads stay: deploykit has no handler [^)]*\)"
    with pytest.raises(UsageError, match=rf"no removable channel group.*not removable: block\.q{projection}, "
                                         rf"block\.k{projection}, block\.v{projection}"):
        _export(hinted, tmp_path, plan)
