"""Hostile and broken inputs, as an attacker or a careless pipeline would bring them.

Every case ends in one clean line on stderr (no traceback), the documented exit code, nothing
written that should not be, nothing of the user's deleted, and no leftovers. The CLI runs in this
process (`main`), so the suite stays fast; the benchmark workers are still real subprocesses.
"""

import errno
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploykit.cli.app import main
from deploykit.core.errors import UntrustedCodeError
from deploykit.model.artifact import MANIFEST_FILE, WEIGHTS_FILE, digest_of
from deploykit.runtime.loading import load_torch_model

FAST = ["--warmup", "0", "--min-time", "0", "--min-iters", "3", "--threads", "1", "--runtime", "onnxruntime"]

TINY_MODEL = textwrap.dedent('''
    import os

    import torch
    from torch import nn

    if os.environ.get("DEPLOYKIT_TEST_MARKER"):  # what an attacker's code would do on import
        open(os.environ["DEPLOYKIT_TEST_MARKER"], "w").write("ran")


    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 8)
''')


@pytest.fixture
def dk(capsys):
    """Run the CLI in this process: (exit code, stdout, stderr). Asserts the one-line, no-traceback rule
    for failures."""

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and "Traceback" not in out
        if code != 0:
            errors = [line for line in err.splitlines() if line.startswith("deploykit: error")
                      or line.startswith("deploykit: internal error")]
            assert len(errors) <= 1, err
        return code, out, err

    return run


@pytest.fixture(scope="module")
def entry_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    (root / "tiny.py").write_text(TINY_MODEL)
    out = root / "art"
    assert _main(["export", "--model", f"{root / 'tiny.py'}:make", "--out", out, "-q"]) == 0
    (root / "tiny.py").unlink()
    return out


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())


def _write_manifest(directory: Path, data: dict) -> None:
    """Write an edited manifest as an attacker who knows the format would: with its own checksum made
    anew, so that the checks behind that one are what the test reaches (an edit that leaves the
    checksum is caught first: tests/test_trust_round_two.py)."""
    (directory / MANIFEST_FILE).write_text(json.dumps({**data, "manifest_sha256": digest_of(data)}))


def _main(args) -> int:
    return main([str(a) for a in args])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. code named by an artifact runs only with consent ------------------------------------------


@pytest.mark.parametrize("how", ["relative", "absolute", "module"])
def test_an_edited_entry_point_is_never_imported_without_consent(dk, entry_artifact, tmp_path, monkeypatch, how):
    art = tmp_path / "art"
    shutil.copytree(entry_artifact, art)
    marker = tmp_path / "marker"
    monkeypatch.setenv("DEPLOYKIT_TEST_MARKER", str(marker))
    (art / "evil.py").write_text(TINY_MODEL)
    shutil.copy(art / "evil.py", tmp_path / "evilmod.py")
    monkeypatch.chdir(art if how == "relative" else tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = {"relative": "evil.py:make", "absolute": f"{art / 'evil.py'}:make", "module": "evilmod:make"}[how]
    data = _manifest(art)
    data["source"]["entry_point"] = entry
    _write_manifest(art, data)
    code, out, err = dk("bench", art, *FAST[:-2], "--runtime", "torch,onnxruntime", "--no-store")
    assert code == 0, err
    assert not marker.exists()
    assert "warning: torch skipped:" in err and "--trust-code" in err
    assert "onnxruntime" in out and "torch " not in out.split("\n", 2)[-1]
    with pytest.raises(UntrustedCodeError):  # the library refuses as well
        load_torch_model(art)
    assert not marker.exists()


@pytest.fixture
def hijacked(entry_artifact, tmp_path, monkeypatch):
    """(artifact whose manifest names an attacker's file beside it, the marker that file writes on import)."""
    art = tmp_path / "art"
    shutil.copytree(entry_artifact, art)
    marker = tmp_path / "marker"
    monkeypatch.setenv("DEPLOYKIT_TEST_MARKER", str(marker))
    (art / "evil.py").write_text(TINY_MODEL)
    data = _manifest(art)
    data["source"]["entry_point"] = f"{art / 'evil.py'}:make"
    for bundled in ("code", "from"):  # a manifest naming a file by path, as --no-bundle-code writes it
        data["source"].pop(bundled, None)
    _write_manifest(art, data)
    return art, marker


def test_trust_code_is_consent_and_says_so(dk, hijacked):
    art, marker = hijacked
    code, out, err = dk("bench", art, *FAST[:-2], "--runtime", "torch", "--no-store", "--trust-code")
    assert code == 0, err
    assert "warning: --trust-code: code named by artifacts will be imported and run" in err
    assert marker.read_text() == "ran"


def test_an_entry_point_given_with_model_is_consent_for_its_own_artifacts(dk, tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    marker = tmp_path / "marker"
    monkeypatch.setenv("DEPLOYKIT_TEST_MARKER", str(marker))
    code, out, err = dk("bench", "--model", f"{tmp_path / 'tiny.py'}:make", "--prune", "magnitude:0.5", "--form",
                        "dense", *FAST[:-2], "--runtime", "torch", "--no-store")
    assert code == 0, err
    assert "torch skipped" not in err and marker.exists()
    assert any(line.split()[3] == "torch" for line in out.splitlines() if line.startswith("tiny.py:make"))


def test_audit_of_an_edited_entry_point_imports_nothing(dk, hijacked):
    art, marker = hijacked
    code, _, err = dk("audit", art)
    assert code == 0, err
    assert not marker.exists()


# -- 2. paths named by data stay inside their root ------------------------------------------------


@pytest.mark.parametrize("key, value, reason", [
    ("config", "../../etc/passwd", "climbs out with '..'"),
    ("config", "/etc/passwd", "is absolute"),
    ("config", "link/passwd", "resolves outside it through a symbolic link"),
    ("stats", "../secret.npz", "climbs out with '..'"),
])
def test_manifest_source_paths_stay_inside_the_artifact(dk, copy, tmp_path, key, value, reason):
    art = copy()
    (tmp_path / "secret.npz").write_text("secret")
    (art / "link").symlink_to("/etc")
    data = _manifest(art)
    data["source"] = {"kind": "espnet-experiment", key: value}
    _write_manifest(art, data)
    code, _, err = dk("audit", art, "--no-verify")
    assert code == 2
    assert f"source: {key} = {value!r} {reason}" in err


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "sub/../../x"])
def test_manifest_file_names_stay_inside_the_artifact(dk, copy, name):
    art = copy()
    data = _manifest(art)
    data["files"][name] = 10
    data["checksums"][name] = "0" * 64
    _write_manifest(art, data)
    code, _, err = dk("audit", art)
    assert code == 2 and f"manifest files[{name!r}]" in err and "refused" in err


def _experiment(tmp_path, config_changes, files=None):
    """An ESPnet experiment directory whose config is changed as given (no weights needed: the
    paths are checked before anything is built)."""
    import yaml

    from deploykit.model.zoo.espnet_st import _config

    root = tmp_path / "exp"
    root.mkdir()
    config = {**_config("st_small"), **config_changes}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "model.pth").write_bytes(b"")
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return root


@pytest.mark.parametrize("changes, named", [
    ({"token_list": "../tokens.txt"}, "token_list = '../tokens.txt' climbs out with '..'"),
    ({"token_list": "../../../etc/passwd"}, "token_list = '../../../etc/passwd' climbs out"),
    ({"token_list": "/etc/passwd"}, "token_list = '/etc/passwd' is absolute"),
    ({"src_token_list": "../tokens.txt"}, "src_token_list = '../tokens.txt'"),
    ({"normalize": "global_mvn", "normalize_conf": {"stats_file": "../tokens.txt"}},
     "normalize_conf.stats_file = '../tokens.txt'"),
    ({"some_future_key": {"nested": ["ok", "../tokens.txt"]}}, "some_future_key.nested[1] = '../tokens.txt'"),
    ({"token_list": "link/tokens.txt"}, "token_list = 'link/tokens.txt' resolves outside it through a symbolic link"),
])
def test_espnet_config_paths_stay_inside_the_experiment(dk, tmp_path, changes, named):
    root = _experiment(tmp_path, changes, {"tokens.txt": "<blank>\nsecret\n"})
    (root / "link").symlink_to(tmp_path)
    code, _, err = dk("export", "--model", root, "--out", tmp_path / "out")
    assert code == 2, err
    assert named in err and "refused" in err
    assert not (tmp_path / "out").exists()


def test_espnet_zip_entries_stay_inside(dk, tmp_path):
    import zipfile

    archive = tmp_path / "exp.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    code, _, err = dk("export", "--model", archive, "--out", tmp_path / "out")
    assert code == 2 and "escapes the extraction directory" in err
    assert not (tmp_path.parent / "escape.txt").exists()


# -- 3. deploykit deletes only what it wrote; outputs never replace special files -----------------


def _users_directory(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return d


@pytest.mark.parametrize("target, reason", [
    ("users", "it is not a deploykit artifact"),
    ("cwd", "the working directory"),
    ("home", "the home directory"),
    ("above-cwd", "above the working directory"),
    ("file", "it is a file"),
    ("symlink", "it is a symbolic link"),
    ("fifo", "it is a FIFO"),
    ("artifact+extra", "it holds files its manifest does not list (notes.txt)"),
    ("root", "the root directory"),
])
def test_overwrite_refuses_what_deploykit_did_not_write(dk, copy, tmp_path, monkeypatch, target, reason):
    users = _users_directory(tmp_path)
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(users if target == "home" else tmp_path / "elsewhere"))
    paths = {"users": users, "cwd": Path("."), "home": users, "above-cwd": tmp_path / "work"}
    if target == "file":
        paths[target] = users / "thesis.tex"
    elif target == "symlink":
        paths[target] = tmp_path / "link"
        paths[target].symlink_to(copy())
    elif target == "fifo":
        paths[target] = tmp_path / "pipe"
        os.mkfifo(paths[target])
    elif target == "artifact+extra":
        paths[target] = copy("extra")
        (paths[target] / "notes.txt").write_text("mine")
    elif target == "root":
        paths[target] = Path("/")
    before = {p: sorted(os.listdir(p)) for p in (users, tmp_path)}
    code, _, err = dk("export", "--out", paths[target], "--overwrite", "-q")
    assert code == 2, err
    assert "--overwrite refuses" in err and reason in err
    assert {p: sorted(os.listdir(p)) for p in (users, tmp_path)} == before
    assert (users / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_mount_point(dk):
    mounts = [m for m in ("/dev/shm", "/proc", "/sys", "/dev") if os.path.ismount(m)]
    if not mounts:
        pytest.skip("no mount point to try")
    code, _, err = dk("export", "--out", mounts[0], "--overwrite", "-q")
    assert code == 2 and "--overwrite refuses" in err


def test_overwrite_replaces_an_artifact_and_says_so(dk, copy):
    art = copy()
    code, _, err = dk("export", "--out", art, "--overwrite", "--prune", "magnitude:0.9")
    assert code == 0, err
    assert "replacing the artifact that was there" in err
    assert _manifest(art)["plan"]["amount"] == 0.9
    assert _listing(art.parent) == {"a"}


def _special(tmp_path, kind):
    if kind == "device":
        return Path("/dev/full")
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return path
    if kind == "socket":
        path = tmp_path / "sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        return path
    if kind == "symlink":
        target = tmp_path / "target.txt"
        target.write_text("keep")
        path = tmp_path / "link"
        path.symlink_to(target)
        return path
    if kind == "directory":
        path = tmp_path / "dir"
        path.mkdir()
        return path
    return tmp_path / "missing" / "out.txt"


OUTPUTS = {
    "report --out": lambda art, out: ["report", "--store", art.parent / "s.sqlite", "--list", "--out", out],
    "bench --json": lambda art, out: ["bench", art, *FAST, "--no-store", f"--json={out}"],
    "audit --json": lambda art, out: ["audit", art, f"--json={out}"],
    "profile detect --save": lambda art, out: ["profile", "detect", "--save", out],
}


@pytest.mark.parametrize("kind, says", [
    ("device", "it is a character device"), ("fifo", "it is a FIFO"), ("socket", "it is a socket"),
    ("symlink", "it is a symbolic link"), ("directory", "is a directory"), ("missing", "does not exist"),
])
@pytest.mark.parametrize("command", list(OUTPUTS))
def test_outputs_never_replace_special_files(dk, copy, tmp_path, kind, says, command):
    art = copy()
    if command == "report --out":
        assert dk("bench", art, *FAST, "--store", art.parent / "s.sqlite")[0] == 0
    out = _special(tmp_path, kind)
    before = _listing(tmp_path)
    stat_before = os.lstat(out) if os.path.lexists(out) else None
    code, _, err = dk(*OUTPUTS[command](art, out))
    assert code == 2, err
    assert says in err
    assert _listing(tmp_path) == before
    if stat_before is not None:
        after = os.lstat(out)
        assert (after.st_mode, after.st_ino) == (stat_before.st_mode, stat_before.st_ino)
    if kind == "symlink":
        assert (tmp_path / "target.txt").read_text() == "keep"


def test_export_out_into_a_missing_directory(dk, tmp_path):
    code, _, err = dk("export", "--out", tmp_path / "no" / "art")
    assert code == 2 and "does not exist" in err
    assert _listing(tmp_path) == set()


def test_report_out_replaces_a_regular_file_and_says_so(dk, copy, tmp_path):
    art = copy()
    assert dk("bench", art, *FAST, "--store", tmp_path / "s.sqlite")[0] == 0
    out = tmp_path / "report.md"
    out.write_text("old")
    code, _, err = dk("report", "--store", tmp_path / "s.sqlite", "--format", "markdown", "--out", out)
    assert code == 0 and "replacing a file of 3 bytes" in err
    assert out.read_text().startswith("# run 1")


def test_disk_full_while_writing_weights_leaves_nothing(dk, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = dk("export", "--out", tmp_path / "art", "-q")
    assert code == 1
    assert err.strip().endswith("No space left on device (nothing partial was left behind)")
    assert _listing(tmp_path) == set()


def test_disk_full_while_writing_a_report_leaves_nothing(dk, copy, tmp_path, monkeypatch):
    art = copy()
    assert dk("bench", art, *FAST, "--store", tmp_path / "s.sqlite")[0] == 0
    before = _listing(tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    code, _, err = dk("report", "--store", tmp_path / "s.sqlite", "--out", tmp_path / "r.txt")
    assert code == 1 and "No space left on device" in err
    assert _listing(tmp_path) == before


# -- 4. integrity: files are checked against the manifest, counts come from the files -------------


def _flip_exponents(path: Path, count: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    start = 8 + header
    for i in range(count):
        data[start + 4 * i + 3] ^= 0x7F  # the exponent's high bits of a little-endian float32
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, says", [
    (_flip_exponents, WEIGHTS_FILE, "weights.safetensors does not match its recorded SHA-256"),
    (_flip_middle, "model.onnx", "model.onnx does not match its recorded SHA-256"),
    (_truncate, "model.onnx", "model.onnx is "),
    (_truncate, WEIGHTS_FILE, "weights.safetensors is "),
    (lambda p: p.unlink(), "model.onnx", "model.onnx is missing"),
    (lambda p: p.write_text("not a weights file"), WEIGHTS_FILE, "weights.safetensors is 18 bytes"),
])
@pytest.mark.parametrize("command", ["bench", "audit"])
def test_damaged_files_are_caught_before_use(dk, copy, damage, file, says, command):
    art = copy()
    damage(art / file)
    args = ["bench", art, *FAST, "--no-store"] if command == "bench" else ["audit", art]
    code, out, err = dk(*args)
    assert code == 2, err
    assert says in err
    assert out == ""


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["files"].update({WEIGHTS_FILE: 1}), "weights.safetensors is "),
    (lambda m: m["checksums"].update({"model.onnx": "0" * 64}), "model.onnx does not match"),
    (lambda m: m.pop("checksums"), "records no checksums"),
    (lambda m: m["checksums"].pop("model.onnx"), "'model.onnx' without a size and checksum"),
    (lambda m: m.update(files=["model.onnx"]), "field 'files' is list, not dict"),
    (lambda m: m.update(nonzero_parameters="many"), "field 'nonzero_parameters' is str, not int"),
    (lambda m: m.update(format_version=99), "unsupported format_version 99"),
    (lambda m: m.update(plan={"method": 5}), "unknown pruning method"),
    (lambda m: m.update(plan={"method": "magnitude", "amount": "lots"}), "pruning plan is malformed"),
    (lambda m: m.update(inputs=[{"name": "bow", "shape": ["batch", 5000], "dtype": "complex"}]), "inputs"),
    (lambda m: m.update(files={WEIGHTS_FILE: -5}), "is not a size in bytes"),
    (lambda m: m.update(parameter_names=["no.such.weight"]), "'no.such.weight', which weights.safetensors"),
    # a manifest written before parameter_names: its per-parameter rows name them
    (lambda m: m.update(parameter_names=[], sparsity=[{"name": "no.such.weight"}]),
     "'no.such.weight', which weights.safetensors"),
])
def test_edited_manifests_are_refused_in_one_line(dk, copy, edit, says):
    art = copy()
    data = _manifest(art)
    edit(data)
    _write_manifest(art, data)
    code, out, err = dk("bench", art, *FAST, "--no-store")
    assert code == 2, err
    assert says in err


def test_a_manifest_that_is_not_json(dk, copy):
    art = copy()
    (art / MANIFEST_FILE).write_text("{" * 100_000)
    code, _, err = dk("audit", art)
    assert code == 2 and "cannot read manifest" in err


def test_bench_counts_nonzeros_and_sizes_itself(dk, copy, tmp_path):
    art = copy()
    data = _manifest(art)
    truth = data["nonzero_parameters"]
    data.update(nonzero_parameters=14_000, parameters=15_000)
    _write_manifest(art, data)
    code, _, err = dk("bench", art, *FAST, "--no-store", "--json", tmp_path / "r.json")
    assert code == 0, err
    (record,) = json.loads((tmp_path / "r.json").read_text())["records"]
    assert record["nonzero_parameters"] == truth and record["parameters"] == 1_412_354
    assert record["disk_bytes"] == (art / "model.onnx").stat().st_size
    code, out, _ = dk("audit", art, "--json")
    assert json.loads(out)["nonzero_parameters"] == truth


def test_no_verify_is_loud(dk, copy):
    art = copy()
    _flip_middle(art / "model.onnx")
    code, _, err = dk("audit", art, "--no-verify")
    assert "warning: --no-verify" in err


# -- 5. no measured row is lost -------------------------------------------------------------------


def test_a_locked_store_spills_the_run_to_json_and_import_puts_it_back(dk, copy, tmp_path):
    art = copy()
    store = tmp_path / "s.sqlite"
    assert dk("bench", art, *FAST, "--store", store)[0] == 0
    holder = sqlite3.connect(store, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, out, err = dk("bench", art, *FAST, "--store", store, "--store-timeout", "0.05")
    finally:
        holder.rollback()
        holder.close()
    assert code == 0, err
    assert "stayed locked by another process" in err and "report --import" in err
    assert "p50" in out  # the table is still printed
    (spilled,) = tmp_path.glob("s.sqlite.unsaved-*.json")
    code, out, _ = dk("report", "--store", store, "--import", spilled)
    assert code == 0 and "imported into" in out and "as run 2" in out
    code, out, _ = dk("report", "--store", store, "--import", spilled)
    assert code == 0 and "is already in" in out
    code, out, _ = dk("report", "--store", store, "--list", "--format", "json")
    assert [run["id"] for run in json.loads(out)] == [1, 2]


def _damage_store(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    data[page:page * 2] = b"\xde\xad\xbe\xef" * (page // 4)
    path.write_bytes(bytes(data))


def test_a_damaged_store_is_refused_and_never_written(dk, copy, tmp_path):
    art = copy()
    store = tmp_path / "s.sqlite"
    assert dk("bench", art, *FAST, "--store", store)[0] == 0
    with sqlite3.connect(store) as db:  # fold the WAL into the file, so the damage is in the pages read
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _damage_store(store)
    damaged = store.read_bytes()
    code, out, err = dk("bench", art, *FAST, "--store", store)
    assert code == 2 and "results store" in err and out == ""
    assert store.read_bytes() == damaged
    code, _, err = dk("report", "--store", store)
    assert code == 2 and "results store" in err


@pytest.mark.parametrize("make, says", [
    (lambda p: p.mkdir(), "is not a regular file"),
    (lambda p: sqlite3.connect(p).execute("CREATE TABLE other (x)").connection.commit(), "is not a deploykit results store"),
    (lambda p: p.write_bytes(b"garbage" * 1000), "cannot open results store"),
])
def test_stores_that_are_not_ours(dk, copy, tmp_path, make, says):
    store = tmp_path / "s.sqlite"
    make(store)
    code, _, err = dk("bench", copy(), *FAST, "--store", store)
    assert code == 2 and says in err


def test_a_version_1_store_migrates_forward(tmp_path):
    from deploykit.results.store import SCHEMA, ResultStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO runs (started_utc, finished_utc, status, command, profile, conditions) "
                   "VALUES ('t', 't', 'complete', 'deploykit bench', 'p', '{}')")
    store = ResultStore(path)
    assert [run.id for run in store.runs()] == [1] and store.run("1").failures == ()
    store.save_run([], started_utc="t", status="complete", command="c", profile="p", conditions={})
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert [run.id for run in store.runs()] == [1, 2] and store.runs()[1].uid


def test_a_failing_configuration_keeps_the_others(dk, copy, tmp_path, monkeypatch):
    from deploykit.bench import runner as bench
    from deploykit.core.errors import MeasurementError

    real, calls = bench.run_interleaved, []

    def flaky(jobs, *args, **kwargs):  # the worker of the second shape's configuration dies
        calls.append(1)
        outcomes = real(jobs, *args, **kwargs)
        return [MeasurementError("onnxruntime worker (CPUExecutionProvider) failed: killed")] if len(calls) == 2 else outcomes

    monkeypatch.setattr(bench, "run_interleaved", flaky)
    store = tmp_path / "s.sqlite"
    code, out, err = dk("bench", copy(), *FAST, "--batch", "1,2,3", "--store", store)
    assert code == 1
    assert "failed: mlp-sst2 magnitude:0.5 form=dense runtime=onnxruntime batch=2 threads=1: onnxruntime worker" in err
    assert len([line for line in out.splitlines() if line.startswith("mlp-sst2")]) == 2
    code, out, _ = dk("report", "--store", store)
    assert "run 1 (failed)" in out and "failed: mlp-sst2" in out


# -- 6. values that hang or poison results are refused up front -----------------------------------


@pytest.mark.parametrize("args, says", [
    (["--warmup", "nan"], "--warmup must be a finite number of seconds"),
    (["--warmup", "inf"], "--warmup must be a finite number of seconds"),
    (["--min-time", "inf"], "--min-time must be a finite number of seconds"),
    (["--min-time", "nan"], "--min-time must be a finite number of seconds"),
    (["--min-time", "-1"], "--min-time must be a finite number of seconds"),
    (["--min-iters", "0"], "need 1 <= --min-iters"),
    (["--min-iters", "100000000000"], "need 1 <= --min-iters"),
    (["--threads", "100000"], "(4 per logical core here)"),
    (["--batch", "1000000"], "GiB for its inputs alone"),
    (["--store-timeout", "nan"], "--store-timeout must be a finite number"),
])
def test_bench_values_are_validated(dk, copy, args, says):
    base = ["--warmup", "0", "--min-time", "0", "--min-iters", "3", "--runtime", "onnxruntime"]
    art = copy()
    code, out, err = dk("bench", art, *base, *args, "--store", art.parent / "s.sqlite")
    assert code == 2, err
    assert says in err and out == ""
    assert not (art.parent / "s.sqlite").exists()  # refused before the store is even created


def test_a_huge_batch_of_a_model_is_refused_before_export(dk, tmp_path):
    code, _, err = dk("bench", "--model", "mlp-sst2", "--batch", "1000000", "--no-store")
    assert code == 2 and "mlp-sst2 at batch 1000000 needs" in err and "GiB" in err


@pytest.mark.parametrize("plan, says", [
    ('seed = "x"', "seed must be a integer, got 'x'"),
    ('sparsity = "lots"', "sparsity must be a number, got 'lots'"),
    ('at_init = "no"', "at_init must be a boolean, got 'no'"),
    ("exclude_output = 1", "exclude_output must be a boolean, got 1"),
    ("rounds = true", "rounds must be a integer, got True"),
    ("sparsity = nan", "sparsity must be a number, got nan"),
    ('layer_types = "linear"', "layer_types must be a list of strings"),
    ("method = 3", "method must be a string, got 3"),
    ('[rules]\n"mlp.0" = "half"', "rules must be a table of numbers"),
    ("seed = -1", "seed must be an integer in [0, 2^63)"),
    ("rounds = 100000", "rounds must be an integer in [1, 1000]"),
])
def test_plan_values_are_type_checked_naming_key_and_line(dk, tmp_path, plan, says):
    path = tmp_path / "plan.toml"
    path.write_text('method = "magnitude"\n' + plan + "\n" if not plan.startswith("method") else plan + "\n")
    code, _, err = dk("export", "--plan", path, "--out", tmp_path / "out")
    assert code == 2, err
    assert says in err
    if " must be a " in says:
        assert ", line " in err
    assert _listing(tmp_path) == {"plan.toml"}


def _onnx_with(tmp_path, mutate):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    mutate(model, path)
    if not path.exists():
        onnx.save(model, str(path))
    return path


def _external(offset, length):
    def mutate(model, path):
        from onnx import TensorProto

        (path.parent / "m.data").write_bytes(b"\0" * 64)
        w = model.graph.initializer[0]
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "m.data"), ("offset", offset), ("length", length)):
            entry = w.external_data.add()
            entry.key, entry.value = key, value

    return mutate


def _huge_dims(model, path):
    w = model.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([10**6, 10**6])


def _bad_op(model, path):
    model.graph.node[0].op_type = "NoSuchOperator"


def _huge_input(model, path):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = 10**12  # a fixed first axis: every batch is 10^12 rows


@pytest.mark.parametrize("mutate, says", [
    (_external("0", "1000"), "impossible (truncated or crafted)"),
    (_external("60", "64"), "impossible (truncated or crafted)"),
    (_external("-8", "64"), "impossible (truncated or crafted)"),
    (_external("x", "64"), "non-numeric external offset or length"),
    (_huge_dims, "declares shape [1000000, 1000000]"),
    (_bad_op, "is not a valid ONNX graph"),
    (lambda m, p: p.write_bytes(b"\x08\x07garbage" * 50), "is not a readable ONNX model"),
    # every batch is 10^12 rows: the graph's own shapes say so before the inputs are made
    (_huge_input, "the graph computes 'y' of shape [1000000000000, 4]"),
])
@pytest.mark.parametrize("command", ["bench", "audit"])
def test_impossible_onnx_files_are_refused_before_allocation(dk, tmp_path, mutate, says, command):
    path = _onnx_with(tmp_path, mutate)
    args = ["bench", path, *FAST, "--no-store"] if command == "bench" else ["audit", path]
    code, out, err = dk(*args)
    if command == "audit" and mutate is _huge_input:  # audit reads no inputs: nothing impossible for it
        assert code == 0
        return
    assert code == 2, err
    assert says in err


# -- 7. leftovers of killed runs are cleaned or reported ------------------------------------------


def test_partial_directories_of_killed_runs_are_removed_by_the_next_export(dk, tmp_path):
    import psutil

    dead, alive = _dead_pid(), os.getppid()  # the parent of this test process is running, and older
    stale = tmp_path / f".art.{dead}.abcd1234.partial"
    live = tmp_path / f".art.{alive}.abcd1234.partial"
    old = tmp_path / f".other.{dead}.efgh5678.old"
    legacy = tmp_path / ".art.zz9_ab12.partial"
    for path in (stale, live, old, legacy):
        path.mkdir()
        (path / "weights.safetensors").write_text("half")
        os.utime(path, (0, 0))
    written = psutil.Process(alive).create_time() + 0.5  # after its writer started, before this run
    os.utime(live, (written, written))
    code, _, err = dk("export", "--out", tmp_path / "art")
    assert code == 0, err
    assert not stale.exists() and not old.exists()
    assert live.exists() and legacy.exists()
    assert f"removed {stale.name}" in err and "looks like the leftover of a killed deploykit run" in err


def test_scratch_directories_of_killed_benches_are_removed(dk, copy):
    import tempfile

    dead = _dead_pid()
    stale = Path(tempfile.gettempdir()) / f"deploykit-bench-{dead}-test1234"
    stale.mkdir()
    os.utime(stale, (0, 0))
    code, _, err = dk("bench", copy(), *FAST, "--no-store")
    assert code == 0, err
    assert not stale.exists()


def test_partial_files_of_killed_reports_are_removed(dk, copy, tmp_path):
    art = copy()
    assert dk("bench", art, *FAST, "--store", tmp_path / "s.sqlite")[0] == 0
    stale = tmp_path / f".r.txt.{_dead_pid()}.x1y2z3.partial"
    stale.write_text("half")
    os.utime(stale, (0, 0))
    code, _, _ = dk("report", "--store", tmp_path / "s.sqlite", "--out", tmp_path / "r.txt")
    assert code == 0 and not stale.exists()


# -- 8. no traceback: crashes of old, and internal faults -----------------------------------------


def test_export_with_several_sparsities_is_one_line(dk, tmp_path):
    code, _, err = dk("export", "--prune", "magnitude:0.5,0.9", "--out", tmp_path / "o")
    assert code == 2 and "give one sparsity, not 2" in err


def test_bench_json_onto_a_directory_is_refused_before_running_and_a_dir_after_json_is_benched(dk, copy):
    art = copy()
    code, out, err = dk("bench", f"--json={art}", "--no-store")
    assert code == 2 and "--json" in err and "is a directory" in err and out == ""
    code, out, err = dk("bench", "--json", art, "--no-store", *FAST)  # the DIR is not swallowed as a PATH
    assert code == 0 and json.loads(out)["records"], err


def test_an_internal_fault_is_one_line_and_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    from deploykit.cli import app as cli

    def boom(args):
        raise RuntimeError("something deploykit did not expect")

    monkeypatch.setattr(cli, "cmd_models", boom)
    assert _main(["models"]) == 1
    err = capsys.readouterr().err
    assert err == ("deploykit: internal error: RuntimeError: something deploykit did not expect (a bug in deploykit; "
                   "rerun with --debug for the traceback)\n")
    assert _main(["models", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
