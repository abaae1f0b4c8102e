import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from deploykit.model.catalog import get_model

REPO = Path(__file__).resolve().parents[1]

# Benchmarks run by the tests keep their results in a store of their own, not the user's, and see
# only the shipped profiles.
_SCRATCH = Path(tempfile.mkdtemp(prefix="deploykit-tests-"))
os.environ["DEPLOYKIT_STORE"] = str(_SCRATCH / "results.sqlite")
os.environ["DEPLOYKIT_PROFILES"] = str(_SCRATCH / "profiles")


@pytest.fixture(scope="session")
def mlp_spec():
    return get_model("mlp-sst2")


@pytest.fixture
def mlp(mlp_spec):
    return mlp_spec.make()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
