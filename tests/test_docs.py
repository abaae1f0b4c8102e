"""Docs that run: every block of README.md and docs/*.md marked runnable runs as written, in order,
and exits as the text says.

The marks are HTML comments on the line before a fenced block (invisible once rendered):

- `<!-- runnable -->` before a ```bash block: each line is a command that exits 0; before a ```python
  block: the block is a script that exits 0;
- `<!-- runnable: exit N -->`: the same, but the block's last command exits N (a gate that fails);
- `<!-- file: NAME -->` before any block: the block is written to NAME in the working directory, for
  the commands after it (a model file, a budget).

Each document runs in an empty working directory of its own, with its own results store and trust
file, so its blocks build on each other (an export, then a bench of it) and on nothing else. `bench`
and `export` get small timing flags (FAST_FLAGS) the lines do not already set, and a leading
`bash .ci/env ` runs the command in this environment (the one .ci/env made). A block marked runnable
that needs the network (pip, curl, a fleet) is refused by the extractor: the docs test runs offline.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

MARK = re.compile(r"^<!-- (?:runnable(?:: exit (?P<exit>\d+))?|file: (?P<file>[\w.-]+)) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
#: what a runnable block may not do: reach the network (installers, downloads, a Ray cluster)
NETWORK = re.compile(r"(^|\s)(pip3?|curl|wget|apt(-get)?|git\s+clone|ray)\s|--cluster\b|worker\s+start|https?://")
#: per subcommand, timing flags added where the line does not set them (flag -> its value, or None)
FAST_FLAGS = {
    "bench": {"--warmup": "0", "--min-time": "0", "--min-iters": "3", "--timing-rounds": "2", "--threads": "1"},
    "export": {"--no-measure": None},
}
COMMAND_TIMEOUT_S = 900


class DocError(ValueError):
    """A document whose marks cannot be run as they say."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str
    #: the exit status of the block's last command (None: a file to write)
    exit: int | None
    #: the file this block is written to (None: a block to run)
    file: str | None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def doc_blocks(path: Path, text: str) -> list[Block]:
    """The marked blocks of a Markdown document, in order; refuses a mark not followed by a fence, a
    runnable block in a language it cannot run, and one that needs the network."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        mark = MARK.match(line.strip())
        if mark is None:
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise DocError(f"{path.name}:{i + 1}: a mark must be followed by a fenced block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise DocError(f"{path.name}:{i + 2}: the block is never closed")
        body = "\n".join(lines[i + 2:end]) + "\n"
        block = Block(path, i + 2, fence["lang"], body, None if mark["file"] else int(mark["exit"] or 0), mark["file"])
        if block.file is None:
            if block.lang not in ("bash", "python"):
                raise DocError(f"{block.where}: a runnable block must be bash or python, not {block.lang!r}")
            if NETWORK.search(body):
                raise DocError(f"{block.where}: a runnable block may not need the network "
                               f"({NETWORK.search(body).group(0).strip()!r}): show it as an example, unmarked")
        blocks.append(block)
    return blocks


def commands(block: Block) -> list[str]:
    """The command lines of a bash block, with the test's timing flags added."""
    lines = [line for line in block.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [fast(line.removeprefix("bash .ci/env ")) for line in lines]


def fast(line: str) -> str:
    words = shlex.split(line, comments=True)
    if len(words) < 2 or words[0] != "deploykit" or words[1] not in FAST_FLAGS:
        return line
    given = {w.split("=")[0] for w in words}
    added = [part for flag, value in FAST_FLAGS[words[1]].items() if flag not in given
             for part in ([flag] if value is None else [flag, value])]
    return shlex.join(words + added)


def run_document(path: Path, workdir: Path) -> list[str]:
    """Run every marked block of `path` in `workdir`; the commands run, in order."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DEPLOYKIT_STORE": str(workdir / "results.sqlite"),
           "DEPLOYKIT_CONFIG": str(workdir / "config"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for block in doc_blocks(path, path.read_text(encoding="utf-8")):
        if block.file is not None:
            (workdir / block.file).write_text(block.text, encoding="utf-8")
            continue
        if block.lang == "python":
            script = workdir / f"block_{block.line}.py"
            script.write_text(block.text, encoding="utf-8")
            steps = [shlex.join([sys.executable, str(script)])]
        else:
            steps = commands(block)
        for n, command in enumerate(steps):
            expected = block.exit if n == len(steps) - 1 else 0
            done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            assert done.returncode == expected, (
                f"{block.where}: `{command}` exited {done.returncode}, the text says {expected}\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            assert "Traceback" not in done.stderr, f"{block.where}: `{command}`\n{done.stderr[-3000:]}"
            ran.append(command)
    return ran


def _has_runnable(path: Path) -> bool:
    return any(b.file is None for b in doc_blocks(path, path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if _has_runnable(p)], ids=lambda p: p.name)
def test_every_runnable_block_runs_as_the_text_says(path, tmp_path):
    # the repository's example models, where a document names them (models/examples/...)
    (tmp_path / "models").symlink_to(REPO / "models")
    assert run_document(path, tmp_path)


def test_the_readme_is_a_quickstart():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    # the two set-up commands: the main job, and the tests exactly as CI runs them
    assert "bash .ci/env deploykit bench\n" in readme and "bash .ci/env python -m pytest -q\n" in readme
    assert "bash .ci/env python -m pytest -q" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (REPO / link).is_file(), link


def test_every_document_link_resolves():
    for path in DOCUMENTS:
        for link in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", path.read_text(encoding="utf-8")):
            assert (path.parent / link).is_file(), f"{path.name}: {link}"


@pytest.mark.parametrize("text, says", [
    ("<!-- runnable -->\n```bash\npip install deploykit\n```\n", "may not need the network ('pip')"),
    ("<!-- runnable -->\n```bash\ndeploykit bench --cluster 127.0.0.1:6379\n```\n", "may not need the network"),
    ("<!-- runnable -->\ntext\n", "a mark must be followed by a fenced block"),
    ("<!-- runnable -->\n```bash\ndeploykit models\n", "never closed"),
    ("<!-- runnable -->\n```toml\na = 1\n```\n", "must be bash or python"),
])
def test_a_block_marked_runnable_that_cannot_run_offline_is_refused(text, says):
    with pytest.raises(DocError, match=re.escape(says)):
        doc_blocks(Path("doc.md"), text)


def test_bench_and_export_lines_get_the_timing_flags_they_do_not_set():
    assert fast("deploykit bench mine -q") == ("deploykit bench mine -q --warmup 0 --min-time 0 --min-iters 3 "
                                               "--timing-rounds 2 --threads 1")
    assert fast("deploykit bench --threads 2 --min-iters=5").count("--threads") == 1
    assert "--min-iters 3" not in fast("deploykit bench --threads 2 --min-iters=5")
    assert fast("deploykit export --model m --out x  # a comment") == "deploykit export --model m --out x --no-measure"
    assert fast("deploykit models") == "deploykit models"
