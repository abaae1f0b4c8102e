"""Benchmark records: one frozen row per measured configuration, raw samples kept.

Units are in field names. Statistics (percentiles, throughput) are derived from the samples by
`Measurement`, and `to_dict` writes both, so a saved record can be re-analysed later.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from deploykit.core.measure import Measurement
from deploykit.core.validate import NON_FINITE, at_least, between, from_json

#: a speedup whose 95% interval is wider than this share of it is marked noisy
NOISY_SPEEDUP_SPREAD = 0.10


@dataclass(frozen=True)
class Versus:
    """The unpruned model a row was measured against, in the same interleaved rounds and workers'
    schedule (same runtime, device, batch, threads and length), and what this row buys over it.

    The ratios are kept raw, one per round both were timed in; the speedup and its interval are
    derived from them, as a Measurement's statistics are from its samples."""

    #: the baseline's artifact, plan label and form (with its quantization, "dense")
    artifact: str
    prune: str
    form: str
    #: its p50 over all its rounds, and the bytes of the files its runtime loaded
    p50_ms: float = field(metadata=at_least(0))
    disk_bytes: int = field(metadata=at_least(0))
    #: its quality on held-out data where the model has an evaluator (ModelSpec.evaluate)
    metrics: dict[str, float] = field(default_factory=dict, metadata=NON_FINITE)
    #: baseline p50 / this row's p50 in each round both were measured in
    round_ratios: tuple[float, ...] = field(default=(), metadata=NON_FINITE)

    @property
    def speedup(self) -> float | None:
        """The median of the per-round ratios (> 1: faster than the baseline); None without rounds."""
        return statistics.median(self.round_ratios) if self.round_ratios else None

    def speedup_ci95(self) -> tuple[float, float] | None:
        """A distribution-free interval of that median from order statistics: the narrowest pair
        (k-th smallest, k-th largest) covering it with probability >= 95% under any distribution of
        the rounds; with fewer than 6 rounds none does, and the interval is the smallest and largest
        ratio (coverage 1 - 2^(1-n): 94% at 5 rounds)."""
        ordered = sorted(self.round_ratios)
        n = len(ordered)
        if not n:
            return None
        k = 0
        # P(k-th order statistic <= median <= (n-k+1)-th) = 1 - 2 * P(Binomial(n, 1/2) < k+1)
        while 1 - 2 * sum(math.comb(n, i) for i in range(k + 2)) / 2**n >= 0.95:
            k += 1
        return ordered[k], ordered[n - 1 - k]

    @property
    def noisy(self) -> bool:
        """Whether the interval is too wide for the speedup to be read to two figures."""
        interval, speedup = self.speedup_ci95(), self.speedup
        return interval is None or not speedup or (interval[1] - interval[0]) / speedup > NOISY_SPEEDUP_SPREAD

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["speedup"] = self.speedup
        data["speedup_ci95"] = list(self.speedup_ci95() or ()) or None
        return data


@dataclass(frozen=True)
class BenchRecord:
    model: str
    #: pruning plan label ("magnitude:0.5", "none") and the sparsity it asked for
    prune: str
    sparsity: float = field(metadata=between(0, 1))
    #: zeros over all parameters, as measured on the artifact
    overall_sparsity: float = field(metadata=between(0, 1))
    form: str
    runtime: str
    #: the hardware profile of the machine it ran on (a known profile's name, or the detected one's)
    profile: str
    #: what was timed: "forward" (one call), or a stage of a pipeline ("encoder", "decoder-step", "greedy")
    stage: str
    runtime_version: str
    device: str
    batch_size: int = field(metadata=at_least(1))
    threads: int = field(metadata=at_least(1))
    measurement: Measurement
    #: peak resident memory of the fresh process that loaded and ran this configuration
    peak_rss_bytes: int
    #: resident memory of that process after importing the runtime, before loading the model
    baseline_rss_bytes: int
    #: size of the files this runtime loads (weights for torch, the ONNX files for onnxruntime)
    disk_bytes: int
    parameters: int
    nonzero_parameters: int
    #: max |this runtime's outputs - stripped dense PyTorch model's| on the benchmark inputs
    parity_max_abs_error: float = field(metadata={**at_least(0), **NON_FINITE})
    load_s: float = field(metadata=at_least(0))
    #: the TimingSettings this row was measured with (warm-up, minimum time and iterations)
    timing: dict[str, Any]
    artifact: str
    versions: dict[str, str]
    machine: dict[str, Any]
    #: the length set on every named non-batch input axis (a sequence-length sweep); None: the model's own
    sequence_length: int | None = field(default=None, metadata=at_least(1))
    #: the exported model's quality on held-out data (ModelSpec.evaluate), e.g. {"accuracy": 0.97},
    #: measured in the row's precision
    metrics: dict[str, float] = field(default_factory=dict, metadata=NON_FINITE)  # a perplexity may overflow
    #: post-training quantization scheme of the artifact ("int8"), "" for float
    quantization: str = ""
    #: onnxruntime's graph optimisation level ("" for runtimes without one)
    graph_optimization: str = ""
    #: the numeric precision it computed in (`deploykit.runtime.precisions`); in another than f32 its
    #: metrics were measured in that precision, and its parity error is recorded, not checked
    precision: str = "f32"
    #: the largest parity error allowed against the reference; None where none is checked (quantized
    #: artifacts, ONNX files): a row above it was measured on wrong outputs
    parity_tolerance: float | None = field(default=None, metadata=at_least(0))
    #: other work on the machine (`deploykit.core.contention.Load` fields) just before ("before") and while
    #: ("during") this configuration ran
    load: dict[str, Any] = field(default_factory=dict)
    #: this row is the unpruned baseline of its configuration, which the others were measured against
    baseline: bool = False
    #: the baseline it was measured against, and the ratios; None: no baseline (--no-baseline, or none given)
    versus: Versus | None = None
    #: input name -> what it held instead of random data (`--input-value`, a scalar's value)
    input_values: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return 1.0 if self.baseline else (self.versus.speedup if self.versus else None)

    @property
    def size_ratio(self) -> float | None:
        """This row's files over the baseline's (< 1: smaller)."""
        if self.baseline:
            return 1.0
        return self.disk_bytes / self.versus.disk_bytes if self.versus and self.versus.disk_bytes else None

    def quality_change(self) -> dict[str, float]:
        """Each metric minus the baseline's (where both have it)."""
        theirs = self.versus.metrics if self.versus else {}
        return {name: value - theirs[name] for name, value in self.metrics.items() if name in theirs}

    @property
    def wrong(self) -> bool:
        """Whether its outputs differed from the reference's beyond the tolerance."""
        return self.parity_tolerance is not None and not self.parity_max_abs_error <= self.parity_tolerance

    @property
    def form_label(self) -> str:
        """The form, with the quantization scheme when there is one ("dense+int8")."""
        return self.form + (f"+{self.quantization}" if self.quantization else "")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "record") -> "BenchRecord":
        """The record `to_dict` wrote, every field checked (`core.validate`: a record read back may
        have been edited); derived statistics are recomputed, not read."""
        return cls(**from_json(cls, data, where))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        m = self.measurement
        low, high = m.median_ci_ms()
        data["latency_ms"] = {
            "p50": m.percentile_ms(50),
            "p50_ci95": [low, high],
            # a tail percentile from too few samples is not reported (see measure.required_samples)
            "p90": m.percentile_ms(90) if m.enough_samples_for(90) else None,
            "p99": m.percentile_ms(99) if m.enough_samples_for(99) else None,
            "mean": m.mean_ms,
            "iqr": m.iqr_ms,
            "samples": len(m.samples_ns),
        }
        data["dispersion"] = m.dispersion
        data["problems"] = m.problems()
        data["throughput_items_per_s"] = m.throughput_items_per_s  # from p50
        data["mean_throughput_items_per_s"] = m.mean_throughput_items_per_s
        if self.versus is not None:
            data["versus"] = self.versus.to_dict()
        data["speedup"] = self.speedup
        data["size_ratio"] = self.size_ratio
        data["quality_change"] = self.quality_change()
        return data


@dataclass(frozen=True)
class FailedConfiguration:
    """A configuration of a run that failed, with why: kept beside the measured rows, never dropped."""

    model: str
    prune: str
    form: str
    #: what failed: "export" (the artifact could not be made) or "measure" (its worker or parity)
    stage: str
    error: str
    runtime: str = ""
    device: str = ""
    batch_size: int | None = field(default=None, metadata=at_least(1))
    threads: int | None = field(default=None, metadata=at_least(1))
    sequence_length: int | None = field(default=None, metadata=at_least(1))
    artifact: str = ""
    profile: str = ""
    precision: str = "f32"

    @property
    def label(self) -> str:
        parts = [self.model, self.prune, f"form={self.form}"]
        parts += [f"runtime={self.runtime}"] if self.runtime else []
        parts += [f"batch={self.batch_size}"] if self.batch_size is not None else []
        parts += [f"length={self.sequence_length}"] if self.sequence_length else []
        parts += [f"threads={self.threads}"] if self.threads is not None else []
        parts += [f"precision={self.precision}"] if self.precision != "f32" else []
        return " ".join(parts)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "failure") -> "FailedConfiguration":
        return cls(**from_json(cls, data, where))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
