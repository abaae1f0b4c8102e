import json

import pytest

from deploykit.core.errors import UsageError
from deploykit.export.build import export_artifact
from deploykit.prune.base import PruningPlan
from deploykit.results.audit import audit_artifact, load_budgets


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("audit") / "mlp"
    export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.9"), "csr", directory)
    return directory


def test_audit_reads_the_artifact_itself(artifact):
    report = audit_artifact(artifact)
    rows = {r.parameter: r for r in report.rows}
    assert list(rows) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "mlp.4.bias", "mlp.4.weight",
                          "mlp.6.weight", "mlp.6.bias"]
    assert rows["mlp.0.weight"].shape == [256, 5000] and rows["mlp.0.weight"].storage == "csr"
    assert rows["mlp.6.weight"].sparsity == 0 and rows["mlp.6.weight"].storage == "dense"
    assert rows["mlp.6.weight"].stored_bytes == 2 * 256 * 4
    assert report.parameters == 1_412_354
    assert report.nonzero_parameters == sum(r.nonzero for r in report.rows) < 0.11 * 1_412_354
    header = report.weights_bytes - sum(r.stored_bytes for r in report.rows)
    assert 0 < header < 4096  # everything else in the file is the safetensors header


def _budget(tmp_path, text):
    path = tmp_path / "budgets.toml"
    path.write_text(text)
    return str(path)


def test_exit_codes_follow_the_verdict(cli, artifact, tmp_path):
    within = _budget(tmp_path, '["mlp-sst2"]\nmax_disk_mb = 2.0\nmax_parameters = 1_500_000\n')
    result = cli("audit", str(artifact), "--budget", within)
    assert result.returncode == 0, result.stderr
    # with a budget the gate prints totals, checks and verdict; --layers adds the tensor table
    assert "verdict: within budget" in result.stdout and "mlp.0.weight" not in result.stdout
    assert "mlp.0.weight" in cli("audit", str(artifact), "--budget", within, "--layers").stdout
    over = _budget(tmp_path, '["mlp-sst2"]\nmax_weights_mb = 0.1\n')
    result = cli("audit", str(artifact), "--budget", over)
    assert result.returncode == 1 and "verdict: OVER BUDGET" in result.stdout
    data = json.loads(cli("audit", str(artifact), "--budget", over, "--json").stdout)
    assert data["within_budget"] is False
    assert data["checks"] == [{"name": "max_weights_mb", "limit": 0.1, "actual": data["weights_bytes"] / 1e6, "ok": False}]


def test_growth_against_a_baseline_audit(cli, artifact, tmp_path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(cli("audit", str(artifact), "--json").stdout)
    same = _budget(tmp_path, '["mlp-sst2"]\nmax_growth = 0.0\nbaseline = "baseline.json"\n')
    assert cli("audit", str(artifact), "--budget", same).returncode == 0
    dense = tmp_path / "dense"
    export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.9"), "dense", dense)
    result = cli("audit", str(dense), "--budget", same, "--json")
    assert result.returncode == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["max_growth (disk)"]["actual"] > 1 and checks["max_growth (parameters)"]["ok"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('["mlp-sst2"]\nmax_disk_mb = 1.0\nmax_size = 3\n', "line 3: unknown key 'max_size' in [mlp-sst2]"),
        ('["mlp-sst2"]\nmax_parameters = "many"\n', "line 2: max_parameters must be int, got 'many'"),
        ('["mlp-sst2"]\nmax_disk_mb = \n', "malformed budget file"),
        ('max_disk_mb = 1.0\n', "line 1: 'max_disk_mb' must be a table of limits"),
        ('["other-model"]\nmax_disk_mb = 1.0\n', "no budget for model 'mlp-sst2'"),
        ('["mlp-sst2"]\nmax_growth = 0.1\n', "max_growth needs a baseline"),
        ('["mlp-sst2"]\nmax_growth = 0.1\nbaseline = "nope.json"\n', "baseline audit"),
    ],
)
def test_bad_budget_files_exit_2_naming_the_problem(cli, artifact, tmp_path, text, message):
    result = cli("audit", str(artifact), "--budget", _budget(tmp_path, text))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_malformed_toml_reports_its_line(tmp_path):
    with pytest.raises(UsageError, match=r"line 2"):
        load_budgets(_budget(tmp_path, '["mlp-sst2"]\nmax_disk_mb = = 1\n'))


def test_tampered_weights_and_unknown_targets_exit_2(cli, artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    data = (broken / "weights.safetensors").read_bytes()
    (broken / "weights.safetensors").write_bytes(data[: len(data) // 2])
    result = cli("audit", str(broken))
    assert result.returncode == 2 and f"weights.safetensors is {len(data) // 2:,} bytes, the manifest recorded" in result.stderr
    result = cli("audit", str(broken), "--no-verify")  # unchecked, the weights file's own validation still refuses it
    assert result.returncode == 2 and "cannot read weights file" in result.stderr
    result = cli("audit", "no-such-thing")  # a positional TARGET is an artifact or an ONNX file
    assert result.returncode == 2 and ("'no-such-thing' is neither an artifact directory (no manifest.json) nor an "
                                       "ONNX file; audit a model with --model no-such-thing") in result.stderr
    result = cli("audit", "--model", "no-such-thing")
    assert result.returncode == 2 and "unknown model 'no-such-thing'; known: " in result.stderr
    result = cli("audit", str(artifact), "--model", "mlp-sst2")
    assert result.returncode == 2 and "audit takes one artifact directory or ONNX file, or one --model" in result.stderr


def test_audit_a_model_by_name(cli):
    result = cli("audit", "--model", "mlp-sst2", "--prune", "magnitude:0.5", "--form", "csr", "-q", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["artifact"] == "mlp-sst2 exported as csr, magnitude:0.5" and data["parameters"] == 1_412_354
