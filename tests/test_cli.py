import json
import subprocess
import sys

import pytest

FAST = ["--warmup", "0.01", "--min-time", "0.05", "--min-iters", "20", "--threads", "1"]


def test_help_is_instant_and_imports_no_torch():
    code = "import sys, deploykit.cli.app; deploykit.cli.app.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_explains_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("models", "export", "bench"):
        assert command in result.stdout
    bench_help = cli("bench", "--help").stdout
    assert "sparsities 0, 0.5, 0.9" in bench_help and "--json" in bench_help


def test_models_lists_the_zoo_with_the_extra_each_needs_and_its_training(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path))  # nothing trained yet
    lines = cli("models").stdout.splitlines()
    rows = {line.split(None, 1)[0]: line for line in lines[2:] if line and not line.startswith(" ")}
    assert "SST-2 bag-of-words MLP (SST-2 study): 5000 -> 256" in rows["mlp-sst2"]
    assert {"lenet-300-100", "lenet-5", "resnet18", "resnet50", "vae"} <= set(rows)
    assert rows["espnet-st-small"].split()[1] == "espnet" and rows["gpt2-tiny"].split()[1] == "hf"
    assert "trains on first use" in rows["gpt2-tiny-trained"] and "trains on first use" in rows["lenet-5"]
    assert "trains" not in rows["mlp-sst2"] and "espnet" not in rows["mlp-sst2"]
    listed = {m["name"]: m for m in json.loads(cli("models", "--json").stdout)}
    assert {"name": "mlp-sst2", "inputs": ["bow"], "outputs": ["logits"], "extra": None,
            "trains": False}.items() <= listed["mlp-sst2"].items()
    assert {"extra": "hf", "trains": True, "trained_here_seconds": None}.items() <= listed["gpt2-tiny-trained"].items()


def test_export_prints_the_sparsity_table_and_writes_the_artifact(cli, tmp_path):
    out = tmp_path / "art"
    result = cli("export", "--model", "mlp-sst2", "--prune", "magnitude:0.33", "--prune-output",
                 "--form", "csr", "--out", str(out), "--layers")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("mlp.0.weight") for line in lines)
    assert any(line.startswith("all pruned parameters") and line.rstrip().endswith("33.00%") for line in lines)
    assert any(line.startswith("overall model") for line in lines)
    assert "deploykit: pruning: magnitude:0.33 (global)" in result.stderr  # progress goes to stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["exclude_output"] is False and manifest["excluded_modules"] == []


def test_export_json_is_the_manifest(cli, tmp_path):
    result = cli("export", "--prune", "random:0.5", "--form", "dense", "--out", str(tmp_path / "a"), "--json", "-q")
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout) == json.loads((tmp_path / "a" / "manifest.json").read_text())


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "--model", "nope", "--out", "{tmp}/o"], "unknown model 'nope'; known: "),
        (["export", "--prune", "magnitude:1.5", "--out", "{tmp}/o"], "sparsity 1.5 is outside [0, 1)"),
        (["export", "--prune", "magnitude:-0.2", "--out", "{tmp}/o"], "sparsity -0.2 is outside [0, 1)"),
        (["export", "--form", "coo", "--out", "{tmp}/o"], "argument --form: invalid choice: 'coo' (choose from 'bsr', 'csr', 'dense', 'dense-shrunk')"),
        (["export", "--out", "{tmp}/file/o"], "directory '{tmp}/file' does not exist"),
        (["export", "--out", "{tmp}/existing"], "'{tmp}/existing' already exists"),
        (["export"], "the following arguments are required: --out"),
        (["export", "--opset", "99", "--out", "{tmp}/o"], "opset 99 is not supported; use 7..20"),
        (["export", "--tolerance", "-1", "--out", "{tmp}/o"], "tolerance must be >= 0, got -1"),
        (["bench", "{tmp}/missing"], "artifact directory '{tmp}/missing' does not exist"),
        (["bench", "{tmp}/existing"], "'{tmp}/existing' is not a deploykit artifact (no manifest.json)"),
        (["bench", "--runtime", "tensorrt"], "unknown runtime 'tensorrt'; known: onnxruntime, openvino, torch"),
        (["bench", "--batch", "0"], "batch sizes must be >= 1"),
        (["bench", "--prune", "magnitude:0.5,1"], "sparsity 1 is outside [0, 1)"),
        (["bench", "{tmp}/existing", "--model", "mlp-sst2"], "give either exported DIRs / ONNX files or --model/--prune/--plan/--rule/--form, not both"),
        (["bench", "--batch", "x"], "expected a comma-separated list of int"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(cli, tmp_path, args, message):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "existing").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert message.format(tmp=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unreadable_manifest_is_reported(cli, tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    result = cli("bench", str(tmp_path))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_bench_measures_each_runtime_in_its_own_process(cli):
    result = cli("bench", "--prune", "magnitude:0.5", "--form", "csr", *FAST, "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)["records"]
    # the unpruned model (dense, exported as it is) is measured with the plan, in the same rounds
    assert [(r["form"], r["sparsity"], r["runtime"], r["baseline"]) for r in records] == [
        ("dense", 0.0, "torch", True), ("dense", 0.0, "onnxruntime", True),
        ("csr", 0.5, "torch", False), ("csr", 0.5, "onnxruntime", False)]
    records = [r for r in records if not r["baseline"]]
    by_runtime = {r["runtime"]: r for r in records}
    for r in records:
        assert r["threads"] == 1 and r["batch_size"] == 1
        assert r["timing"] == {"warmup_s": 0.01, "min_time_s": 0.05, "min_iters": 20, "max_iters": 100_000,
                               "rounds": 5, "processes": 1, "max_time_s": 1800.0}
        assert len(r["measurement"]["samples_ns"]) >= 20 and r["latency_ms"]["samples"] >= 20
        latency, samples = r["latency_ms"], r["latency_ms"]["samples"]
        assert (latency["p90"] is None) == (samples < 50) and (latency["p99"] is None) == (samples < 500)
        tails = [latency[q] for q in ("p50", "p90", "p99") if latency[q] is not None]
        assert tails == sorted(tails) and latency["p50_ci95"][0] <= latency["p50"] <= latency["p50_ci95"][1]
        assert r["parity_max_abs_error"] <= 1e-4
        assert r["parameters"] == 1_412_354 and r["nonzero_parameters"] < 1_412_354 * 0.51
    # the onnxruntime worker never imports torch, so its process is far smaller
    assert by_runtime["onnxruntime"]["peak_rss_bytes"] < by_runtime["torch"]["peak_rss_bytes"]
    assert by_runtime["torch"]["disk_bytes"] < by_runtime["onnxruntime"]["disk_bytes"]  # compact weights vs dense onnx


def test_bench_an_exported_directory_with_json_file(cli, tmp_path):
    art = tmp_path / "art"
    assert cli("export", "--prune", "magnitude:0.9", "--form", "csr", "--out", str(art), "-q").returncode == 0
    result = cli("bench", str(art), "--runtime", "onnxruntime", "--batch", "1,4", *FAST, "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:6] == ["model", "plan", "form", "runtime", "batch", "threads"] and header[-1] == "pareto"
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert [r["batch_size"] for r in records] == [1, 4]
    assert all(r["artifact"] == str(art) and r["sparsity"] == 0.9 for r in records)


def test_bench_refuses_an_artifact_whose_onnx_no_longer_matches_and_parity_catches_it_unchecked(cli, tmp_path):
    import shutil

    for name, prune in (("a", "magnitude:0"), ("b", "magnitude:0.9")):
        assert cli("export", "--prune", prune, "--out", str(tmp_path / name), "-q").returncode == 0
    shutil.copy(tmp_path / "b" / "model.onnx", tmp_path / "a" / "model.onnx")
    # the checksum the manifest recorded catches the swap before anything runs
    result = cli("bench", str(tmp_path / "a"), "--runtime", "onnxruntime", *FAST)
    assert result.returncode == 2
    assert result.stderr.endswith("model.onnx does not match its recorded SHA-256 (damaged or modified since export)\n")
    # unchecked, the parity check catches it: the rows are kept, marked wrong, and the exit code says so
    result = cli("bench", str(tmp_path / "a"), "--runtime", "onnxruntime", "--no-verify", *FAST)
    assert result.returncode == 1
    assert "onnxruntime on CPUExecutionProvider vs stripped PyTorch model (batch=1) parity failed on output 'logits'" in result.stderr
    assert "warning: --no-verify" in result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("mlp-sst2"))
    assert row.endswith("WRONG")


def test_export_dense_shrunk_prints_shapes_parameters_and_flops(cli, tmp_path):
    result = cli("export", "--model", "vae", "--prune", "l1-structured:0.8", "--scope", "layer", "--round-to", "1",
                 "--form", "dense-shrunk", "--out", str(tmp_path / "vae"), "--no-measure")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  fc1:  Linear(784 -> 400) -> Linear(784 -> 80)" in out
    assert "  fc4:  Linear(400 -> 784) -> Linear(80 -> 784)" in out
    assert "parameters 652,824 -> 127,352" in out
    assert "FLOPs per item 1,302,400 -> 252,800 (FLOPs 5.15x fewer: a count, not a time" in out


def test_plan_file_and_rules_on_the_command_line(cli, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('method = "magnitude"\nsparsity = 0.2\nscope = "layer"\n[rules]\n"fc1" = 0.9\n')
    result = cli("export", "--model", "lenet-300-100", "--plan", str(plan), "--rule", "fc2=0.5",
                 "--out", str(tmp_path / "a"), "--json", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["plan"]["rules"] == [["fc2", 0.5]]  # --rule replaces the file's rules
    rows = {r["name"]: r for r in manifest["sparsity"]}
    assert rows["fc2.weight"]["sparsity"] == pytest.approx(0.5) and rows["fc1.weight"]["sparsity"] == pytest.approx(0.2)
    # the recorded accuracy is the reloaded model's on the held-out digits, recomputed here
    from deploykit.model.catalog import get_model
    from deploykit.runtime.loading import load_torch_model

    reloaded, _ = load_torch_model(tmp_path / "a", for_runtime=False)
    assert manifest["metrics"]["accuracy"] == get_model("lenet-300-100").evaluate(reloaded)["accuracy"]
    plan.write_text("sparsity = 0.2\nblocks = 3\n")
    bad = cli("export", "--plan", str(plan), "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "unknown key 'blocks'" in bad.stderr and not (tmp_path / "b").exists()


def test_imp_without_training_hook_is_a_clear_error(cli, tmp_path):
    result = cli("export", "--prune", "imp:0.5", "--rounds", "2", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["deploykit: error: imp retrains between rounds, and mlp-sst2 has no training hook"]


def test_unknown_model_lists_every_registered_model(cli, tmp_path):
    from deploykit.model.catalog import list_models

    result = cli("export", "--model", "nope", "--out", str(tmp_path / "o"))
    names = ", ".join(sorted(spec.name for spec in list_models()))
    assert result.stderr.strip() == (f"deploykit: error: unknown model 'nope'; known: {names}; or an entry point "
                                     "(package.module:factory, path/to/file.py:factory); or the path of "
                                     "a local Hugging Face model directory (config.json + weights) or an ESPnet ST "
                                     "experiment directory or zip (config.yaml + model .pth)")
