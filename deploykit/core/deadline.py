"""A time limit on work that may not end in useful time (torch-pruning's group search on some graphs
runs for many minutes): past it, the work stops with an error the user can act on.

SIGALRM, so only on the main thread of a Unix process; elsewhere the work runs unbounded. Written
here because the libraries in the stack offer none for in-process Python work (a subprocess would
have to copy the model). A limit already running (a benchmark's own) is honoured: the nearer one
fires, and the outer one's remaining time is restored afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

from deploykit.core.errors import DeployKitError


class TimeLimitError(DeployKitError):
    """Work stopped at its time limit."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise `TimeLimitError` ("`what` took longer than N s") if the block runs past `seconds`."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()

    def stop(_signum, _frame):
        raise TimeLimitError(f"{what} took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # give the outer limit back what is left of it (at least a tick: it may be due)
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))
