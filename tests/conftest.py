import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploykit.spec import get_model

REPO = Path(__file__).resolve().parents[1]


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
