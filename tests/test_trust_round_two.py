"""Trust, second round (issue 32): the surfaces added since the first round, tried as an attacker and a
careless user would. Hugging Face directories confined and sized before building; outputs that would
destroy the command's own input; concurrent exports to one --out; imported runs and runs files
validated record by record; manifests covered by their own checksum; profiles, input specs, sequence
lengths and ONNX loops checked; fleet addresses that answer nothing. Every case: one line, the
documented exit code, nothing written."""

import json
import os
import shutil
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from deploykit.cli.app import main
from deploykit.model.artifact import MANIFEST_FILE
from deploykit.results.store import ResultStore

FAST = ["--warmup", "0", "--min-time", "0", "--min-iters", "3", "--threads", "1", "--runtime", "onnxruntime"]


@pytest.fixture
def dk(capsys):
    """The CLI in this process: (exit code, stdout, stderr); a failure is one line, never a traceback
    or an internal error."""

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and "internal error" not in err, err
        if code != 0:
            assert len([line for line in err.splitlines() if line.startswith("deploykit: error")]) <= 1, err
        return code, out, err

    return run


# -- Hugging Face directories ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    pytest.importorskip("optimum")
    import torch
    import transformers as T

    root = tmp_path_factory.mktemp("hf2")
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64)).save_pretrained(
        root / "bert")
    return root / "bert"


@pytest.fixture
def hf_copy(bert_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(bert_dir, target)
    return target


def _secret(tmp_path):
    """A weights file outside the model directory, which no export may read."""
    from safetensors.torch import load_file, save_file

    secret = tmp_path / "secret"
    secret.mkdir()
    return secret, load_file, save_file


def test_a_weights_index_naming_a_file_outside_is_refused(dk, hf_copy, tmp_path):
    secret, load_file, save_file = _secret(tmp_path)
    tensors = load_file(hf_copy / "model.safetensors")
    save_file(tensors, secret / "leak.safetensors")
    (hf_copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: "../secret/leak.safetensors" for name in tensors}}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = dk("export", "--model", hf_copy, "--out", tmp_path / "out")
    assert code == 2 and "weight_map[" in err and "climbs out with '..'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_file_that_links_out_of_the_directory_is_refused(dk, hf_copy, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    shutil.move(hf_copy / name, outside)
    (hf_copy / name).symlink_to(outside)
    code, _, err = dk("export", "--model", hf_copy, "--out", tmp_path / "out")
    assert code == 2 and f"'{name}' is a symbolic link to" in err and "cp -rL" in err, err
    assert not (tmp_path / "out").exists()


def test_a_damaged_weights_header_is_refused_naming_the_file(dk, hf_copy, tmp_path):
    weights = hf_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)  # a header longer than the file
    weights.write_bytes(bytes(data))
    code, _, err = dk("export", "--model", hf_copy, "--out", tmp_path / "out")
    assert code == 2 and f"cannot read weights file {str(weights)!r}" in err, err


@pytest.mark.parametrize("change, says", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer (or a list or table of them, or "
                                 "null), got 0"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
    ({"hidden_size": "wide"}, "hidden_size must be a positive integer"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
     "has a quantization_config ('bitsandbytes')"),
    ({"num_hidden_layers": 10_000}, "declares 10,000 layers"),
    ({"vocab_size": 10**9, "hidden_size": 4096, "num_attention_heads": 32}, "describes at least"),
    ({"hidden_size": 10**6, "num_attention_heads": 1}, "GiB as float32"),
])
def test_configs_are_checked_before_anything_is_built(dk, hf_copy, tmp_path, change, says):
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, **change}))
    started = time.perf_counter()
    code, _, err = dk("export", "--model", hf_copy, "--out", tmp_path / "out")
    assert code == 2 and says in err, err
    assert time.perf_counter() - started < 60  # refused from the config, not after building for minutes


def test_a_deeply_nested_config_is_bad_input(dk, hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    text = json.dumps(config)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (hf_copy / "config.json").write_text(text)
    code, _, err = dk("export", "--model", hf_copy, "--out", tmp_path / "out")
    assert code == 2 and "cannot read config.json" in err, err


def test_the_size_estimate_is_a_lower_bound_of_real_models(bert_dir):
    import transformers as T

    from deploykit.model.hf import estimated_parameters, read_config

    config = read_config(bert_dir)
    built = sum(p.numel() for p in T.BertForSequenceClassification(config).parameters())
    assert 0.5 * built <= estimated_parameters(config) <= built


# -- an output never replaces an input of the same command ------------------------------------------


def test_report_out_onto_its_own_store_is_refused(dk, copy, tmp_path):
    store = tmp_path / "s.sqlite"
    assert dk("bench", copy(), *FAST, "--store", store)[0] == 0
    before = store.read_bytes()
    code, _, err = dk("report", "--store", store, "--out", store)
    assert code == 2 and "--out" in err and "is the results store" in err, err
    assert store.read_bytes() == before and len(ResultStore(store).runs()) == 1


def test_bench_json_onto_its_own_store_is_refused_before_running(dk, copy, tmp_path):
    store = tmp_path / "s.sqlite"
    assert dk("bench", copy(), *FAST, "--store", store)[0] == 0
    link = tmp_path / "link.sqlite"
    link.symlink_to(store)
    for target in (store, link):  # the same file through a link too
        code, out, err = dk("bench", copy("b"), *FAST, "--store", store, f"--json={target}")
        assert code == 2 and "is the results store" in err and "p50" not in out, err
        shutil.rmtree(tmp_path / "b")
    assert len(ResultStore(store).runs()) == 1


def test_audit_json_into_the_artifact_is_refused(dk, copy):
    art = copy()
    before = (art / MANIFEST_FILE).read_bytes()
    code, _, err = dk("audit", art, "--json", art / MANIFEST_FILE)
    assert code == 2 and "is inside the artifact" in err, err
    assert (art / MANIFEST_FILE).read_bytes() == before
    code, _, err = dk("audit", art, "--json", art / "audit.json")
    assert code == 2 and "is inside the artifact" in err and not (art / "audit.json").exists()


def test_profile_detect_save_never_replaces_another_profile(dk, tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    folder.mkdir()
    other = folder / "lab-box.toml"
    other.write_text('name = "lab-box"\ndescription = "a machine"\n[match]\ncpu = ["NoSuchCPU"]\n')
    monkeypatch.setenv("DEPLOYKIT_PROFILES", str(folder))
    code, _, err = dk("profile", "detect", "--save", other)
    assert code == 2 and "is the profile" in err and "lab-box" in other.read_text()


def test_two_exports_to_one_out_never_replace_each_other(tmp_path):
    """The second to finish refuses at its rename (the directory appeared while it worked)."""
    from deploykit.core.errors import OutputPathError
    from deploykit.core.fsutil import atomic_directory

    out = tmp_path / "art"
    with pytest.raises(OutputPathError, match="already exists"):
        with atomic_directory(out) as first:
            (first / "a").write_text("first")
            with atomic_directory(out) as second:  # started after the first's check, finishes first
                (second / "b").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # the winner's, untouched
    assert not list(tmp_path.glob(".art.*"))  # the loser's temporary directory is gone


def test_concurrent_export_commands_to_one_out(tmp_path, cli):
    out = tmp_path / "art"
    results = []

    def export():
        results.append(cli("export", "--out", str(out), "-q"))

    threads = [threading.Thread(target=export) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 2)
    assert "already exists" in loser.stderr and loser.stderr.count("\n") == 1
    assert (out / MANIFEST_FILE).is_file()


# -- runs read back are validated -------------------------------------------------------------------


def _runs_file(tmp_path, store_path, **changes):
    """A runs file (what bench spills) of the store's last run with `changes` made to its first record."""
    from deploykit.results.store import NewRun

    run = ResultStore(store_path).run("last")
    data = NewRun(run.records, run.started_utc, run.status, run.command, run.profile, run.conditions,
                  run.failures, uid="edited").to_dict()
    record = data["records"][0]
    for key, value in changes.items():
        if key == "samples":
            record["measurement"]["samples_ns"] = value
        elif key in record:
            record[key] = value
        else:
            data[key] = value
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"format": "deploykit.runs", "runs": [data]}))
    return path


@pytest.fixture(scope="module")
def measured_store(artifact, tmp_path_factory):
    store = tmp_path_factory.mktemp("measured") / "s.sqlite"
    assert main(["bench", str(artifact), *FAST, "--store", str(store), "-q"]) == 0
    return store


@pytest.mark.parametrize("changes, says", [
    (dict(batch_size="lots"), "batch_size must be an integer, got 'lots'"),
    (dict(threads=-7), "threads must be in [1,"),
    (dict(samples=[-5, 3]), "samples_ns[0] must be in [0,"),
    (dict(samples=[10**30]), "samples_ns[0] must be in [0,"),
    (dict(samples=[]), "at least one sample"),
    (dict(disk_bytes=1e38), "disk_bytes must be an integer, got 1e+38"),
    (dict(sparsity=float("nan")), "sparsity must be finite"),
    (dict(status="great"), "status must be one of complete, interrupted, failed"),
    (dict(conditions=[1]), "conditions must be an object"),
])
def test_imported_runs_files_are_validated_before_anything_is_written(dk, measured_store, tmp_path, changes, says):
    path = _runs_file(tmp_path, measured_store, **changes)
    target = tmp_path / "target.sqlite"
    code, _, err = dk("report", "--store", target, "--import", path)
    assert code == 2 and says in err and "runs[0]" in err, err
    assert not target.exists()


def test_an_imported_store_with_an_edited_record_is_refused_and_nothing_written(dk, measured_store, tmp_path):
    source = tmp_path / "edited.sqlite"
    shutil.copy(measured_store, source)
    with sqlite3.connect(source) as db:
        (text,) = db.execute("SELECT record FROM records LIMIT 1").fetchone()
        record = json.loads(text)
        record["threads"] = -7
        db.execute("UPDATE records SET record = ?", (json.dumps(record),))
    target = tmp_path / "target.sqlite"
    code, _, err = dk("report", "--store", target, "--import", source)
    assert code == 2 and "threads must be in [1," in err and not target.exists(), err
    code, _, err = dk("report", "--store", source, "--format", "html")  # and the same store read directly
    assert code == 2 and "holds a malformed record" in err, err


def test_a_store_of_another_schema_is_bad_input(dk, tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE runs (x TEXT)")
        db.execute("PRAGMA user_version = 2")
    for args in (("report", "--store", other, "--list"), ("report", "--store", tmp_path / "t.sqlite", "--import", other)):
        code, _, err = dk(*args)
        assert code == 2 and "not a deploykit store of this schema" in err, err


def test_a_runs_file_of_a_newer_layout_is_refused(dk, measured_store, tmp_path):
    path = _runs_file(tmp_path, measured_store)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "version": 9}))
    code, _, err = dk("report", "--store", tmp_path / "t.sqlite", "--import", path)
    assert code == 2 and "layout version 9" in err


def test_import_is_one_pass_and_one_transaction(tmp_path):
    """5,000 runs go in within seconds (they took minutes, growing with the square): the source is read
    once and the target written in one transaction."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from store_import import make_source

    source, target = tmp_path / "source.sqlite", tmp_path / "target.sqlite"
    make_source(source, 5000)
    started = time.perf_counter()
    assert main(["report", "--store", str(target), "--import", str(source)]) == 0
    took = time.perf_counter() - started
    assert len(ResultStore(target).runs()) == 5000
    assert took < 120, took  # generous for a busy 2-core machine; the quadratic import took >300 s


# -- the manifest is covered by its own checksum ----------------------------------------------------


@pytest.mark.parametrize("command", ["bench", "audit"])
def test_an_edited_form_in_the_manifest_is_caught(dk, copy, command):
    art = copy()
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    (art / MANIFEST_FILE).write_text(json.dumps({**manifest, "form": "csr"}))
    code, _, err = dk(command, art, *(FAST if command == "bench" else []), "--no-store" if command == "bench" else "-q")
    assert code == 2 and "does not match its own recorded SHA-256" in err, err


def test_an_older_manifest_without_its_own_checksum_needs_no_verify(dk, copy):
    art = copy()
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    manifest.pop("manifest_sha256")
    (art / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 2}))
    code, _, err = dk("audit", art)
    assert code == 2 and "records no checksums of its own manifest" in err and "--no-verify" in err
    assert dk("audit", art, "--no-verify")[0] == 0


# -- values read from the command line and from profiles ---------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["--seq-len", "0"], "--seq-len takes lengths >= 1"),
    (["--max-time", "0"], "--max-time must be a number of seconds"),
])
def test_bench_values_are_checked(dk, copy, args, says):
    code, _, err = dk("bench", copy(), *FAST, "--no-store", *args)
    assert code == 2 and says in err, err


@pytest.mark.parametrize("spec, says", [
    ("x:batch,8:int64:0", "HIGH (the exclusive upper bound of its values) must be an integer in [1,"),
    (f"x:batch,8:int64:{10**23}", "must be an integer in [1,"),
    (f"x:batch,{10**23}", "is neither a size in [1,"),
])
def test_input_specs_are_bounded(dk, tmp_path, spec, says):
    code, _, err = dk("export", "--model", "models/examples/small_cnn.py:build", "--input-spec", spec,
                      "--out", tmp_path / "out")
    assert code == 2 and says in err, err


def test_a_repeated_input_spec_is_refused(dk, tmp_path):
    code, _, err = dk("export", "--model", "models/examples/small_cnn.py:build", "--input-spec", "x:batch,3,32,32",
                      "--input-spec", "x:batch,3,16,16", "--out", tmp_path / "out")
    assert code == 2 and "describes input 'x' more than once" in err


@pytest.mark.parametrize("text, says", [
    ('name = "any"\ndescription = "d"\n[match]\ncpu = [""]\n', "list of non-empty strings"),
    ('name = "../../x"\ndescription = "d"\n', "must be letters, digits"),
    ('name = "' + "n" * 1_000_000 + '"\ndescription = "d"\n', "non-empty string of up to"),
    ('name = "big"\ndescription = "d"\n[cpu]\nmodel = "x"\ncores = 100000000000000000000\n', "positive integer up to"),
    ('name = "big"\ndescription = "d"\n[cpu]\nmodel = "x"\ncores = 10000000\n', "positive integer up to"),
    ('name = "deep"\ndescription = "d"\nx = ' + "[" * 10_000 + "]" * 10_000 + "\n", "nested too deeply"),
])
def test_profiles_are_type_checked(dk, tmp_path, monkeypatch, text, says):
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "p.toml").write_text(text)
    monkeypatch.setenv("DEPLOYKIT_PROFILES", str(folder))
    code, _, err = dk("profile", "list")
    assert code == 2 and says in err, err


def test_a_deeply_nested_plan_is_bad_input(dk, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('method = "magnitude"\nsparsity = 0.5\nexclude = ' + "[" * 10_000 + "]" * 10_000 + "\n")
    code, _, err = dk("export", "--plan", plan, "--out", tmp_path / "out")
    assert code == 2 and "nested too deeply" in err, err


# -- nothing hangs ------------------------------------------------------------------------------------


def _loop_model(path: Path, trips: int, inner: int | None = None) -> Path:
    """y = x + (number of iterations) through a Loop with a constant trip count (nested once with `inner`)."""
    import onnx
    from onnx import TensorProto, helper

    def body(name: str, nested: int | None):
        nodes = [helper.make_node("Identity", [f"{name}_cond_in"], [f"{name}_cond_out"])]
        if nested is None:
            nodes.append(helper.make_node("Add", [f"{name}_acc_in", "one"], [f"{name}_acc_out"]))
        else:
            inner_body = body(f"{name}_inner", None)
            nodes.append(helper.make_node("Loop", ["inner_trips", "", f"{name}_acc_in"], [f"{name}_acc_out"],
                                          body=inner_body))
        return helper.make_graph(
            nodes, name,
            [helper.make_tensor_value_info(f"{name}_i", TensorProto.INT64, []),
             helper.make_tensor_value_info(f"{name}_cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info(f"{name}_acc_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(f"{name}_cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info(f"{name}_acc_out", TensorProto.FLOAT, None)])

    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body("body", inner))], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
                     helper.make_tensor("inner_trips", TensorProto.INT64, [], [inner or 1]),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("trips, inner", [(10**12, None), (10**4, 10**4)])
def test_a_loop_of_too_many_iterations_is_refused_before_running(dk, tmp_path, trips, inner):
    model = _loop_model(tmp_path / "loop.onnx", trips, inner)
    code, _, err = dk("bench", model, *FAST, "--no-store")
    assert code == 2 and "more than the 1,000,000 one call may take" in err, err


def test_a_configuration_past_max_time_is_stopped_and_kept_as_a_failed_row(dk, tmp_path):
    model = _loop_model(tmp_path / "loop.onnx", 10**6)  # allowed, but far slower than the limit
    store = tmp_path / "s.sqlite"
    started = time.perf_counter()
    code, _, err = dk("bench", model, *FAST, "--max-time", "3", "--store", store)
    assert time.perf_counter() - started < 60
    assert code == 1 and "stopped at --max-time 3 s" in err, err
    (failure,) = ResultStore(store).run("last").failures
    assert "stopped at --max-time" in failure.error


def test_a_fleet_address_where_nothing_listens_is_refused_at_once(dk):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        started = time.perf_counter()
        for args in (("worker", "list", "--address", f"127.0.0.1:{port}"),
                     ("bench", "--cluster", f"127.0.0.1:{port}", "--profiles", "x")):
            code, _, err = dk(*args)
            assert code == 2 and "nothing answers there" in err, err
    assert time.perf_counter() - started < 30


def test_a_fleet_address_that_answers_but_is_no_cluster_gives_up_at_the_timeout(dk):
    pytest.importorskip("ray")
    with socket.socket() as server:  # accepts connections and says nothing, as a wrong service would
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        started = time.perf_counter()
        code, _, err = dk("worker", "list", "--address", f"127.0.0.1:{port}", "--connect-timeout", "4")
    assert code == 2 and "within 4 s (--connect-timeout)" in err, err
    assert time.perf_counter() - started < 30
    assert "rpc_client" not in err and "gcs_client" not in err  # Ray's retry logs stay out of the terminal


def test_signal_handlers_come_back_after_a_command(dk):
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    dk("models")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_terminated_command_exits_with_the_shells_status(tmp_path):
    import subprocess
    import sys

    script = ("import os, signal, sys; from deploykit.cli import app\n"
              "app.cmd_models = lambda args: os.kill(os.getpid(), signal.SIGTERM) or 0\n"
              "sys.exit(app.main(['models']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 143 and done.stderr.strip() == "deploykit: stopped by SIGTERM", done.stderr


def test_a_full_disk_while_safetensors_writes_is_an_environment_fault(dk, tmp_path, monkeypatch):
    """safetensors reports the file system's refusal as its own error type, not OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = dk("export", "--out", tmp_path / "art", "-q")
    assert code == 1 and "No space left on device" in err and "nothing partial was left behind" in err, err
    assert f"cannot write {str(tmp_path / 'art' / 'weights.safetensors')!r}" in err  # the path the user gave
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec, says", [
    ("x:batch,5", "axis 1 is 5; mm.onnx declares 4"),
    ("x:batch,4,1", "has 3 axes; mm.onnx declares 2"),
    ("x:batch,4:int64:3", "is int64; mm.onnx declares float32"),
])
def test_an_input_spec_that_does_not_fit_the_graph_is_refused(dk, matmul_onnx, spec, says):
    code, _, err = dk("bench", matmul_onnx, *FAST, "--no-store", "--input-spec", spec)
    assert code == 2 and says in err, err


def test_an_input_spec_the_model_cannot_take_is_bad_input(dk, tmp_path):
    code, _, err = dk("export", "--model", "models/examples/small_cnn.py:build", "--input-spec", "x:batch,3,16",
                      "--out", tmp_path / "out")
    assert code == 2 and "does not run on the inputs described (x:batch,3,16:float32)" in err, err


def test_a_graph_computing_a_tensor_too_large_is_refused_before_running(dk, tmp_path):
    """ConstantOfShape to a fixed 10^6 x 10^6 floats: 3.6 TiB, found by shape inference, not by running it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("ReduceSum", ["big"], ["s"]),
         helper.make_node("Add", ["x", "s"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [10**6, 10**6])])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, _, err = dk("bench", path, *FAST, "--no-store")
    assert code == 2 and "the graph computes 'big' of shape [1000000, 1000000]" in err, err
    assert dk("audit", path)[0] == 0  # an audit reads the graph without running it


def test_no_architecture_transformers_ships_is_refused_by_the_size_check():
    """The value check refuses hostile sizes, not real layouts: every config class transformers ships,
    at its defaults (per-stage lists, tables, nulls, DeBERTa's 0 token types), passes."""
    transformers = pytest.importorskip("transformers")
    from deploykit.model.hf import check_config_values

    checked = 0
    for name in dir(transformers):
        # EdgeTAM's vision config asks the Hub for a timm config when built (no network here)
        if not name.endswith("Config") or not name[0].isupper() or name.startswith("EdgeTam"):
            continue
        try:
            values = getattr(transformers, name)().to_dict()
        except Exception:  # noqa: BLE001 - not a model config, or one that needs arguments
            continue
        check_config_values(values, name)
        checked += 1
    assert checked > 300


def test_a_whole_number_written_as_a_float_reads_as_that_integer():
    """Stores written with --processes 2 held the median of two overheads (161.0): still readable."""
    from deploykit.core.validate import RecordError, check

    assert check(161.0, int, "overhead_ns") == 161 and type(check(161.0, int, "overhead_ns")) is int
    with pytest.raises(RecordError, match="must be an integer, got 1.5"):
        check(1.5, int, "overhead_ns")
