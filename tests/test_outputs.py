"""Model outputs of every common shape: flattened with stable names, and exported, checked and run."""

import collections
import dataclasses
import json
import textwrap

import pytest
import torch
from torch import nn

from deploykit.core.errors import UsageError
from deploykit.core.outputs import flat_forward, flatten_outputs

A, B, C = torch.ones(2), torch.zeros(2, 3), torch.full((1,), 7.0)


@dataclasses.dataclass
class Pair:
    logits: torch.Tensor
    extra: object = None


Named = collections.namedtuple("Named", "first second")


@pytest.mark.parametrize("output, names", [
    (A, ["output"]),
    ((A, B), ["output_0", "output_1"]),
    ([A, B], ["output_0", "output_1"]),
    ({"logits": A, "hidden": B}, ["logits", "hidden"]),
    (Pair(A), ["logits"]),  # a field left None is skipped
    (Pair(A, (B, C)), ["logits", "extra.0", "extra.1"]),
    (Named(A, {"x": B}), ["first", "second.x"]),
    ({"state": (A, [B, None, C])}, ["state.0", "state.1.0", "state.1.2"]),
])
def test_every_shape_flattens_in_order_with_stable_names(output, names):
    flat = flatten_outputs(output)
    assert [name for name, _ in flat] == names
    expected = {"output": A, "output_0": A, "output_1": B, "logits": A, "hidden": B, "extra.0": B, "extra.1": C,
                "first": A, "second.x": B, "state.0": A, "state.1.0": B, "state.1.2": C}
    assert all(tensor is expected[name] for name, tensor in flat)


def test_hugging_face_model_outputs_flatten_by_their_set_fields():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    output = BaseModelOutputWithPooling(last_hidden_state=B, pooler_output=A)  # hidden_states left None
    assert [name for name, _ in flatten_outputs(output)] == ["last_hidden_state", "pooler_output"]


def test_what_is_not_a_tensor_is_named_in_one_line():
    with pytest.raises(UsageError, match="output extra is a str"):
        flatten_outputs({"logits": A, "extra": "text"})
    with pytest.raises(UsageError, match="the model returned no tensor"):
        flatten_outputs({"nothing": None})


def test_flat_forward_is_restored_and_keeps_parameter_names():
    model = nn.Linear(2, 2)
    with flat_forward(model):
        assert isinstance(model(A), tuple)
    assert isinstance(model(A), torch.Tensor) and "forward" not in vars(model)
    assert list(model.state_dict()) == ["weight", "bias"]


USER_MODELS = textwrap.dedent('''
    import collections, dataclasses
    import torch
    from torch import nn

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        hidden: tuple

    class Net(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.body, self.head, self.shape = nn.Linear(8, 16), nn.Linear(16, 4), shape

        def forward(self, x):
            h = torch.relu(self.body(x))
            y = self.head(h)
            if self.shape == "dict":
                return {"logits": y, "hidden": h}
            if self.shape == "nested":
                return (y, [h, None, h * 2])
            if self.shape == "dataclass":
                return Out(y, (h,))
            from transformers.modeling_outputs import SequenceClassifierOutput
            return SequenceClassifierOutput(logits=y, hidden_states=(h,))

    def build(shape):
        torch.manual_seed(0)
        return Net(shape), (torch.randn(2, 8),)

    def dict_out(): return build("dict")
    def nested_out(): return build("nested")
    def dataclass_out(): return build("dataclass")
    def model_output(): return build("model_output")
''')


@pytest.mark.parametrize("factory, outputs", [
    ("dict_out", ["logits", "hidden"]),
    ("nested_out", ["output_0", "output_1.0", "output_1.2"]),
    ("dataclass_out", ["logits", "hidden.0"]),
    ("model_output", ["logits", "hidden_states.0"]),
])
def test_entry_points_returning_structured_outputs_export_with_parity_and_bench(cli, tmp_path, factory, outputs):
    (tmp_path / "structured.py").write_text(USER_MODELS)
    entry = f"{tmp_path / 'structured.py'}:{factory}"
    # both layers produce an output (the hidden state is returned too): only --prune-output prunes them
    r = cli("export", "--model", entry, "--prune", "magnitude:0.5", "--form", "csr", "--out", str(tmp_path / "a"),
            "--json", "-q", "--prune-output")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["outputs"] == outputs
    assert set(manifest["onnx_parity_max_abs_error"]) == set(outputs)
    assert max(manifest["onnx_parity_max_abs_error"].values()) <= manifest["parity_tolerance"]
    r = cli("bench", str(tmp_path / "a"), "--trust-code", "--min-iters", "3", "--min-time", "0", "--warmup", "0",
            "--no-store", "--json", "-q")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)["records"]
    assert {rec["runtime"] for rec in records} == {"torch", "onnxruntime"}
    assert all(rec["parity_max_abs_error"] <= rec["parity_tolerance"] for rec in records)
