"""The calling thread's alternate signal stack, kept as it was across a library call that replaces it.

Why: OpenVINO 2026.4's `compile_model` installs an alternate signal stack on the calling thread, and a
compiled model puts back the stack it found when it is released. Two compiled models released in the
order they were made (a generating pipeline's graphs) leave the thread with the first one's stack,
freed with it. CPython installs its signal handlers with SA_ONSTACK, so the next signal a Python
handler takes on that thread (a `--graph-timeout` alarm, Ctrl-C, SIGTERM) runs on freed memory and the
process dies with a segmentation fault (measured: a deadline's SIGALRM after a GPT-2's two compiled
graphs were released; the CI suite crashed so). Putting back the stack that was
there before the call (none, as a rule) keeps every handler on memory that lives. No library in the
stack manages `sigaltstack`; libc's is called through ctypes. Elsewhere than Linux and macOS (no
`sigaltstack`), this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from typing import Iterator

#: ss_flags bit set while the thread runs on its alternate stack (never passed back in)
SS_ONSTACK = 1


class _LinuxStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


class _DarwinStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_size", ctypes.c_size_t), ("ss_flags", ctypes.c_int)]


@functools.lru_cache(maxsize=1)
def _libc():
    """(sigaltstack, its stack_t structure), or None where the platform has no sigaltstack."""
    if sys.platform.startswith("linux"):
        structure = _LinuxStack
    elif sys.platform == "darwin":
        structure = _DarwinStack
    else:
        return None
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None
    return function, structure


def current_signal_stack():
    """The calling thread's alternate signal stack (a stack_t), or None where it cannot be read."""
    libc = _libc()
    if libc is None:
        return None
    function, structure = libc
    stack = structure()
    return stack if function(None, ctypes.byref(stack)) == 0 else None


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Within it, a library may replace the calling thread's alternate signal stack; on leaving, the one
    that was there before is put back."""
    before = current_signal_stack()
    try:
        yield
    finally:
        after = current_signal_stack()
        if before is not None and after is not None and (after.ss_sp, after.ss_size, after.ss_flags) != (
                before.ss_sp, before.ss_size, before.ss_flags):
            before.ss_flags &= ~SS_ONSTACK
            _libc()[0](ctypes.byref(before), None)
