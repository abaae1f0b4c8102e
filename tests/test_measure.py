import pytest

from deploykit.measure import Measurement, measure


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
    assert m.throughput_items_per_s == pytest.approx(4 * 100 / (sum(range(2, 102)) / 1000))


def test_invalid_settings_and_empty_measurements():
    with pytest.raises(ValueError):
        measure(lambda: None, min_iters=0)
    with pytest.raises(ValueError):
        Measurement((), 0, 1)
