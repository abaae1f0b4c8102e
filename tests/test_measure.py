import pytest

from deploykit.core.measure import Measurement, measure


class FakeClock:
    """Advances by `step_ns` per call of the measured function, never by itself."""

    def __init__(self, step_ns):
        self.now = 0
        self.step_ns = step_ns
        self.calls = 0

    def __call__(self):
        return self.now

    def work(self):
        self.calls += 1
        self.now += self.step_ns(self.calls) if callable(self.step_ns) else self.step_ns


def test_timing_runs_until_min_time_and_min_iters():
    clock = FakeClock(1_000_000)  # 1 ms per call
    m = measure(clock.work, warmup_s=0.005, min_time_s=0.05, min_iters=10, clock=clock)
    assert m.warmup_iters == 5
    assert len(m.samples_ns) == 50  # 50 ms at 1 ms per call beats 10 iterations
    assert clock.calls == 55
    m = measure(clock.work, warmup_s=0.0, min_time_s=0.001, min_iters=30, clock=clock)
    assert m.warmup_iters == 1 and len(m.samples_ns) == 30


def test_max_iters_caps_the_run():
    clock = FakeClock(10)
    m = measure(clock.work, warmup_s=0, min_time_s=10, min_iters=5, max_iters=7, clock=clock)
    assert len(m.samples_ns) == 7


def test_statistics_come_from_the_raw_samples():
    clock = FakeClock(lambda i: i * 1_000_000)  # call i takes i ms; warm-up takes call 1
    m = measure(clock.work, batch_size=4, warmup_s=0, min_time_s=0, min_iters=100, clock=clock)
    assert m.samples_ns == tuple(i * 1_000_000 for i in range(2, 102))
    assert m.percentile_ms(0) == 2.0 and m.percentile_ms(100) == 101.0
    assert m.median_ms == 51.5
    assert m.percentile_ms(90) == pytest.approx(91.1)
    assert m.percentile_ms(99) == pytest.approx(100.01)
    assert m.iqr_ms == pytest.approx(49.5)
    # items/s is the p50's, beside which tables print it; the mean's is named so
    assert m.throughput_items_per_s == pytest.approx(4 / (51.5 / 1000))
    assert m.mean_throughput_items_per_s == pytest.approx(4 * 100 / (sum(range(2, 102)) / 1000))


def test_invalid_settings_and_empty_measurements():
    with pytest.raises(ValueError):
        measure(lambda: None, min_iters=0)
    with pytest.raises(ValueError):
        Measurement((), 0, 1)


def test_warm_up_continues_until_latency_settles():
    clock = FakeClock(lambda i: 10_000_000 - 300_000 * i if i <= 30 else 1_000_000)  # speeding up, then 1 ms
    m = measure(clock.work, warmup_s=0.1, min_time_s=0, min_iters=10, clock=clock)
    assert m.warmup_stable and m.warmup_iters > 30  # it kept warming up past the slow calls
    assert set(m.samples_ns) == {1_000_000}

    drifting = FakeClock(lambda i: int(10_000_000 * 0.97 ** i))  # 3% faster every call: never settles in time
    m = measure(drifting.work, warmup_s=0.05, min_time_s=0, min_iters=5, clock=drifting)
    assert not m.warmup_stable and "unsettled" in m.problems()


def test_median_confidence_interval_and_sample_requirements():
    from deploykit.core.measure import required_samples

    samples = tuple(1_000_000 + 1000 * (i % 50) for i in range(400))
    m = Measurement(samples, 1, 1)
    low, high = m.median_ci_ms()
    assert low <= m.median_ms <= high and high - low < 0.05
    assert m.median_ci_ms() == (low, high)  # seeded: the same interval every time
    assert required_samples(90) == 50 and required_samples(99) == 500
    assert m.enough_samples_for(90) and not m.enough_samples_for(99)
    assert m.problems() == {}  # IQR is 2.5% of the median
    noisy = Measurement((1_000_000, 2_000_000, 3_000_000, 4_000_000), 1, 1)
    assert noisy.problems()["noisy"] == "IQR 60% of the median"


def test_short_calls_are_batched_until_the_harness_overhead_is_negligible():
    from deploykit.core.measure import MAX_OVERHEAD_SHARE

    class Clock:  # every reading costs 100 ns; the measured call costs 1 us
        now = 0

        def __call__(self):
            self.now += 100
            return self.now

    clock = Clock()

    def work():
        clock.now += 1000

    m = measure(work, warmup_s=0.0001, min_time_s=0, min_iters=20, clock=clock)
    assert m.overhead_ns == 100
    assert m.calls_per_sample >= m.overhead_ns / (MAX_OVERHEAD_SHARE * 1100)
    assert "overhead" not in m.problems()
    assert all(1000 <= s <= 1100 for s in m.samples_ns)  # per-call means
