"""The coverage benchmark's representative subset, as CI runs it: a torchvision model torch-pruning
handles, one whose dependency graph it cannot build, and a Hugging Face encoder-decoder directory; no
export may crash, and the table's figures come from the exports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("optimum")

ROOT = Path(__file__).resolve().parents[1]


def test_the_coverage_subset_exports_or_refuses_and_never_crashes(tmp_path):
    out = tmp_path / "coverage.json"
    out.write_text(json.dumps([{"model": "from-an-earlier-run"}]))  # rows of other models are kept
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_coverage.py"), "--only",
                          "resnet18,shufflenet_v2_x0_5,hf-dir-t5", "--timeout", "120", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {row["model"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"from-an-earlier-run", "resnet18", "shufflenet_v2_x0_5", "hf-dir-t5"}
    resnet = rows["resnet18"]
    assert resnet["torch_pruning"] == "ok" and all(resnet[c]["outcome"] == "ok" for c in ("shrunk", "csr", "int8"))
    before, after = resnet["shrunk"]["parameters"]
    assert after < before and resnet["shrunk"]["parity"] <= 1e-4
    shuffle = rows["shufflenet_v2_x0_5"]
    assert shuffle["shrunk"]["outcome"].startswith("refused: torch-pruning cannot build this model's dependency graph")
    assert shuffle["csr"]["outcome"] == "ok"
    assert all(rows["hf-dir-t5"][c]["outcome"] == "ok" for c in ("shrunk", "csr", "int8"))
    assert "0 crashed" in run.stdout
