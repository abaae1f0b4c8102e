"""SIGTERM and SIGHUP handled as Ctrl-C is: what was measured is kept, scratch is removed.

`timeout`, CI cancellation, `docker stop` and systemd stop a process with SIGTERM; a closed terminal
sends SIGHUP. Python's default for both is to die on the spot, which skips every `finally` and
`except` that keeps a run's rows and removes its scratch directories. `stop_signals_interrupt`
turns them into `Terminated`, a `KeyboardInterrupt`, so every path that already keeps what it has on
Ctrl-C (the bench's store write, the fleet's cancellation of what is queued) does the same for them,
and the command exits with the shell's status for the signal (128 + its number: 143, 129).

A library that installs its own handler (Ray's driver does) takes the signal back from us;
`reinstall` puts ours in place again after such a library has started.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: the signals that stop a command the way Ctrl-C does (SIGINT keeps Python's own KeyboardInterrupt)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A stop signal arrived; handled wherever Ctrl-C is. `exit_code` is the shell's for the signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


#: the signals this process turns into `Terminated` now (one ignored when the process started, as
#: under `nohup`, stays ignored)
_managed: tuple[int, ...] = ()


#: the stop signal that arrived in the current block, if one did
_received: int | None = None


def _raise(signum: int, _frame) -> None:
    global _received
    # Once stopping, a second signal must not interrupt the clean-up (the store write) halfway.
    for sig in _managed:
        signal.signal(sig, signal.SIG_IGN)
    _received = signum
    raise Terminated(signum)


def as_terminated(interrupt: KeyboardInterrupt) -> KeyboardInterrupt:
    """`interrupt` as the `Terminated` it stands for when a stop signal arrived: a library whose C code
    notices a pending Python signal (Ray's `wait`) raises a plain KeyboardInterrupt in its place."""
    if isinstance(interrupt, Terminated) or _received is None:
        return interrupt
    return Terminated(_received)


def reinstall() -> None:
    """Make the stop signals raise `Terminated` again (after a library replaced the handlers); only
    the main thread can set handlers, elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        for sig in _managed:
            signal.signal(sig, _raise)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated`; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _managed, _received
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    outer = _managed
    _received = None
    _managed = tuple(sig for sig, handler in previous.items() if handler is not signal.SIG_IGN)
    reinstall()
    try:
        yield
    finally:
        _managed = outer
        for sig, handler in previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
