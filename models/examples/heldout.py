"""Models shaped like the pretrained ones people bring, built here from code (random weights, seeded by
deploykit): several output heads, an output layer that is not the last module run, per-channel
activations (PReLU), a recurrent encoder, a TorchScript module, a CNN that permutes before it
flattens, and ONNX files whose weights are `Constant` nodes or that take a scalar input.

Each factory is an entry point (`--model models/examples/heldout.py:two_heads`) returning the model and
one call's example inputs; the ONNX writers make files for `deploykit bench FILE.onnx` / `audit`.
`benchmarks/model_coverage.py --heldout` runs them all; the tests pin what each must do.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn


class TwoHeadDetector(nn.Module):
    """A backbone with a classifier (defined first) and a box regressor beside it: both are outputs."""

    def __init__(self, width: int = 32, classes: int = 6):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, classes, 1)
        self.regressor = nn.Conv2d(width, 4, 1)

    def forward(self, image: torch.Tensor):
        features = self.backbone(image)
        return self.classifier(features), self.regressor(features)


class PooledTokenClassifier(nn.Module):
    """Per-token logits weighted by an attention score run after them: the output layer is not the
    last module run (the one-unit scorer is)."""

    def __init__(self, features: int = 24, width: int = 64, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)
        self.score = nn.Linear(width, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.body(frames)
        logits = self.head(hidden)
        weights = torch.softmax(self.score(hidden), dim=1)
        return (logits * weights).sum(dim=1)


class PReLUCNN(nn.Module):
    """Conv-BN-PReLU blocks with one slope per channel, and one with a single shared slope."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.PReLU(width),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.PReLU(2 * width),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.PReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class LSTMEncoder(nn.Module):
    """A speaker-encoder shape: stacked LSTM over frames, a projection of the last state, unit length."""

    def __init__(self, mels: int = 40, hidden: int = 128, layers: int = 3, embedding: int = 64):
        super().__init__()
        self.lstm = nn.LSTM(mels, hidden, num_layers=layers, batch_first=True)
        self.proj = nn.Linear(hidden, embedding)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(frames)
        embedding = torch.relu(self.proj(out[:, -1]))
        return embedding / (embedding.norm(dim=1, keepdim=True) + 1e-5)


class PermuteFlattenCNN(nn.Module):
    """Convolutions over (frequency, time), then time moved before channels and flattened into the
    classifier: the classifier's columns are ordered (time, channel, frequency)."""

    def __init__(self, width: int = 16, bins: int = 8, frames: int = 6, classes: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.classifier = nn.Linear(frames * width * bins, classes)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(spectrogram))))  # (batch, channel, time, frequency)
        return self.classifier(x.permute(0, 2, 1, 3).reshape(x.shape[0], -1))


def two_heads():
    return TwoHeadDetector().eval(), (torch.randn(2, 3, 16, 16),)


def late_head():
    return PooledTokenClassifier().eval(), (torch.randn(2, 10, 24),)


def prelu_cnn():
    return PReLUCNN().eval(), (torch.randn(2, 3, 16, 16),)


def lstm_encoder():
    return LSTMEncoder().eval(), (torch.randn(2, 20, 40),)


def permute_flatten():
    return PermuteFlattenCNN().eval(), (torch.randn(2, 1, 6, 8),)


def scripted():
    """A scripted CNN loaded back as a user's `torch.jit.load` gives it: a `RecursiveScriptModule`."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(PReLUCNN(width=8).eval()), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer), (torch.randn(2, 3, 16, 16),)


def write_constant_weights_onnx(path: Path) -> int:
    """An MLP exported to ONNX, its weights then moved from initializers into `Constant` nodes (one layer's
    inside an `If` branch, as exporters of scripted control flow write them). Returns its parameter count."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    _export(model, (torch.randn(1, 32),), path, ["features"], ["logits"])
    proto = onnx.load(str(path))
    graph = proto.graph
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    del graph.initializer[:]
    # the last layer's weight moves into the branch of an If taken on a condition that is always true;
    # the other branch fills zeros of its shape (ConstantOfShape: a fill value, not a weight)
    last = constants.pop()
    weight = numpy_helper.to_array(last.attribute[0].t)
    name = last.output[0]
    taken = helper.make_graph(
        [helper.make_node("Constant", [], [f"{name}_then"], value=numpy_helper.from_array(weight, f"{name}_then"))],
        "then", [], [helper.make_tensor_value_info(f"{name}_then", onnx.TensorProto.FLOAT, list(weight.shape))])
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array(weight.shape, np.int64))),
         helper.make_node("ConstantOfShape", ["shape"], [f"{name}_else"],
                          value=numpy_helper.from_array(np.zeros(1, weight.dtype)))],
        "else", [], [helper.make_tensor_value_info(f"{name}_else", onnx.TensorProto.FLOAT, list(weight.shape))])
    condition = helper.make_node("Constant", [], ["always"], value=numpy_helper.from_array(np.array(True)))
    choose = helper.make_node("If", ["always"], [name], then_branch=taken, else_branch=other)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*constants, condition, choose, *nodes])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return sum(p.numel() for p in model.parameters())


def write_scalar_input_onnx(path: Path) -> None:
    """A model that takes audio and its sample rate as a scalar int64 (which must be 16000)."""

    class Resampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 16)

        def forward(self, audio: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
            scale = (sr.to(audio.dtype) / 16000.0)
            return self.proj(audio * scale)

    torch.manual_seed(0)
    _export(Resampled().eval(), (torch.randn(1, 64), torch.tensor(16000)), path, ["audio", "sr"], ["embedding"],
            dynamic={"audio": {0: "batch"}, "embedding": {0: "batch"}})


def _export(model, inputs, path: Path, names, outputs, dynamic=None) -> None:
    torch.onnx.export(model, inputs, str(path), input_names=names, output_names=outputs, dynamo=False,
                      dynamic_axes=dynamic or {names[0]: {0: "batch"}, outputs[0]: {0: "batch"}}, opset_version=17)


# Architectures from the libraries people build on, from configs (random weights, no download)

def _tiny_transformer(**extra) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                max_position_embeddings=64, **extra)


def gpt2_lm():
    """GPT-2 as a causal LM with its caches on: exported through optimum, as its directory would be."""
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100))
    return model.eval(), (torch.randint(0, 100, (2, 8)),)


def neox_lm():
    """GPT-NeoX: one fused, head-interleaved query_key_value projection per layer."""
    import transformers

    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_tiny_transformer()))
    return model.eval(), (torch.randint(0, 100, (2, 8)),)


def wav2vec2():
    """wav2vec2's encoder: a weight-normed positional convolution."""
    import transformers

    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return transformers.Wav2Vec2Model(config).eval(), (torch.randn(2, 800),)


def mnasnet():
    """torchvision's MNASNet: its `_load_from_state_dict` checks the state dict's version."""
    import torchvision

    return torchvision.models.mnasnet0_5(num_classes=10).eval(), (torch.randn(2, 3, 64, 64),)
