"""Each optional extra missing: the commands that need it say in one line which extra to install.

Every package an extra brings is made unimportable in a fresh process (a finder first on
`sys.meta_path` that reports them missing, as a Python without the extra would), then the CLI runs a
command that needs the extra.
"""

import re
import subprocess
import sys
import textwrap

import pytest

from deploykit.core.extras import EXTRAS, extra_of, missing_extra

#: per extra, a command that needs it (one that fails early, before any work)
COMMANDS = {
    "espnet": ["export", "--model", "espnet-st-small", "--out", "{tmp}/st", "--no-measure"],
    "hf": ["export", "--model", "gpt2-tiny", "--out", "{tmp}/gpt2", "--no-measure"],
    "fleet": ["worker", "list", "--address", "127.0.0.1:1"],
    "openvino": ["bench", "--model", "mlp-sst2", "--runtime", "openvino", "--no-store", "--keep", "{tmp}/kept"],
}

BLOCKING_RUN = textwrap.dedent("""
    import importlib.abc, sys
    blocked = set(sys.argv[1].split(","))

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Missing())
    from deploykit.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_every_extra_has_a_command_checked_here():
    assert set(COMMANDS) == set(EXTRAS)


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_a_command_needing_a_missing_extra_names_it(extra, tmp_path):
    command = [part.format(tmp=tmp_path) for part in COMMANDS[extra]]
    run = subprocess.run([sys.executable, "-c", BLOCKING_RUN, ",".join(EXTRAS[extra].modules), *command],
                         capture_output=True, text=True)
    lines = [line for line in run.stderr.splitlines() if line.startswith("deploykit: error")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and re.fullmatch(rf"deploykit: error: .+ needs the '{extra}' extra \(\w+ is not installed\): "
                                            rf"pip install 'deploykit\[{extra}\]'", lines[0]), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_only_a_missing_top_level_package_of_an_extra_is_reported_as_one():
    assert extra_of("transformers.models.gpt2").name == "hf"
    assert extra_of("numpy") is None
    # a package that is there in another release (a submodule or a name missing) is not "not installed"
    assert missing_extra(ModuleNotFoundError("No module named 'transformers.x'", name="transformers.x")) is None
    assert missing_extra(ImportError("cannot import name 'X' from 'yaml'", name="yaml")) is None
    assert missing_extra(ModuleNotFoundError("No module named 'foo'", name="foo")) is None
    found = missing_extra(ModuleNotFoundError("No module named 'yaml'", name="yaml"), "an ESPnet model")
    assert str(found) == "an ESPnet model needs the 'espnet' extra (yaml is not installed): pip install 'deploykit[espnet]'"
