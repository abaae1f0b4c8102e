"""The timing loop shared by every runtime: warm-up, then iterations until a minimum time and count.

Only measuring happens here; statistics are derived lazily from the raw samples the `Measurement`
keeps, and rendering lives in `deploykit.report`. The clock is a parameter so the statistics can be
tested with a fake one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

Clock = Callable[[], int]  # monotonic nanoseconds


@dataclass(frozen=True)
class Measurement:
    """Raw per-call latencies of one configuration, in nanoseconds, and how they were taken."""

    samples_ns: tuple[int, ...]
    warmup_iters: int
    batch_size: int

    def __post_init__(self) -> None:
        if not self.samples_ns:
            raise ValueError("a measurement needs at least one sample")

    def percentile_ms(self, q: float) -> float:
        """Percentile `q` in [0, 100] with linear interpolation between order statistics."""
        ordered = sorted(self.samples_ns)
        rank = (len(ordered) - 1) * q / 100.0
        low, high = math.floor(rank), math.ceil(rank)
        value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
        return value / 1e6

    @property
    def median_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def iqr_ms(self) -> float:
        return self.percentile_ms(75) - self.percentile_ms(25)

    @property
    def mean_ms(self) -> float:
        return sum(self.samples_ns) / len(self.samples_ns) / 1e6

    @property
    def throughput_items_per_s(self) -> float:
        """Items (batch rows) processed per second over all timed calls."""
        return self.batch_size * len(self.samples_ns) / (sum(self.samples_ns) / 1e9)


def measure(
    fn: Callable[[], object],
    *,
    batch_size: int = 1,
    warmup_s: float = 0.2,
    min_time_s: float = 1.0,
    min_iters: int = 100,
    max_iters: int = 1_000_000,
    clock: Clock = time.perf_counter_ns,
) -> Measurement:
    """Time `fn()` call by call.

    Warm-up runs `fn` for `warmup_s` (at least once) so lazy initialisation, allocator growth and
    kernel selection happen before timing. Timing then continues until both `min_time_s` has passed
    and `min_iters` samples exist (p99 needs hundreds), or `max_iters` is reached.
    """
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError("need 1 <= min_iters <= max_iters")
    warmup_iters = 0
    start = clock()
    while True:
        fn()
        warmup_iters += 1
        if clock() - start >= warmup_s * 1e9:
            break
    samples: list[int] = []
    elapsed = 0
    min_time_ns = min_time_s * 1e9
    while len(samples) < max_iters and (len(samples) < min_iters or elapsed < min_time_ns):
        t0 = clock()
        fn()
        t1 = clock()
        samples.append(t1 - t0)
        elapsed += t1 - t0
    return Measurement(tuple(samples), warmup_iters, batch_size)
