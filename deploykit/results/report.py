"""Renderers: pure functions from records to text. Measuring code never formats.

Sizes in tables are MB = 10^6 bytes, as the pruning studies quoted them (5.65 MB for the SST-2 MLP).
"""

from __future__ import annotations

import json
from typing import Sequence

from tabulate import tabulate

from deploykit.bench.records import BenchRecord
from deploykit.core.contention import Load
from deploykit.core.errors import UsageError
from deploykit.core.measure import REMEDIES, required_samples
from deploykit.core.ort import DEFAULT_GRAPH_OPTIMIZATION
from deploykit.core.sparsity import SparsityTable
from deploykit.results.pick import pareto_front, ratio_text

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
    "model", "plan", "form", "runtime", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "speedup",
    "items/s", "disk MB", "size", "peak MB", "nonzero", "parity", "pareto",
]


#: devices that go without saying: a "device" column appears only when some row ran elsewhere
CPU_DEVICES = ("cpu", "CPUExecutionProvider")


def speedup_cell(r: BenchRecord) -> str:
    """"1.23x [1.10-1.31]" against the baseline, "~" first where the interval is wide, "!" where other
    work ran; "baseline" on the baseline's own row; "" where the run had none."""
    if r.baseline:
        return "baseline"
    if r.versus is None or r.versus.speedup is None:
        return ""
    low, high = r.versus.speedup_ci95()
    marks = ("!" if _disturbed(r) else "") + ("~" if r.versus.noisy or r.measurement.problems().get("noisy") else "")
    return marks + ratio_text(r.versus.speedup, low, high)


def quality_cell(r: BenchRecord) -> str:
    """Each metric, with its change against the baseline where there is one."""
    change = r.quality_change()
    return ", ".join(f"{name} {value:.4f}" + (f" ({change[name]:+.4f})" if name in change and not r.baseline else "")
                     for name, value in r.metrics.items())


def bench_rows(records: Sequence[BenchRecord]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows; "device", "stage", "length", "graph opt", "precision" and "quality"
    columns only where some row needs one."""
    optional = {
        "device": (any(r.device not in CPU_DEVICES for r in records), lambda r: r.device),
        "stage": (any(r.stage != "forward" for r in records), lambda r: r.stage),
        "length": (any(r.sequence_length for r in records), lambda r: str(r.sequence_length or "")),
        "graph opt": (any(r.graph_optimization not in ("", DEFAULT_GRAPH_OPTIMIZATION) for r in records),
                      lambda r: r.graph_optimization),
        "precision": (any(r.precision != "f32" for r in records), lambda r: r.precision),
    }
    shown = [(name, cell) for name, (wanted, cell) in optional.items() if wanted]
    quality = any(r.metrics for r in records)
    front = pareto_front(records)
    rows = []
    for i, r in enumerate(records):
        m = r.measurement
        size = r.size_ratio
        rows.append([
            r.model, r.prune, r.form_label, r.runtime, *(cell(r) for _, cell in shown), str(r.batch_size),
            str(r.threads), f"{m.percentile_ms(50):.4f}", _tail(m, 90), _tail(m, 99), speedup_cell(r),
            f"{m.throughput_items_per_s:,.0f}", f"{r.disk_bytes / MB:.3f}", "" if size is None else f"{size:.2f}x",
            *([quality_cell(r)] if quality else []), f"{r.peak_rss_bytes / MB:.1f}", f"{r.nonzero_parameters:,}",
            f"{r.parity_max_abs_error:.1e}" + (" WRONG" if r.wrong else ""), "*" if i in front else "",
        ])
    headers = BENCH_HEADERS[:4] + [name for name, _ in shown] + BENCH_HEADERS[4:13]
    return headers + (["quality"] if quality else []) + BENCH_HEADERS[13:], rows


def bench_table(records: Sequence[BenchRecord], tablefmt: str = "simple", quiet: bool = False) -> str:
    """The rows as a text table (or Markdown, with tablefmt="github"), then notes on how far to trust them
    (`quiet`: the warnings only)."""
    headers, rows = bench_rows(records)
    left = ("model", "plan", "form", "runtime", "device", "stage", "quality", "speedup")
    table = tabulate(rows, headers=headers, disable_numparse=True, tablefmt=tablefmt,
                     colalign=tuple("left" if h in left else "right" for h in headers))
    separator = "\n" if tablefmt == "simple" else "\n\n"  # Markdown needs paragraphs
    return table + "".join(separator + n for n in bench_notes(records) if not (quiet and n.startswith("note: ")))


def bench_notes(records: Sequence[BenchRecord]) -> list[str]:
    """What the table's marks mean, and how far to trust its figures: "note: ..." and "warning: ..." lines."""
    notes = []
    if any(r.baseline for r in records):
        notes.append("note: speedup = the baseline's p50 / the row's, per interleaved round (same runtime, batch, "
                     "threads), median over rounds [95% interval]; size = the row's files / the baseline's; "
                     "'~' marks a wide interval or a noisy row, '!' a row measured while other work ran")
    else:
        notes.append("note: no unpruned baseline in this run: no speedup or size ratio (bench --model measures one; "
                     "with DIRs, add the unpruned artifact or --baseline DIR)")
    notes.append("note: pareto '*': no other variant of the same runtime, batch and threads is at once as fast, as "
                 "small and as good (parity-failing rows excluded)")
    if any(r.precision != "f32" for r in records):
        notes.append("note: rows in another precision than f32 carry the quality measured in it; their parity error is "
                     "against the f32 PyTorch model and is not held to the f32 tolerance")
    notes += [f"note: {line}" for line in fastest_runtimes(records)]
    thin = {q for r in records for q in (90, 99) if not r.measurement.enough_samples_for(q)}
    if thin:
        notes.append("note: " + ", ".join(f"p{q} needs >= {required_samples(q)} samples" for q in sorted(thin))
                     + "; '-' marks rows with fewer (raise --min-iters or --min-time)")
    overhead = sorted(r.measurement.overhead_ns for r in records)
    if overhead:
        fastest = min(r.measurement.median_ms for r in records)
        notes.append(f"note: harness overhead {overhead[len(overhead) // 2] / 1e3:.2f} us per sample (median over "
                     f"rows), {100 * overhead[len(overhead) // 2] / 1e6 / fastest:.2f}% of the fastest p50")
    notes += _problem_notes(records)
    busy = [r for r in records if _disturbed(r)]
    if busy:
        worst = max(max(r.load.get(w, {}).get("others_busy_cores", 0.0) for w in ("before", "during")) for r in busy)
        notes.append(f"warning: {len(busy)} of {len(records)} rows were measured while other work ran (up to "
                     f"{worst:.2f} cores busy with it): their times may be inflated; compare ratios taken in one run")
    wrong = [r for r in records if r.wrong]
    if wrong:
        notes.append(f"warning: {len(wrong)} of {len(records)} rows are marked WRONG: their outputs differ from the "
                     "reference beyond the parity tolerance, so their speed is not the model's")
    slower = [r for r in records if not r.baseline and r.speedup is not None and r.speedup < 1]
    if slower:
        notes.append(f"warning: {len(slower)} of {len(records)} rows run slower than the unpruned baseline: " + "; ".join(
            f"{row_label(r)}: {r.versus.speedup:.2f}x" + (" (within noise: its interval reaches 1x)" if r.versus.speedup_ci95()[1] >= 1
                                          else "") for r in slower))
    if any(r.runtime == "torch" and r.stage in ("decoder-step", "greedy") for r in records):
        notes.append("note: torch's decoder-step and greedy rows time ESPnet's own decoding, which recomputes the "
                     "whole prefix at every step (the export against ESPnet as it runs); decoder-step-cached and "
                     "greedy-cached time the export's algorithm (keys and values cached) under PyTorch: set those "
                     "beside onnxruntime's decoder-step and greedy to compare runtimes")
    if any(r.form in ("csr", "bsr") and r.runtime in ("onnxruntime", "openvino") for r in records):
        notes.append("note: onnxruntime and openvino densify sparse initializers when they load a model, and have no "
                     "block-sparse kernel for it: their csr and bsr rows run dense kernels (the file is smaller, the time "
                     "is dense time)")
    return notes


CSV_HEADERS = ["profile", "model", "prune", "sparsity", "form", "runtime", "stage", "device", "batch",
               "sequence_length", "graph_optimization", "precision", "threads",
               "p50_ms", "p50_ci95_low_ms", "p50_ci95_high_ms", "p90_ms", "p99_ms", "iqr_ms", "samples",
               "items_per_s", "peak_rss_bytes", "disk_bytes", "parameters", "nonzero_parameters", "parity",
               "baseline", "speedup", "speedup_ci95_low", "speedup_ci95_high", "size_ratio", "metrics",
               "quality_change", "pareto"]


def bench_csv(records: Sequence[BenchRecord]) -> str:
    """One line per record with unformatted numbers (ms, bytes), for spreadsheets."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADERS)
    front = pareto_front(records)
    for i, r in enumerate(records):
        m = r.measurement
        low, high = m.median_ci_ms()
        interval = (r.versus.speedup_ci95() if r.versus else None) or ("", "")
        writer.writerow([r.profile, r.model, r.prune, r.sparsity, r.form_label, r.runtime, r.stage, r.device, r.batch_size,
                         r.sequence_length or "", r.graph_optimization, r.precision, r.threads, m.median_ms, low, high,
                         m.percentile_ms(90) if m.enough_samples_for(90) else "",
                         m.percentile_ms(99) if m.enough_samples_for(99) else "", m.iqr_ms, len(m.samples_ns),
                         m.throughput_items_per_s, r.peak_rss_bytes, r.disk_bytes, r.parameters,
                         r.nonzero_parameters, r.parity_max_abs_error, int(r.baseline),
                         "" if r.speedup is None else r.speedup, *interval,
                         "" if r.size_ratio is None else r.size_ratio,
                         json.dumps(r.metrics, sort_keys=True) if r.metrics else "",
                         json.dumps(r.quality_change(), sort_keys=True) if r.quality_change() else "", int(i in front)])
    return out.getvalue()


def configuration_key(r: BenchRecord) -> tuple:
    """What makes two records the same configuration (in two runs, or on two machines)."""
    return (r.model, r.prune, r.form, r.quantization, r.runtime, r.device, r.graph_optimization, r.precision, r.stage,
            r.batch_size, r.sequence_length, r.threads)


def compare_table(base: Sequence[BenchRecord], others: Sequence[tuple[str, Sequence[BenchRecord]]], base_label: str,
                  tablefmt: str = "simple") -> str:
    """Configurations of the base run measured in at least one other run (another machine: a column
    per profile), side by side: p50 of each and each other / base.

    Ratios across runs (or machines) compare conditions as well as code: on a noisy machine only
    ratios taken within one run are firm, which the footer says.
    """
    theirs = [{configuration_key(r): r for r in records} for _, records in others]
    rows = []
    for r in base:
        matches = [mine.get(configuration_key(r)) for mine in theirs]
        if not any(matches):
            continue
        a = r.measurement.median_ms
        rows.append([r.model, r.prune, r.form_label, r.runtime, r.precision, r.device, r.stage, r.batch_size,
                     r.sequence_length or "", r.threads, f"{a:.4f}"]
                    + [cell for m in matches for cell in ((f"{m.measurement.median_ms:.4f}",
                                                           f"{m.measurement.median_ms / a:.2f}x") if m else ("", ""))])
    labels = [label for label, _ in others]
    if not rows:
        raise UsageError(f"{base_label} and {', '.join(labels)} share no configuration (model, plan, form, runtime, "
                         "device, stage, batch, length, threads)")
    table = tabulate(rows, tablefmt=tablefmt, disable_numparse=True, headers=[
        "model", "prune", "form", "runtime", "precision", "device", "stage", "batch", "length", "threads",
        f"p50 ms {base_label}",
        *[h for label in labels for h in (f"p50 ms {label}", f"{label} / {base_label}")]])
    notes = [f"{len(base) - len(rows)} configurations of {base_label} measured in none of the others"
             if len(base) > len(rows) else ""]
    for (label, records), mine in zip(others, theirs):
        missing = len(set(mine) - {configuration_key(r) for r in base})
        if missing:
            notes.append(f"{missing} configurations of {label} not measured in {base_label}")
    notes.append("ratios across runs compare machines and conditions as well as code; only ratios within one run "
                 "are firm")
    # per profile, the runtime and precision each machine ran fastest
    notes += fastest_runtimes([*base, *(r for _, records in others for r in records)])
    return table + "".join(f"\n{n}" for n in notes if n)


def fastest_runtimes(records: Sequence[BenchRecord]) -> list[str]:
    """Per profile and configuration measured under more than one runtime or precision: which ran it
    fastest (lowest p50; rows with wrong outputs left out), by how much over the next, and, where it
    computed in another precision than f32, its quality beside f32's."""
    groups: dict[tuple, list[BenchRecord]] = {}
    for r in records:
        if not r.wrong:
            key = (r.profile, r.model, r.prune, r.form_label, r.stage, r.batch_size, r.sequence_length, r.threads)
            groups.setdefault(key, []).append(r)
    lines = []
    for (profile, model, prune, form, stage, batch, length, threads), rows in groups.items():
        if len({(r.runtime, r.precision) for r in rows}) < 2:
            continue
        best, runner_up = sorted(rows, key=lambda r: r.measurement.median_ms)[:2]
        f32 = next((r for r in rows if r.runtime == best.runtime and r.precision == "f32" and r.metrics), None)
        quality = ""
        if best.precision != "f32" and best.metrics:
            quality = "; " + ", ".join(f"{name} {value:.4f}" + (f" (f32 {f32.metrics[name]:.4f})"
                                                                 if f32 and name in f32.metrics else "")
                                       for name, value in best.metrics.items())
        lines.append(f"fastest on {profile}: {model} {prune} {form}" + (f" {stage}" if stage != "forward" else "")
                     + f" batch {batch}" + (f" length {length}" if length else "") + f" {threads} threads: "
                     f"{_runtime_label(best)} (p50 {best.measurement.median_ms:.4f} ms, "
                     f"{runner_up.measurement.median_ms / best.measurement.median_ms:.2f}x faster than "
                     f"{_runtime_label(runner_up)}){quality}")
    return lines


def _runtime_label(r: BenchRecord) -> str:
    return f"{r.runtime} {r.precision}" + (f" ({r.device})" if r.device not in CPU_DEVICES else "")


def row_label(r: BenchRecord) -> str:
    """A row named so that it can be found in the table: model, plan, form, runtime (and stage), batch,
    threads and length."""
    return (f"{r.model} {r.prune} {r.form_label} {r.runtime}{'' if r.stage == 'forward' else ' ' + r.stage} "
            f"batch {r.batch_size} {r.threads} thread{'s' * (r.threads != 1)}"
            + (f" length {r.sequence_length}" if r.sequence_length else ""))


def _problem_notes(records: Sequence[BenchRecord]) -> list[str]:
    """One warning per kind of problem, naming the rows it affects, with the remedy once."""
    notes = []
    for kind, remedy in REMEDIES.items():
        hit = [r for r in records if kind in r.measurement.problems()]
        if hit:
            rows = "; ".join(f"{row_label(r)}: {r.measurement.problems()[kind]}" for r in hit)
            notes.append(f"warning: {len(hit)} of {len(records)} rows {remedy}. Rows: {rows}")
    return notes


def _disturbed(record: BenchRecord) -> bool:
    return any(Load(**record.load[when]).disturbed for when in ("before", "during") if when in record.load)


def _tail(m, q: float) -> str:
    return f"{m.percentile_ms(q):.4f}" if m.enough_samples_for(q) else "-"


def audit_table(report, layers: bool = True) -> str:
    """Per-tensor storage (with `layers`), totals and budget checks of an `AuditReport`."""
    text = ""
    if layers:
        rows = [[r.parameter + (" (buffer)" if r.buffer else ""), "x".join(map(str, r.shape)), r.numel, r.nonzero,
                 f"{100 * r.sparsity:.2f}%", r.storage, r.stored_bytes] for r in report.rows]
        rows.append(["total", "", sum(r.numel for r in report.rows), sum(r.nonzero for r in report.rows), "", "",
                     sum(r.stored_bytes for r in report.rows)])
        text = tabulate(rows, headers=["tensor", "shape", "numel", "nnz", "sparsity", "storage", "bytes"],
                        colalign=("left", "left", "right", "right", "right", "left", "right")) + "\n\n"
    buffers = f", buffers {report.buffer_elements:,} elements apart" if report.buffer_elements else ""
    text += (f"{report.model} at {report.artifact}: parameters {report.parameters:,} (nonzero "
             f"{report.nonzero_parameters:,}{buffers}); weights {report.weights_bytes / MB:.3f} MB, "
             f"ONNX {report.onnx_bytes / MB:.3f} MB, disk {report.disk_bytes / MB:.3f} MB")
    if report.checks:
        text += "\n\n" + tabulate(
            [[c.name, f"{c.actual:,.4g}", f"{c.limit:,.4g}", "ok" if c.ok else "OVER"] for c in report.checks],
            headers=["budget", "actual", "limit", ""], disable_numparse=True)
        text += "\n\nverdict: " + ("within budget" if report.within_budget else "OVER BUDGET")
    return text


#: the version of `records_json`'s object; a reader checks it before reading the records
JSON_SCHEMA = "deploykit.bench/2"


def records_json(records: Sequence[BenchRecord], run_id: int | None = None, failures: Sequence = ()) -> str:
    """The records as one JSON object: schema version, run id (None where the run was not stored), the
    notes and warnings printed under the table, the records (each with `pareto`) and failed configurations."""
    records = list(records)
    notes = bench_notes(records) if records else []
    front = pareto_front(records)
    return json.dumps({
        "schema": JSON_SCHEMA,
        "run": run_id,
        "notes": [n.removeprefix("note: ") for n in notes if n.startswith("note: ")],
        "warnings": [n.removeprefix("warning: ") for n in notes if n.startswith("warning: ")],
        "records": [{**r.to_dict(), "pareto": i in front} for i, r in enumerate(records)],
        "failures": [f.to_dict() for f in failures],
    }, indent=2) + "\n"


def failures_text(failures) -> str:
    """One line per configuration that failed, for the terminal or a report."""
    return "\n".join(f"failed: {f.label}: {f.error}" for f in failures)
