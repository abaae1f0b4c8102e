"""Atomic writes: a failed command leaves nothing half-written behind.

Files and directories are built under a temporary name in the destination's own directory (so the
final `os.replace` is a rename on one filesystem) and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DeployKitError, OutputPathError


def check_writable_destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any work, if `path` could not be created."""
    path = Path(path).absolute()
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{str(path)!r} already exists (pass --overwrite to replace it)")
    return path


def _umasked(mode: int) -> int:
    """`mode` under the process umask: what open() and mkdir() would have given. tempfile creates
    private (0600/0700) entries, which a finished artifact or report must not stay."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` when the block succeeds."""
    path = check_writable_destination(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _umasked(0o777))
        if path.exists():
            # Move the old one aside first so that `path` is never missing a complete artifact
            # for longer than two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; it replaces `path` when the block succeeds."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _umasked(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_text(path: str | os.PathLike, what: str, error: type[DeployKitError]) -> str:
    """A UTF-8 text file's contents, or `error` saying in one line why "`what` PATH" cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
