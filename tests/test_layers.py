"""The package's layers hold: contracts kept, imports inside functions justified, light modules light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deploykit"


def test_import_contracts_are_kept():
    # the same check CI runs before the tests (`lint-imports`); grimp reads imports inside functions too
    pytest.importorskip("importlinter")
    result = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                             "sys.exit(lint_imports())"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deploykit"):
                    found.append((node.lineno, lines[node.lineno - 1]))
    return found


def test_imports_inside_library_functions_say_why():
    """Outside the command line (which keeps `--help` free of torch), an import of deploykit inside a
    function is only for a module that loads a heavy library, and says so: "# torch side"."""
    unexplained = [f"{path.relative_to(ROOT)}:{line}: {text.strip()}"
                   for path in sorted(PACKAGE.rglob("*.py")) if "cli" not in path.relative_to(PACKAGE).parts
                   for line, text in _function_level_imports(path) if "side" not in text.partition("#")[2]]
    assert unexplained == []


@pytest.mark.parametrize("modules", [
    # what an onnxruntime benchmark worker loads: no torch in its memory figures
    "deploykit.bench.worker, deploykit.pipelines.catalog, deploykit.convert.forms, deploykit.runtime.session",
    # what `deploykit --help` loads
    "deploykit.cli.app",
    # the manifest, read and verified by audit and bench before anything runs
    "deploykit.model.artifact, deploykit.model.spec, deploykit.results.store",
])
def test_light_modules_import_no_torch(modules):
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _requirement_name(text: str) -> str:
    import re

    return re.split(r"[<>=!~\[; ]", text, maxsplit=1)[0].lower().replace("_", "-")


def test_every_library_the_code_imports_is_declared_in_pyproject():
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    from deploykit.core.extras import extra_of

    third_party = sorted(m for m in imported if m not in sys.stdlib_module_names and m != "deploykit")
    core = {_requirement_name(r) for r in project["dependencies"]}
    # an import whose package is not installed here (an extra left out) must be one an extra brings
    undeclared = [m for m in third_party if (m not in distributions and extra_of(m) is None) or (
        m in distributions and not {_requirement_name(d) for d in distributions[m]} & declared)]
    assert undeclared == []
    # every optional package is in deploykit.core.extras, so that its absence is reported as that extra's
    optional = [m for m in third_party if m in distributions and not {_requirement_name(d) for d in distributions[m]}
                & core]
    assert [m for m in optional if extra_of(m) is None] == []
    assert "scikit-learn" not in declared  # the digits ship as a data file
