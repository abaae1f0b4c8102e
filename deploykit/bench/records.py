"""Benchmark records: one frozen row per measured configuration, raw samples kept.

Units are in field names. Statistics (percentiles, throughput) are derived from the samples by
`Measurement`, and `to_dict` writes both, so a saved record can be re-analysed later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from deploykit.core.measure import Measurement
from deploykit.core.validate import NON_FINITE, at_least, between, from_json


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
    #: the exported model's quality on held-out data (ModelSpec.evaluate), e.g. {"accuracy": 0.97}
    metrics: dict[str, float] = field(default_factory=dict, metadata=NON_FINITE)  # a perplexity may overflow
    #: post-training quantization scheme of the artifact ("int8"), "" for float
    quantization: str = ""
    #: onnxruntime's graph optimisation level ("" for runtimes without one)
    graph_optimization: str = ""
    #: the largest parity error allowed against the reference; None where none is checked (quantized
    #: artifacts, ONNX files): a row above it was measured on wrong outputs
    parity_tolerance: float | None = field(default=None, metadata=at_least(0))
    #: other work on the machine (`deploykit.core.contention.Load` fields) just before ("before") and while
    #: ("during") this configuration ran
    load: dict[str, Any] = field(default_factory=dict)

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
        data["throughput_items_per_s"] = m.throughput_items_per_s
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

    @property
    def label(self) -> str:
        parts = [self.model, self.prune, f"form={self.form}"]
        parts += [f"runtime={self.runtime}"] if self.runtime else []
        parts += [f"batch={self.batch_size}"] if self.batch_size is not None else []
        parts += [f"length={self.sequence_length}"] if self.sequence_length else []
        parts += [f"threads={self.threads}"] if self.threads is not None else []
        return " ".join(parts)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "failure") -> "FailedConfiguration":
        return cls(**from_json(cls, data, where))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
