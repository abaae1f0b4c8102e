"""Renderers: pure functions from records to text. Measuring code never formats.

Sizes in tables are MB = 10^6 bytes, as the pruning studies quoted them (5.65 MB for the SST-2 MLP).
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

from tabulate import tabulate

from .records import BenchRecord
from .sparsity import SparsityTable

MB = 1e6


def sparsity_report(table: SparsityTable) -> str:
    """One row per parameter, then "all pruned parameters" and "overall model"."""
    rows = [
        [r.name, "x".join(map(str, r.shape)), r.numel, r.zeros, f"{100 * r.sparsity:.2f}%", "yes" if r.pruned else ""]
        for r in table.rows
    ]
    pruned = [r for r in table.rows if r.pruned]
    rows.append(["all pruned parameters", "", sum(r.numel for r in pruned), sum(r.zeros for r in pruned),
                 f"{100 * table.pruned_overall:.2f}%", ""])
    rows.append(["overall model", "", table.parameters, table.parameters - table.nonzero,
                 f"{100 * table.overall:.2f}%", ""])
    return tabulate(rows, headers=["parameter", "shape", "numel", "zeros", "sparsity", "pruned"],
                    colalign=("left", "left", "right", "right", "right", "left"))


BENCH_HEADERS = [
    "model", "form", "sparsity", "runtime", "batch", "threads", "p50 ms", "p90 ms", "p99 ms",
    "items/s", "peak MB", "disk MB", "params", "nonzero", "parity",
]


def bench_table(records: Sequence[BenchRecord]) -> str:
    """One row per record; a "stage" column when some artifact is timed in stages (encoder, decoder step...)."""
    staged = any(r.stage != "forward" for r in records)
    rows = []
    for r in records:
        m = r.measurement
        rows.append([
            r.model, r.form, f"{r.sparsity:g}", r.runtime, *([r.stage] if staged else []), r.batch_size, r.threads,
            f"{m.percentile_ms(50):.4f}", f"{m.percentile_ms(90):.4f}", f"{m.percentile_ms(99):.4f}",
            f"{m.throughput_items_per_s:,.0f}", f"{r.peak_rss_bytes / MB:.1f}", f"{r.disk_bytes / MB:.3f}",
            f"{r.parameters:,}", f"{r.nonzero_parameters:,}", f"{r.parity_max_abs_error:.1e}",
        ])
    headers = BENCH_HEADERS[:4] + (["stage"] if staged else []) + BENCH_HEADERS[4:]
    table = tabulate(rows, headers=headers, disable_numparse=True,
                     colalign=("left", "left", "right", "left") + (("left",) if staged else ()) + ("right",) * 11)
    if any(r.form == "csr" and r.runtime == "onnxruntime" for r in records):
        table += ("\nnote: onnxruntime densifies sparse initializers when it loads a model: its csr rows run "
                  "dense kernels (the file is smaller, the time is dense time)")
    return table


def audit_table(report) -> str:
    """Per-layer storage, totals and budget checks of an `AuditReport`."""
    rows = [[r.parameter, "x".join(map(str, r.shape)), r.numel, r.nonzero, f"{100 * r.sparsity:.2f}%", r.storage,
             r.stored_bytes] for r in report.rows]
    rows.append(["total", "", report.parameters, report.nonzero_parameters, "", "", sum(r.stored_bytes for r in report.rows)])
    text = tabulate(rows, headers=["parameter", "shape", "numel", "nnz", "sparsity", "storage", "bytes"],
                    colalign=("left", "left", "right", "right", "right", "left", "right"))
    text += (f"\n\n{report.model} at {report.artifact}: weights {report.weights_bytes / MB:.3f} MB, "
             f"ONNX {report.onnx_bytes / MB:.3f} MB, disk {report.disk_bytes / MB:.3f} MB")
    if report.checks:
        text += "\n\n" + tabulate(
            [[c.name, f"{c.actual:,.4g}", f"{c.limit:,.4g}", "ok" if c.ok else "OVER"] for c in report.checks],
            headers=["budget", "actual", "limit", ""], disable_numparse=True)
        text += "\n\nverdict: " + ("within budget" if report.within_budget else "OVER BUDGET")
    return text


def records_json(records: Iterable[BenchRecord]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2) + "\n"
