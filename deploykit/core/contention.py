"""Other work on the machine, measured: so that a measurement can say it was disturbed, and thread
counts can fit the cores that are idle.

On a 2-core machine with one other busy process, torch at 2 threads ran 6-13x slower than at 1: its
second thread waits for a scheduler tick. So deploykit defaults to the idle cores, and measures
what else ran before and during each configuration: the CPU time all processes used minus its own
and its children's (psutil's system counters, `os.times`), the share the hypervisor stole, and the
processes ready to run (`/proc/loadavg`). psutil has the counters; the difference is ours.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import psutil

from deploykit.core.env import available_cores
from deploykit.core.errors import UsageError

#: other processes using more than this many cores on average disturb a measurement
OTHERS_LIMIT_CORES = 0.25
#: a hypervisor taking more than this share of the CPU time disturbs a measurement
STEAL_LIMIT = 0.05
#: how long a look at the machine before a decision takes, s
SAMPLE_S = 0.25


@dataclass(frozen=True)
class Load:
    """What else the machine did over an interval."""

    #: CPU seconds other processes used per second of wall time (1.0: one core busy all along)
    others_busy_cores: float
    #: share of the CPU time the hypervisor gave to other guests
    steal_fraction: float
    #: processes ready to run at the end, besides this one
    runnable: int
    interval_s: float

    @property
    def disturbed(self) -> bool:
        return self.others_busy_cores > OTHERS_LIMIT_CORES or self.steal_fraction > STEAL_LIMIT

    def describe(self) -> str:
        return (f"other processes kept {self.others_busy_cores:.2f} cores busy, {self.runnable} ready to run, "
                f"steal {100 * self.steal_fraction:.0f}%")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Snapshot:
    wall: float
    busy: float
    steal: float
    total: float
    own: float


def _snapshot() -> _Snapshot:
    cpu = psutil.cpu_times()
    busy = sum(getattr(cpu, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))
    steal = getattr(cpu, "steal", 0.0)
    mine = os.times()  # this process and its waited-for children (benchmark workers)
    return _Snapshot(time.monotonic(), busy, steal, sum(cpu), mine.user + mine.system + mine.children_user
                     + mine.children_system)


def _runnable() -> int:
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            running = int(handle.read().split()[3].split("/")[0])
        return max(0, running - 1)  # the reader itself is running
    except (OSError, ValueError, IndexError):
        return 0


class LoadProbe:
    """Measures what other processes did between its creation and `stop()`."""

    def __init__(self) -> None:
        self._start = _snapshot()

    def stop(self) -> Load:
        end = _snapshot()
        wall = max(end.wall - self._start.wall, 1e-9)
        others = max(0.0, (end.busy - self._start.busy) - (end.own - self._start.own)) / wall
        total = max(end.total - self._start.total, 1e-9)
        return Load(others, (end.steal - self._start.steal) / total, _runnable(), wall)


def sample_load(seconds: float = SAMPLE_S) -> Load:
    """The machine's load over the next `seconds` (this process idle meanwhile)."""
    probe = LoadProbe()
    time.sleep(seconds)
    return probe.stop()


def idle_cores(load: Load | None = None) -> int:
    """Cores this process may use that other work leaves idle (at least 1)."""
    load = load or sample_load()
    return max(1, available_cores() - math.ceil(load.others_busy_cores - OTHERS_LIMIT_CORES))


def check_threads(threads: int) -> int:
    """`threads`, if it is a sane count for this machine: 1 to 4 per logical core (more only thrash,
    and a huge count would exhaust the process)."""
    most = 4 * (os.cpu_count() or 1)
    if not 1 <= threads <= most:
        raise UsageError(f"{threads} threads: give 1 to {most} (4 per logical core here)")
    return threads


def use_threads(threads: int) -> None:
    """This process's torch intra-op threads (its onnxruntime sessions take theirs explicitly)."""
    import torch

    torch.set_num_threads(threads)
