"""Bring your own model: entry points, weights files, input specs and ONNX files, from the CLI."""

import json
import os
import textwrap

import numpy as np
import onnx
import pytest
import torch

from deploykit.core.errors import ArtifactError, UsageError
from deploykit.model.checkpoints import load_checkpoint
from deploykit.model.entrypoint import entry_point_spec, parse_entry_point
from deploykit.model.sources import ModelOptions, resolve_model
from deploykit.model.spec import InputSpec

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    from deploykit.model.spec import InputSpec, ModelSpec


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
            self.head = nn.Linear(32, 4)

        def forward(self, features):
            return self.head(self.body(features))


    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 12)
            self.fc = nn.Linear(12, 5)

        def forward(self, tokens, scale):
            return {"tags": self.fc(self.emb(tokens)) * scale, "norm": self.emb(tokens).norm(dim=-1)}


    def build():
        """A small MLP the user wrote."""
        return Net(), torch.randn(2, 16)


    def bare():
        return Net()


    def tagger():
        return Tagger(), (torch.randint(0, 100, (2, 7)), torch.ones(2, 7, 1))


    def spec():
        return ModelSpec(name="user-mlp", build=Net, inputs=(InputSpec("features", ("batch", 16)),),
                         outputs=("logits",))


    def broken():
        raise RuntimeError("no GPU here")


    def wrong():
        return 42
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "usermodel.py"
    path.write_text(USER_MODEL)
    return path


def test_parse_entry_point(tmp_path):
    assert parse_entry_point("pkg.mod:make").target == "pkg.mod"
    entry = parse_entry_point("models/net.py:build")
    assert entry.is_file and os.path.isabs(entry.target) and entry.label == "net.py:build"
    assert parse_entry_point("mlp-sst2") is None and parse_entry_point("a b:c") is None


def test_factory_returning_model_and_examples_describes_its_inputs(user_file):
    spec = entry_point_spec(f"{user_file}:tagger")
    assert spec.name == "usermodel.py:tagger"
    tokens, scale = spec.inputs
    assert (tokens.name, tokens.shape, tokens.dtype) == ("tokens", ("batch", 7), "int64") and 1 <= tokens.high <= 100
    assert scale == InputSpec("scale", ("batch", 7, 1))
    assert spec.outputs == ("tags", "norm")


def test_entry_point_export_and_bench_rebuild_the_model(cli, user_file, tmp_path):
    out = tmp_path / "a"
    r = cli("export", "--model", f"{user_file}:build", "--prune", "l1-structured:0.5", "--form", "dense-shrunk",
            "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "usermodel.py:build"
    # the file travels with the artifact (code/, checksummed); where it came from is provenance only
    assert {k: v for k, v in manifest["source"].items() if k != "code"} == {
        "kind": "entry-point", "entry_point": "code/usermodel.py:build", "inputs": None, "from": f"{user_file}:build"}
    assert list(manifest["source"]["code"]["files"]) == ["code/usermodel.py"]
    assert manifest["inputs"] == [{"name": "features", "shape": ["batch", 16], "dtype": "float32", "high": None,
                                  "values": None}]
    assert manifest["parameters"] < manifest["parameters_before_conversion"]
    fast = ["--min-iters", "5", "--min-time", "0", "--warmup", "0", "--no-store", "--json"]
    # the artifact names code: torch imports it only with consent; onnxruntime needs none
    r = cli("bench", str(out), *fast)
    assert r.returncode == 0, r.stderr
    assert {rec["runtime"] for rec in json.loads(r.stdout)["records"]} == {"onnxruntime"}
    assert "warning: torch skipped:" in r.stderr and "--trust-code" in r.stderr
    r = cli("bench", str(out), *fast, "--trust-code")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)["records"]
    assert {rec["runtime"] for rec in records} == {"torch", "onnxruntime"}
    assert all(rec["parity_max_abs_error"] <= 1e-4 for rec in records)


def test_module_entry_point_returning_a_model_spec(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    spec = resolve_model("usermodel:spec")
    assert spec.name == "user-mlp" and spec.outputs == ("logits",)
    assert spec.bundle(None, None) == {"kind": "entry-point", "entry_point": "usermodel:spec", "inputs": None}


def test_bare_model_needs_an_input_spec(cli, user_file, tmp_path):
    r = cli("export", "--model", f"{user_file}:bare", "--out", str(tmp_path / "a"))
    assert r.returncode == 2
    assert "returned a model without example inputs" in r.stderr and "--input-spec" in r.stderr
    assert not (tmp_path / "a").exists()
    r = cli("export", "--model", f"{user_file}:bare", "--input-shape", "batch,16", "--out", str(tmp_path / "a"), "-q")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["inputs"][0]["name"] == "features"  # --input-shape takes forward's own name
    assert manifest["source"]["inputs"] == [{"name": "features", "shape": ["batch", 16], "dtype": "float32", "high": None,
                                            "values": None}]


def test_input_spec_names_a_sequence_axis_for_sweeps(user_file):
    spec = resolve_model(f"{user_file}:tagger", ModelOptions(inputs=(
        InputSpec.parse("tokens:batch,seq:int64:100"), InputSpec.parse("scale:batch,seq,1"))))
    tokens, scale = spec.example_inputs(3, length=11)
    assert tokens.shape == (3, 11) and scale.shape == (3, 11, 1) and int(tokens.max()) < 100


@pytest.mark.parametrize("factory,message", [
    ("missing", "has no factory 'missing'; its functions and classes: Net, Tagger, bare, broken, build, spec, "
                "tagger, wrong"),
    ("broken", "factory .*:broken failed: RuntimeError: no GPU here"),
    ("wrong", "returned int; expected a ModelSpec"),
])
def test_bad_factories_are_one_line_errors(user_file, factory, message):
    with pytest.raises(UsageError, match=message):
        resolve_model(f"{user_file}:{factory}")


def test_missing_entry_point_file_and_module(tmp_path):
    with pytest.raises(UsageError, match="model file .* does not exist"):
        resolve_model(f"{tmp_path}/nope.py:build")
    with pytest.raises(UsageError, match="cannot import 'no_such_package_xyz': ModuleNotFoundError"):
        resolve_model("no_such_package_xyz:build")


def test_input_spec_parsing():
    assert InputSpec.parse("x:batch,3,32,32") == InputSpec("x", ("batch", 3, 32, 32))
    assert InputSpec.parse("ids:batch,seq:int64:50257") == InputSpec("ids", ("batch", "seq"), "int64", 50257)
    for text, message in (("x", "expected NAME:SHAPE"), ("x:batch,-3", "neither a positive size nor a name"),
                          ("x:batch:int64", "needs `high`"), ("x:batch:int64:many", "HIGH must be a positive integer"),
                          ("x:batch:complex64", "dtype 'complex64'")):
        with pytest.raises(UsageError, match=message):
            InputSpec.parse(text)


def test_input_spec_is_refused_for_models_that_declare_inputs():
    with pytest.raises(UsageError, match="--input-spec describes the inputs of an entry point"):
        resolve_model("mlp-sst2", ModelOptions(inputs=(InputSpec.parse("bow:batch,10"),)))


# --- weights ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _user_net(user_file):
    return entry_point_spec(f"{user_file}:build").make()


def test_weights_from_safetensors_and_state_dict_checkpoints(user_file, tmp_path):
    from safetensors.torch import save_file

    trained = _user_net(user_file)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    save_file(trained.state_dict(), tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": trained.state_dict()}, tmp_path / "ckpt.pt")
    x = torch.randn(4, 16)
    for path in ("w.safetensors", "ckpt.pt"):
        spec = resolve_model(f"{user_file}:build", ModelOptions(weights=str(tmp_path / path)))
        assert torch.equal(spec.make()(x), trained(x)), path
        bundle = spec.bundle(tmp_path, None)
        assert bundle["kind"] == "entry-point" and bundle["weights"]["file"] == path


def test_weights_for_a_zoo_model_record_their_file(tmp_path):
    spec = resolve_model("lenet-300-100")
    model = spec.make(trained=False)
    torch.save(model.state_dict(), tmp_path / "lenet.pth")
    loaded = resolve_model("lenet-300-100", ModelOptions(weights=str(tmp_path / "lenet.pth")))
    assert loaded.train is None  # weights given: no training
    source = loaded.bundle(tmp_path, None)
    assert source["kind"] == "zoo" and len(source["weights"]["sha256"]) == 64


def test_pickle_with_a_payload_is_refused_without_trust(user_file, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _user_net(user_file).state_dict(), "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="holds more than tensors .*--trust-pickle"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()  # refused before anything ran


def test_trusted_pickle_loads_a_whole_module_with_a_warning(cli, user_file, tmp_path):
    from deploykit.model.checkpoints import PickleWarning

    net = _user_net(user_file)
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_checkpoint(tmp_path / "whole.pt")
    with pytest.warns(PickleWarning, match="can run code"):
        state = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert set(state) == set(net.state_dict())
    r = cli("export", "--model", f"{user_file}:build", "--weights", str(tmp_path / "whole.pt"), "--out",
            str(tmp_path / "a"))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and not (tmp_path / "a").exists()


def test_weights_that_do_not_fit_name_what_differs(user_file, tmp_path):
    state = _user_net(user_file).state_dict()
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ArtifactError, match="missing head.bias; unexpected extra.weight"):
        resolve_model(f"{user_file}:build", ModelOptions(weights=str(tmp_path / "w.pt")))
    with pytest.raises(UsageError, match="--trust-pickle applies to a --weights file"):
        resolve_model(f"{user_file}:build", ModelOptions(trust_pickle=True))


# --- ONNX files ------------------------------------------------------------------------------------


@pytest.fixture
def onnx_dir(cli, user_file, tmp_path):
    r = cli("export", "--model", f"{user_file}:build", "--out", str(tmp_path / "a"), "-q")
    assert r.returncode == 0, r.stderr
    return tmp_path / "a"


def _external(onnx_dir, directory, location="net.data"):
    directory.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(onnx_dir / "model.onnx"))
    onnx.save_model(model, str(directory / "net.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return directory / "net.onnx"


def test_bench_and_audit_an_onnx_file_with_external_data(cli, onnx_dir, tmp_path):
    path = _external(onnx_dir, tmp_path / "ext")
    r = cli("bench", str(path), "--batch", "1,3", "--min-iters", "5", "--min-time", "0", "--warmup", "0",
            "--no-store", "--json")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)["records"]
    assert [(rec["runtime"], rec["batch_size"]) for rec in records] == [("onnxruntime", 1), ("onnxruntime", 3)]
    assert records[0]["model"] == "net.onnx" and records[0]["parameters"] == 1732
    sizes = (path.stat().st_size + (path.parent / "net.data").stat().st_size)
    assert records[0]["disk_bytes"] == sizes
    assert "torch cannot run onnx-file (net.onnx): skipped" in r.stderr
    r = cli("audit", str(path), "--json")
    assert r.returncode == 0, r.stderr
    audit = json.loads(r.stdout)
    assert audit["parameters"] == 1732 and audit["weights_bytes"] == (path.parent / "net.data").stat().st_size
    assert {row["storage"] for row in audit["rows"]} == {"external:net.data"}


def test_external_data_outside_the_model_directory_is_refused(cli, onnx_dir, tmp_path):
    path = _external(onnx_dir, tmp_path / "shared")
    for location in ("../shared/net.data", str(tmp_path / "shared" / "net.data")):
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        crafted = tmp_path / "crafted" / "net.onnx"
        crafted.parent.mkdir(exist_ok=True)
        onnx.save(model, str(crafted))
        for command in ("bench", "audit"):
            r = cli(command, str(crafted), *(["--no-store"] if command == "bench" else []))
            assert r.returncode == 2, r.stderr
            assert f"keeps its data at {location!r}, outside the model's directory; refused" in r.stderr


def test_symlinked_external_data_escaping_the_directory_is_refused(onnx_dir, tmp_path):
    from deploykit.model.onnxfile import open_onnx_file

    path = _external(onnx_dir, tmp_path / "m", location="link.data")
    (tmp_path / "elsewhere.data").write_bytes((path.parent / "link.data").read_bytes())
    (path.parent / "link.data").unlink()
    (path.parent / "link.data").symlink_to(tmp_path / "elsewhere.data")
    with pytest.raises(ArtifactError, match="outside the model's directory"):
        open_onnx_file(path)


def test_onnx_file_inputs_come_from_the_graph(cli, tmp_path):
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 4)

        def forward(self, ids):
            return self.emb(ids).sum(dim=1)

    path = tmp_path / "embed.onnx"
    torch.onnx.export(Embed(), (torch.zeros(2, 5, dtype=torch.long),), str(path), dynamo=False, input_names=["ids"],
                      output_names=["y"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    r = cli("bench", str(path), "--no-store")
    assert r.returncode == 2 and "say what it holds with --input-value ids=int:0:HIGH" in r.stderr
    r = cli("bench", str(path), "--input-spec", "ids:batch,seq:int64:30", "--no-store")
    assert r.returncode == 2 and "dynamic axes seq: give their size with --seq-len" in r.stderr
    r = cli("bench", str(path), "--input-spec", "idz:batch,seq:int64:30", "--no-store")
    assert r.returncode == 2 and "--input-spec names idz, not inputs of embed.onnx (its inputs: ids)" in r.stderr
    r = cli("bench", str(path), "--input-spec", "ids:batch,seq:int64:30", "--seq-len", "4,9", "--runtime",
            "onnxruntime", "--min-iters", "5", "--min-time", "0", "--warmup", "0", "--no-store", "--json")
    assert r.returncode == 0, r.stderr
    assert [rec["sequence_length"] for rec in json.loads(r.stdout)["records"]] == [4, 9]


def test_onnx_file_with_a_fixed_batch_refuses_other_batch_sizes(cli, tmp_path):
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"])
    r = cli("bench", str(path), "--batch", "1,4", "--no-store")
    assert r.returncode == 2 and "fixed.onnx has no batch axis to set to 4 (inputs: x (1, 4))" in r.stderr


def test_onnx_file_is_not_a_model_to_export(cli, onnx_dir, tmp_path):
    r = cli("export", "--model", str(onnx_dir / "model.onnx"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "is an ONNX file: `deploykit bench` and `deploykit audit` take it" in r.stderr


def test_unreadable_onnx_file(cli, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    r = cli("audit", str(tmp_path / "junk.onnx"))
    assert r.returncode == 2 and "is not a readable ONNX model" in r.stderr


def test_onnx_file_runs_are_kept_and_reported(cli, onnx_dir, tmp_path):
    store = tmp_path / "runs.sqlite"
    r = cli("bench", str(onnx_dir / "model.onnx"), "--min-iters", "5", "--min-time", "0", "--warmup", "0",
            "--store", str(store), "-q")
    assert r.returncode == 0, r.stderr
    r = cli("report", "--store", str(store), "--format", "csv")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.strip().splitlines()[:2]
    fields = dict(zip(header.split(","), row.split(",")))
    assert (fields["model"], fields["form"], fields["runtime"]) == ("model.onnx", "onnx", "onnxruntime")


def test_audit_takes_an_entry_point_with_weights(cli, user_file, tmp_path):
    from safetensors.torch import save_file

    save_file(_user_net(user_file).state_dict(), tmp_path / "w.safetensors")
    r = cli("audit", "--model", f"{user_file}:build", "--weights", str(tmp_path / "w.safetensors"), "--prune", "magnitude:0.5",
            "--json", "-q")
    assert r.returncode == 0, r.stderr
    audit = json.loads(r.stdout)
    assert audit["model"] == "usermodel.py:build" and audit["parameters"] == 1732
    assert audit["nonzero_parameters"] == 1732 - round(0.5 * (16 * 32 + 32 * 32))  # head excluded


def test_the_example_entry_point_and_plan_in_models_export_as_documented(cli, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = cli("export", "--model", str(root / "models/examples/small_cnn.py") + ":build",
            "--plan", str(root / "models/examples/plan.toml"), "--out", str(tmp_path / "a"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["excluded_modules"] == ["0", "8"] and manifest["pruned_parameters"] == ["3.weight"]
    (row,) = [row for row in manifest["sparsity"] if row["name"] == "3.weight"]
    assert row["numel"] - row["nonzero"] == round(0.7 * 32 * 16 * 3 * 3)  # the plan's rule, not its default 0.5


def test_export_says_which_weights_it_left_dense_beside_the_sparsity_reached(cli, tmp_path):
    (tmp_path / "mha.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.head = nn.Linear(16, 32), nn.Linear(32, 4)
                self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

            def forward(self, x):
                h = self.embed(x)
                return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

        def build():
            return Net().eval(), (torch.randn(2, 5, 16),)
    '''))
    model = f"{tmp_path / 'mha.py'}:build"
    r = cli("export", "--model", model, "--prune", "magnitude:0.9", "--scope", "layer", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    # embed 461 of 512 + in_proj 2,765 of 3,072 + out_proj 922 of 1,024 (each rounded): 4,148 of 4,608
    assert "asked magnitude:0.9,layer: pruned weights 90.02% zero" in r.stdout
    assert "128 parameters in 1 weight (head.weight): excluded: produces the output 'output'" in r.stdout
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["unpruned_weights"]) == {"head.weight"}
    assert "attn.in_proj_weight" in manifest["pruned_parameters"]


def test_an_operator_onnx_cannot_export_is_one_line_not_torchs_graph_dump(cli, tmp_path):
    (tmp_path / "pool.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def build():  # 62 is no multiple of 5: torch.onnx cannot export this adaptive pooling
            net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(100, 2))
            return net.eval(), (torch.randn(2, 3, 64, 64),)
    '''))
    r = cli("export", "--model", f"{tmp_path / 'pool.py'}:build", "--out", str(tmp_path / "a"), "-q")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "ONNX export failed" in r.stderr, r.stderr[:500]
    assert not (tmp_path / "a").exists()
