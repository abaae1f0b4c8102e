"""Files deploykit writes: atomically, only where it may, and never over what it did not write.

Files and directories are built under a temporary name in the destination's own directory (so the
final `os.replace` is a rename on one filesystem) and moved into place only when complete. The
temporary names carry the writing process's id (`.NAME.PID.XXXXXXXX.partial`), so a later run can
tell the leftovers of a killed run (its process is gone) from the work of one still running, and
remove them (`clean_leftovers`). Scratch directories under the system's temporary folder follow the
same rule (`scratch_directory`).

Every output path is checked before any work: its directory exists and is writable, and whatever
is already there is a regular file (a report, a JSON file) or, for artifacts, a directory that its
owner confirms deploykit wrote. Device nodes, FIFOs, sockets, symbolic links, mount points, `/`, the
home directory and the working directory are never replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil

from deploykit.core.errors import DeployKitError, OutputPathError, WriteError

#: errors of the file system, not of deploykit: reported in one line naming the path
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
#: what a failed write's message adds: atomic writes leave nothing half-written behind
NOTHING_LEFT = " (nothing partial was left behind)"
#: `.NAME.PID.RANDOM.partial|old`: what `atomic_directory`/`atomic_path` leave if killed
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>partial|old)$")
#: the same without a process id: written by deploykit before it recorded one
_LEGACY_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(?P<kind>partial|old)$")
#: `deploykit-KIND-PID-RANDOM` scratch directories in the system's temporary folder
_SCRATCH = re.compile(r"^deploykit-(?P<kind>[a-z]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _existing(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputPathError(f"cannot inspect {str(path)!r}: {exc.strerror}") from None


def _check_parent(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable")


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail early, before any work, unless `path` can take a file: its directory exists and is
    writable, and nothing is there or a regular file is (which will be replaced). Returns the path."""
    path = Path(path).absolute()
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"cannot write {str(path)!r}: not a file name")
    _check_parent(path)
    found = _existing(path)
    if found is not None and (kind := _kind_of(found.st_mode)) is not None:
        raise OutputPathError(f"refusing to write {str(path)!r}: it is {kind}, not a regular file "
                              "(deploykit replaces only regular files)")
    return path


def _protected(path: Path) -> str | None:
    """Why the directory `path` may never be replaced, or None."""
    resolved = path.resolve()
    for place, name in ((Path("/"), "the root directory"), (Path.home(), "the home directory"),
                        (Path.cwd(), "the working directory")):
        with contextlib.suppress(OSError):
            if resolved == place.resolve() or resolved in place.resolve().parents:
                return name if resolved == place.resolve() else f"above {name}"
    if os.path.ismount(path):
        return "a mount point"
    return None


def check_writable_destination(path: str | os.PathLike, overwrite: bool = False,
                               owned: Callable[[Path], str | None] | None = None) -> Path:
    """Fail early, before any work, if the directory `path` could not be created or replaced.

    With `overwrite`, an existing `path` is replaced only when it is a plain directory (not a link,
    a mount point, `/`, home or the working directory, or one above them) and `owned(path)` returns
    None: the owner's reason it is not deploykit's otherwise."""
    path = Path(path).absolute()
    _check_parent(path)
    found = _existing(path)
    if found is None:
        return path
    if not overwrite:
        raise OutputPathError(f"{str(path)!r} already exists (pass --overwrite to replace it)")
    if not stat.S_ISDIR(found.st_mode):
        raise OutputPathError(f"--overwrite refuses {str(path)!r}: it is {_kind_of(found.st_mode) or 'a file'}, "
                              "not an artifact directory")
    reason = _protected(path)
    if reason is None and owned is not None:
        reason = owned(path)
    elif reason is None:
        reason = "deploykit cannot tell that it wrote it"
    if reason:
        raise OutputPathError(f"--overwrite refuses {str(path)!r}: {reason}")
    return path


def _umasked(mode: int) -> int:
    """`mode` under the process umask: what open() and mkdir() would have given. tempfile creates
    private (0600/0700) entries, which a finished artifact or report must not stay."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """File-system failures (disk full, read-only, permissions) as one line naming the destination."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(f"cannot write {str(path)!r}: {exc.strerror or exc}{NOTHING_LEFT}") from None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False,
                     owned: Callable[[Path], str | None] | None = None,
                     notes: Callable[[str], None] = lambda message: None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` when the block succeeds. An existing
    `path` is replaced only as `check_writable_destination` allows. Leftovers of killed runs beside
    it are removed first, and `notes` hears of each."""
    path = check_writable_destination(path, overwrite, owned)
    for note in clean_leftovers(path.parent):
        notes(note)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".partial", dir=path.parent))
    try:
        with _write_errors(path):
            yield tmp
            os.chmod(tmp, _umasked(0o777))
            if _existing(path) is not None:
                # checked again: the directory may have changed while the work ran (another process
                # may have written it: without overwrite that is refused, never replaced)
                check_writable_destination(path, overwrite, owned)
                # Move the old one aside first so that `path` is never missing a complete artifact
                # for longer than two renames.
                old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                _rename_no_replace(tmp, path)
    except WriteError as exc:  # named by the destination the user gave, not the temporary one now gone
        remove_tree(tmp)
        raise WriteError(str(exc).replace(str(tmp), str(path))) from None
    except BaseException:
        remove_tree(tmp)
        raise


_RENAME_NOREPLACE, _AT_FDCWD = 1, -100  # linux/fs.h, fcntl.h


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless something is at `target` by then (another process that
    wrote the same output between our check and this rename): that is refused, never replaced.
    renameat2(RENAME_NOREPLACE) makes the check and the rename one step where the C library has it;
    elsewhere os.rename of a directory still fails onto a non-empty one (every artifact is)."""
    taken = OutputPathError(f"{str(target)!r} already exists (another process wrote it while this one worked; "
                            "pass --overwrite to replace it)")
    libc_rename = _renameat2()
    if libc_rename is not None:
        if libc_rename(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            raise taken
        if error not in (errno.ENOSYS, errno.EINVAL):  # those two: not supported here, fall back
            raise OSError(error, os.strerror(error), str(target))
    if _existing(target) is not None:
        raise taken
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise taken from None
        raise


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2, or None where the C library lacks it."""
    with contextlib.suppress(OSError, AttributeError):
        function = ctypes.CDLL(None, use_errno=True).renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return function
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; it replaces `path` when the block succeeds."""
    path = check_output_file(path)
    clean_leftovers(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _write_errors(path):
            yield tmp
            os.chmod(tmp, _umasked(0o666))
            check_output_file(path)  # still nothing special there
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_text(path: str | os.PathLike, what: str, error: type[DeployKitError]) -> str:
    """A UTF-8 text file's contents, or `error` saying in one line why "`what` PATH" cannot be read."""
    if Path(path).exists() and not Path(path).is_file():  # a FIFO or a device would block or never end
        raise error(f"{what} {str(path)!r} is not a regular file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> int | None:
    """Write `text` to `path` atomically; returns the size in bytes of the file it replaced, if any."""
    path = check_output_file(path)
    found = _existing(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return found.st_size if found is not None else None


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dead(pid: int, since: float) -> bool:
    """Whether process `pid` is gone, or is a later process that reused the id of one that wrote at `since`."""
    try:
        return psutil.Process(pid).create_time() > since + 1
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # exists, but cannot be inspected: assume alive
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_start() -> float:
    return psutil.Process().create_time()


def clean_leftovers(directory: str | os.PathLike) -> list[str]:
    """Remove what killed deploykit runs left in `directory`: `.NAME.PID.*.partial` / `.old` entries
    whose process is gone and that are older than this process. Entries without a process id (from
    older versions) cannot be attributed and are only reported. Returns one note per entry."""
    directory = Path(directory)
    notes = []
    started = _process_start()
    with contextlib.suppress(OSError):
        for entry in sorted(directory.iterdir()):
            match = _LEFTOVER.match(entry.name)
            try:
                mtime = entry.lstat().st_mtime
            except OSError:
                continue
            if match and int(match["pid"]) != os.getpid() and mtime < started and _dead(int(match["pid"]), mtime):
                _remove(entry)
                notes.append(f"removed {entry.name}, left in {directory} by a deploykit run that was killed")
            elif not match and _LEGACY_LEFTOVER.match(entry.name) and mtime < started:
                notes.append(f"{entry} looks like the leftover of a killed deploykit run (it names no process); "
                             "remove it if no deploykit runs there")
    return notes


@contextlib.contextmanager
def scratch_directory(kind: str) -> Iterator[Path]:
    """A temporary directory `deploykit-KIND-PID-*` in the system's temporary folder, removed at the
    end; first removes those of killed processes (of any kind)."""
    root = Path(tempfile.gettempdir())
    started = _process_start()
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = _SCRATCH.match(entry.name)
            if not match or int(match["pid"]) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                mtime = entry.lstat().st_mtime
                if (mtime < started and entry.lstat().st_uid == os.getuid()
                        and _dead(int(match["pid"]), mtime)):
                    _remove(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f"deploykit-{kind}-{os.getpid()}-", dir=root))
    try:
        yield tmp
    finally:
        remove_tree(tmp)


def remove_tree(path: Path) -> None:
    """Remove the directory `path` deploykit made, all of it even when Ctrl-C or a stop signal lands
    while it is being removed (the interrupt is raised again once it is gone)."""
    interrupted = None
    while True:
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except KeyboardInterrupt as exc:  # includes core.signals.Terminated
            interrupted = exc
    if interrupted is not None:
        raise interrupted



def _reads(output: Path, source: Path, whole: bool) -> str | None:
    """How writing `output` would change `source`, which the same command reads: "is" (the same
    file, through links too) or, for a directory read `whole` (an artifact: every file in it is
    checked against its manifest), "is inside"; None if it would not."""
    with contextlib.suppress(OSError):
        if output.exists() and source.exists() and os.path.samefile(output, source):
            return "is"
    out, src = Path(os.path.realpath(output)), Path(os.path.realpath(source))
    if out == src:
        return "is"
    if whole and src.is_dir() and out.is_relative_to(src):
        return "is inside"
    return None


def check_outputs_apart(outputs: Sequence[tuple[str, str | os.PathLike | None]],
                        inputs: Sequence[tuple[str, str | os.PathLike | None, bool]]) -> None:
    """Refuse, before any work, an output (option, path) that would replace or change an input (what,
    path, whether a directory is read whole) of the same command: `report --store S --out S` would
    put the report where every run was. Empty paths and "-" (standard output) are skipped."""
    for option, output in outputs:
        if not output or str(output) == "-":
            continue
        for what, source, whole in inputs:
            if not source or str(source) == "-":
                continue
            relation = _reads(Path(output), Path(source), whole)
            if relation:
                raise OutputPathError(f"{option} {str(output)!r} {relation} {what} {str(source)!r}, which this "
                                      "command reads: writing it would destroy its own input; choose another path")
