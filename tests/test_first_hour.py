"""The first hour of a new user: artifacts that travel with their code, consent recorded once, quiet
and precise output, and figures that agree between commands."""

import json
import shutil
import textwrap

import pytest

from deploykit.cli import main
from deploykit.cli.app import build_parser
from deploykit.model.artifact import MANIFEST_FILE, read_manifest, verify_artifact
from deploykit.model.trust import read_trusted

FAST = ["--warmup", "0", "--min-time", "0", "--min-iters", "3", "--threads", "1", "--timing-rounds", "2",
        "--no-store"]


@pytest.fixture
def dk(capsys):
    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CONFIG", str(tmp_path / "config"))
    return tmp_path / "config"


@pytest.fixture
def project(tmp_path):
    """A user's model file that imports a module beside it."""
    root = tmp_path / "project"
    (root / "parts").mkdir(parents=True)
    (root / "parts" / "__init__.py").write_text("")
    (root / "parts" / "block.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(24, 48)

            def forward(self, x):
                return torch.relu(self.fc(x))
    """))
    (root / "net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from parts.block import Block

        def build():
            return nn.Sequential(Block(), nn.Linear(48, 3)), torch.randn(2, 24)
    """))
    return root


def test_every_help_ends_with_the_exit_codes():
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        assert p.format_help().rstrip().endswith("Docs: docs/commands.md"), p.prog
        assert "2 bad input" in p.format_help()
        stack += [c for a in p._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
                  for c in a.choices.values()]


def test_a_file_entry_point_travels_with_its_code_and_runs_once_trusted(dk, project, tmp_path, config):
    art = tmp_path / "art"
    code, _, err = dk("export", "--model", project / "net.py:build", "--prune", "magnitude:0.5", "--out", art,
                      "-q", "--no-measure")
    assert code == 0, err
    source = read_manifest(art).source
    assert source["entry_point"] == "code/net.py:build" and source["from"] == f"{project / 'net.py'}:build"
    assert sorted(source["code"]["files"]) == ["code/net.py", "code/parts/__init__.py", "code/parts/block.py"]
    assert (art / "code" / "parts" / "block.py").read_text() == (project / "parts" / "block.py").read_text()
    # the copy runs with the project gone: nothing points back to it
    moved = tmp_path / "elsewhere" / "art"
    moved.parent.mkdir()
    shutil.copytree(art, moved)
    shutil.rmtree(project)
    verify_artifact(moved, read_manifest(moved))
    code, out, err = dk("bench", moved, *FAST, "--json")
    assert code == 0 and {r["runtime"] for r in json.loads(out)["records"]} == {"onnxruntime"}
    assert "warning: torch skipped" in err and f"deploykit trust {moved}" in err
    code, out, _ = dk("trust", moved)
    assert code == 0 and out.startswith("trusted: net.py:build")
    assert [e.sha256 for e in read_trusted()] == [source["code"]["sha256"]]
    assert dk("trust", moved)[1].startswith("already trusted")
    code, out, err = dk("bench", moved, *FAST, "--json")
    assert code == 0 and {r["runtime"] for r in json.loads(out)["records"]} == {"torch", "onnxruntime"}, err
    # edited code is other code: consent does not follow it (and the artifact no longer verifies)
    (moved / "code" / "parts" / "block.py").write_text("raise SystemExit('ran')\n")
    code, _, err = dk("bench", moved, *FAST, "--no-verify")
    assert code == 0 and "warning: torch skipped" in err
    code, out, _ = dk("trust", "--revoke", source["code"]["sha256"][:10])
    assert code == 0 and out.startswith("revoked: net.py:build") and read_trusted() == []


def test_no_bundle_code_records_the_file_where_it_is(dk, project, tmp_path, config):
    art = tmp_path / "art"
    assert dk("export", "--model", project / "net.py:build", "--out", art, "-q", "--no-measure",
              "--no-bundle-code")[0] == 0
    source = read_manifest(art).source
    assert source == {"kind": "entry-point", "entry_point": f"{project / 'net.py'}:build", "inputs": None}
    assert not (art / "code").exists()
    code, _, err = dk("trust", art)
    assert code == 2 and "names its code" in err and "--bundle-code" in err


@pytest.mark.parametrize("make, says", [
    (lambda tmp, art: tmp, "manifest.json"),                                  # not an artifact
    (lambda tmp, art: art, "runs no code of its own"),                        # a zoo model's artifact
])
def test_trust_refuses_what_has_no_code_to_trust(dk, artifact, tmp_path, config, make, says):
    code, out, err = dk("trust", make(tmp_path, artifact))
    assert code == 2 and says in err and out == ""
    assert not config.exists()  # nothing written


def test_trust_options_are_one_at_a_time_and_a_damaged_trust_file_is_refused(dk, artifact, config):
    assert dk("trust")[0] == 2
    assert dk("trust", artifact, "--list")[0] == 2
    code, _, err = dk("trust", "--revoke", "xyz")
    assert code == 2 and "8 hex digits" in err
    config.mkdir()
    (config / "trusted-code.json").write_text('{"schema": "deploykit.trust/1", "trusted": [{"sha256": "x"}]}')
    code, _, err = dk("trust", "--list")
    assert code == 2 and "is not one deploykit wrote" in err


def test_quiet_export_prints_the_result_lines_and_layers_add_the_tensor_table(dk, tmp_path):
    code, out, err = dk("export", "--model", "lenet-300-100", "--prune", "magnitude:0.5", "--out", tmp_path / "a",
                        "-q", "--no-measure")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("lenet-300-100: magnitude:0.5 (global), form dense -> ")
    assert [line.split()[0] for line in lines[1:]] == ["parameters", "accuracy", "parity:"]
    assert "trained model before pruning" in lines[2]
    code, out, _ = dk("export", "--model", "lenet-300-100", "--out", tmp_path / "b", "--layers", "--no-measure")
    assert code == 0 and any(line.startswith("fc1.weight") for line in out.splitlines())
    assert "accuracy of the model: " in out and "pruned" not in out.split("accuracy of the model")[0][-30:]
    code, out, _ = dk("export", "--model", "lenet-300-100", "--out", tmp_path / "c", "--no-measure")
    assert code == 0 and not any(line.startswith("fc1.weight") for line in out.splitlines())


def test_audit_counts_parameters_as_export_does_with_buffers_apart(dk, tmp_path):
    art = tmp_path / "r"
    assert dk("export", "--model", "resnet18", "--out", art, "-q", "--no-measure")[0] == 0
    manifest = read_manifest(art)
    code, out, _ = dk("audit", art, "--json")
    audit = json.loads(out)
    assert code == 0 and audit["parameters"] == manifest.parameters == 11_173_962
    buffers = [r for r in audit["rows"] if r["buffer"]]
    assert buffers and all("running_" in r["parameter"] or "num_batches" in r["parameter"] for r in buffers)
    assert audit["buffer_elements"] == sum(r["numel"] for r in buffers)
    code, out, _ = dk("audit", art)
    assert f"parameters {manifest.parameters:,} (nonzero" in out and "buffers" in out
    assert "layer1.0.bn1.running_mean (buffer)" in out  # the table, by default without a budget
    code, out, _ = dk("audit", art, "-q")
    assert len(out.strip().splitlines()) == 1  # quiet: the totals line alone


def test_noisy_and_slower_row_warnings_name_the_whole_configuration():
    from deploykit.results.report import row_label

    class R:
        model, prune, form_label, runtime, stage = "m", "magnitude:0.5", "csr", "torch", "forward"
        batch_size, threads, sequence_length = 8, 1, 64

    assert row_label(R()) == "m magnitude:0.5 csr torch batch 8 1 thread length 64"


def test_report_takes_json_like_the_other_commands(dk, tmp_path):
    store = tmp_path / "s.sqlite"
    assert dk("bench", "--prune", "magnitude:0.5", "--form", "dense", "--runtime", "onnxruntime",
              *FAST[:-1], "--store", store, "-q")[0] == 0
    code, out, _ = dk("report", "--store", store, "--json")
    run = json.loads(out)
    assert code == 0 and run["schema"] == "deploykit.bench/2" and len(run["records"]) == 2
    code, out, _ = dk("report", "--store", store, "--json", tmp_path / "r.json")
    assert code == 0 and json.loads((tmp_path / "r.json").read_text()) == run and "p50 ms" in out
    code, out, _ = dk("report", "--store", store, "--pick", "--json")
    assert code == 0 and json.loads(out)["choices"][0]["chosen"]["runtime"] == "onnxruntime"
    code, out, _ = dk("report", "--store", store, "--list", "--json")
    assert code == 0 and len(json.loads(out)) == 1
    code, _, err = dk("report", "--store", store, "--json", "--format", "csv")
    assert code == 2 and "--json=PATH" in err
    assert not (tmp_path / MANIFEST_FILE).exists()


@pytest.mark.parametrize("files, says", [
    ({"code/../../x.py": "0" * 64}, "climbs out"),
    ({"elsewhere.py": "0" * 64}, "source code record is malformed"),
    ([], "source code record is malformed"),
])
def test_a_bundled_code_record_naming_files_outside_the_artifact_is_refused(project, tmp_path, files, says):
    from deploykit.core.errors import ArtifactError
    from deploykit.model.entrypoint import bundled_code_digest

    with pytest.raises(ArtifactError, match=says):
        bundled_code_digest(tmp_path, {"code": {"files": files, "sha256": "0" * 64}})
