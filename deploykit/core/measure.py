"""The timing loop shared by every runtime: warm-up, then iterations until a minimum time and count.

Only measuring happens here; statistics are derived lazily from the raw samples the `Measurement`
keeps, and rendering lives in `deploykit.results.report`. The clock is a parameter so the statistics can be
tested with a fake one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from deploykit.core.validate import at_least

Clock = Callable[[], int]  # monotonic nanoseconds
#: waits for work a call queued on a device (torch.cuda.synchronize); None for synchronous calls
Sync = Callable[[], None] | None


#: IQR / median above which a measurement is called noisy
NOISY_DISPERSION = 0.10
#: warm-up is stable once the median of its second half is within this fraction of its first half's
WARMUP_TOLERANCE = 0.05
#: warm-up rounds (of `warmup_s` each) before giving up on stability
MAX_WARMUP_ROUNDS = 5
#: a percentile q needs at least SAMPLES_PER_TAIL / (1 - q/100) samples: 50 for p90, 500 for p99,
#: so that about 5 samples lie beyond it
SAMPLES_PER_TAIL = 5
#: calls are batched into one sample until the harness overhead is at most this share of a sample
MAX_OVERHEAD_SHARE = 0.005


@dataclass(frozen=True)
class Measurement:
    """Raw per-call latencies of one configuration, in nanoseconds, and how they were taken.

    With `calls_per_sample` > 1 (calls far shorter than the timer's own cost), each sample is the
    mean of that many back-to-back calls. `overhead_ns` is the harness's own cost per sample (the
    same loop timing an empty call), measured, not subtracted.
    """

    samples_ns: tuple[int, ...]
    warmup_iters: int
    batch_size: int = field(metadata=at_least(1))
    calls_per_sample: int = field(default=1, metadata=at_least(1))
    overhead_ns: int = 0
    #: whether warm-up reached steady state within its rounds
    warmup_stable: bool = True

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

    def enough_samples_for(self, q: float) -> bool:
        """Whether percentile `q` rests on enough samples (see SAMPLES_PER_TAIL)."""
        return q <= 50 or len(self.samples_ns) >= required_samples(q)

    @property
    def median_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def iqr_ms(self) -> float:
        return self.percentile_ms(75) - self.percentile_ms(25)

    @property
    def dispersion(self) -> float:
        """IQR / median: how noisy the samples are, independent of the model's speed."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def mean_ms(self) -> float:
        return sum(self.samples_ns) / len(self.samples_ns) / 1e6

    @property
    def throughput_items_per_s(self) -> float:
        """Items (batch rows) per second at the p50 latency: the figure beside the p50 in every table."""
        return self.batch_size / (self.percentile_ms(50) / 1e3)

    @property
    def mean_throughput_items_per_s(self) -> float:
        """Items (batch rows) processed per second over all timed calls (from the mean latency)."""
        return self.batch_size * len(self.samples_ns) / (sum(self.samples_ns) / 1e9)

    def median_ci_ms(self, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Percentile-bootstrap confidence interval of the median (deterministic for a seed)."""
        import numpy as np

        samples = np.asarray(self.samples_ns, dtype=np.float64)
        rng = np.random.default_rng(seed)
        medians = np.empty(resamples)
        chunk = max(1, 2_000_000 // len(samples))  # bounds memory for long runs
        for start in range(0, resamples, chunk):
            count = min(chunk, resamples - start)
            picks = rng.integers(0, len(samples), size=(count, len(samples)))
            medians[start:start + count] = np.median(samples[picks], axis=1)
        tail = (1 - confidence) / 2 * 100
        low, high = np.percentile(medians, [tail, 100 - tail])
        return float(low) / 1e6, float(high) / 1e6

    def problems(self) -> dict[str, str]:
        """What makes these figures less trustworthy: kind (see REMEDIES) -> detail."""
        out = {}
        if self.dispersion > NOISY_DISPERSION:
            out["noisy"] = f"IQR {100 * self.dispersion:.0f}% of the median"
        if not self.warmup_stable:
            out["unsettled"] = f"still drifting after {self.warmup_iters} warm-up calls"
        if self.overhead_ns > MAX_OVERHEAD_SHARE * self.percentile_ms(50) * 1e6 * self.calls_per_sample:
            out["overhead"] = f"harness {self.overhead_ns / 1e3:.2f} us per sample"
        return out


#: problem kind -> what it means and what to do about it
REMEDIES = {
    "noisy": f"noisy (IQR over {100 * NOISY_DISPERSION:.0f}% of the median): close other programs, use fewer "
             "--threads than cores, raise --min-time, and compare ratios taken in one run",
    "unsettled": "warm-up did not settle (latency still drifting): raise --warmup",
    "overhead": f"the timing harness costs over {100 * MAX_OVERHEAD_SHARE:.1f}% of a sample: the call is too "
                "short to time alone; measure a larger batch",
}


def required_samples(q: float) -> int:
    """Samples needed for percentile `q` (see SAMPLES_PER_TAIL)."""
    return math.ceil(round(SAMPLES_PER_TAIL / (1 - q / 100), 9)) if q < 100 else 10 ** 9


def _timed(fn: Callable[[], object], calls: int, clock: Clock, sync: Sync = None) -> int:
    """Time `calls` back-to-back calls; with `sync`, until the device has finished them (the
    previous sample's sync left the device idle, so nothing earlier is counted)."""
    t0 = clock()
    for _ in range(calls):
        fn()
    if sync is not None:
        sync()
    return clock() - t0


def harness_overhead_ns(clock: Clock = time.perf_counter_ns, repeats: int = 200, sync: Sync = None) -> int:
    """The timing loop's own cost per sample: the median time it measures for an empty call (with
    the device synchronisation every sample pays)."""
    def empty() -> None:
        return None

    return int(sorted(_timed(empty, 1, clock, sync) for _ in range(repeats))[repeats // 2])


def _warm_up(fn: Callable[[], object], warmup_s: float, clock: Clock, sync: Sync) -> tuple[list[int], bool]:
    """Call `fn` for `warmup_s` at a time until the second half of a round is as fast as the first."""
    times: list[int] = []
    for _ in range(MAX_WARMUP_ROUNDS):
        start, round_times = clock(), []
        while True:
            round_times.append(_timed(fn, 1, clock, sync))
            if clock() - start >= warmup_s * 1e9:
                break
        times += round_times
        if len(round_times) < 4:  # too few calls to judge a trend: a long call is its own warm-up
            return times, True
        half = len(round_times) // 2
        first, second = sorted(round_times[:half])[half // 2], sorted(round_times[half:])[(len(round_times) - half) // 2]
        if abs(second - first) <= WARMUP_TOLERANCE * first:
            return times, True
    return times, False


class Sampler:
    """The timing of one call, warmed up once and then sampled in as many rounds as asked: what lets
    a benchmark interleave several configurations (a round of each in turn) so that a burst of other
    load falls on all of them rather than on one. `measure` is one round."""

    def __init__(self, fn: Callable[[], object], *, batch_size: int = 1, warmup_s: float = 0.2,
                 clock: Clock = time.perf_counter_ns, sync: Sync = None):
        self.fn, self.batch_size, self.clock, self.sync = fn, batch_size, clock, sync
        self.overhead = harness_overhead_ns(clock, sync=sync)
        warm, self.warmup_stable = _warm_up(fn, warmup_s, clock, sync)
        self.warmup_iters = len(warm)
        typical = sorted(warm)[len(warm) // 2] - self.overhead  # the call's own time, as far as the timer can tell
        calls = 1 if typical <= 0 else max(1, math.ceil(self.overhead / (MAX_OVERHEAD_SHARE * typical)))
        self.calls = min(calls, 1000)
        self.samples: list[int] = []

    def run(self, min_time_s: float, min_iters: int, max_iters: int) -> None:
        """Add samples until `min_time_s` has passed and `min_iters` were taken this round, or the
        measurement holds `max_iters`."""
        if min_iters < 1 or max_iters < min_iters:
            raise ValueError("need 1 <= min_iters <= max_iters")
        taken, elapsed, min_time_ns = 0, 0, min_time_s * 1e9
        while len(self.samples) < max_iters and (taken < min_iters or elapsed < min_time_ns):
            took = _timed(self.fn, self.calls, self.clock, self.sync)
            self.samples.append(round(took / self.calls))
            elapsed += took
            taken += 1

    def measurement(self) -> Measurement:
        return Measurement(tuple(self.samples), self.warmup_iters, self.batch_size, self.calls, self.overhead,
                           self.warmup_stable)


def measure(
    fn: Callable[[], object],
    *,
    batch_size: int = 1,
    warmup_s: float = 0.2,
    min_time_s: float = 1.0,
    min_iters: int = 100,
    max_iters: int = 1_000_000,
    clock: Clock = time.perf_counter_ns,
    sync: Sync = None,
) -> Measurement:
    """Time `fn()` call by call.

    Warm-up runs `fn` for `warmup_s` (at least once), in rounds until the calls stop getting faster,
    so lazy initialisation, allocator growth and kernel selection happen before timing. Calls much
    shorter than the timer's own cost are batched per sample. Timing then continues until both
    `min_time_s` has passed and `min_iters` samples exist (p99 needs hundreds), or `max_iters` is
    reached. With `sync` (a GPU), every sample ends with it: the clock is read once the device has
    finished the sample's calls, not when they were queued.
    """
    if min_iters < 1 or max_iters < min_iters:
        raise ValueError("need 1 <= min_iters <= max_iters")
    sampler = Sampler(fn, batch_size=batch_size, warmup_s=warmup_s, clock=clock, sync=sync)
    sampler.run(min_time_s, min_iters, max_iters)
    return sampler.measurement()
