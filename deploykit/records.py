"""Benchmark records: one frozen row per measured configuration, raw samples kept.

Units are in field names. Statistics (percentiles, throughput) are derived from the samples by
`Measurement`, and `to_dict` writes both, so a saved record can be re-analysed later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .measure import Measurement


@dataclass(frozen=True)
class BenchRecord:
    model: str
    #: pruning plan label ("magnitude:0.5", "none") and the sparsity it asked for
    prune: str
    sparsity: float
    #: zeros over all parameters, as measured on the artifact
    overall_sparsity: float
    form: str
    runtime: str
    #: what was timed: "forward" (one call), or a stage of a pipeline ("encoder", "decoder-step", "greedy")
    stage: str
    runtime_version: str
    device: str
    batch_size: int
    threads: int
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
    parity_max_abs_error: float
    load_s: float
    #: the TimingSettings this row was measured with (warm-up, minimum time and iterations)
    timing: dict[str, Any]
    artifact: str
    versions: dict[str, str]
    machine: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        m = self.measurement
        data["latency_ms"] = {
            "p50": m.percentile_ms(50),
            "p90": m.percentile_ms(90),
            "p99": m.percentile_ms(99),
            "mean": m.mean_ms,
            "iqr": m.iqr_ms,
            "samples": len(m.samples_ns),
        }
        data["throughput_items_per_s"] = m.throughput_items_per_s
        return data
