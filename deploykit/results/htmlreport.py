"""The HTML report: one self-contained page per stored run, with the plots the pruning studies drew.

Plots, per model: quality (accuracy) against sparsity, disk size and latency, with each runtime's
Pareto front drawn; size against sparsity; speedup over the unpruned model with its interval;
latency against sparsity per runtime; latency against batch size, threads and sequence length where
the run swept them (the other axes held at a value the caption names); every method's line starts
at the unpruned model, noisy points are hollow; and, given a second run (another profile, another
revision), both runs' latencies side by side. Below them, the
run's table and its notes on how far to trust the figures. No scripts, no external resources: the
page is HTML, CSS and inline SVG (`deploykit.results.svgplot`).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from html import escape
from typing import Callable, Sequence

from tabulate import tabulate

from deploykit.bench.records import BenchRecord
from deploykit.results.pick import better_direction, dominates
from deploykit.results.report import MB, bench_notes, bench_rows, configuration_key
from deploykit.results.svgplot import Axis, Point, Series, bar_plot, line_plot

#: the fields that tell one series from another, in the order labels name them
_SERIES_FIELDS: dict[str, Callable[[BenchRecord], object]] = {
    "model": lambda r: r.model,
    "method": lambda r: r.prune.split(":")[0],
    "sparsity": lambda r: f"{r.sparsity:g}",
    "form": lambda r: r.form_label,
    "runtime": lambda r: r.runtime,
    "device": lambda r: r.device,
    "stage": lambda r: r.stage,
    "batch": lambda r: f"batch {r.batch_size}",
    "threads": lambda r: f"{r.threads} threads",
    "length": lambda r: f"length {r.sequence_length}" if r.sequence_length else "own length",
}

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1360px; padding: 0 16px; color: #1b1b1b; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; }
dt { color: #555; } dd { margin: 0; font-family: ui-monospace, monospace; font-size: 13px; }
.dk-plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 18px; }
figure { margin: 0; } figcaption { color: #444; font-size: 13px; }
svg.dk-plot { width: 100%; height: auto; font-size: 12px; background: #fff; }
.dk-area { fill: #fafafa; stroke: #999; } .dk-grid { stroke: #e3e3e3; }
.dk-title { font-weight: 600; font-size: 14px; } .dk-tick { fill: #444; } .dk-axis { fill: #222; }
.dk-line { fill: none; stroke-width: 1.6; } .dk-legend text { fill: #222; }
table { border-collapse: collapse; font-size: 12px; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; }
td { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f2f2f2; }
.dk-notes { font-size: 13px; color: #333; white-space: pre-wrap; }
.dk-missing { color: #7a4a00; }
"""


def html_report(run, others=()) -> str:
    """The page for a stored `run` (deploykit.results.store.Run); with `others` (other machines' runs,
    say), a comparison with each."""
    records = list(run.records)
    figures = _per_model(_quality_figures, records) + _per_model(_latency_figures, records)
    for other in others:
        figures += _comparison_figures(run, other)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>deploykit run {run.id} on {escape(run.profile)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>deploykit benchmark: run {run.id} on {escape(run.profile)}</h1>",
        _conditions(run),
        "<h2>Plots</h2>",
        '<div class="dk-plots">' + "\n".join(figures) + "</div>",
        *(_missing_quality(records)),
        "<h2>Measurements</h2>",
        _table(records),
        f'<p class="dk-notes">{escape(_notes(records))}</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _conditions(run) -> str:
    versions = run.conditions.get("versions", {})
    rows = [("profile", run.profile), ("status", run.status), ("started (UTC)", run.started_utc),
            ("finished (UTC)", run.finished_utc), ("command", run.command),
            ("deploykit revision", run.git_revision or "not from a git checkout"),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))]
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows) + "</dl>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _varying(records: Sequence[BenchRecord], fields: Sequence[str]) -> list[str]:
    """Those of `fields` that tell records apart (a device only where one runtime ran on several)."""
    def varies(name: str) -> bool:
        get = _SERIES_FIELDS[name]
        if name == "device":
            return any(len({get(r) for r in records if r.runtime == rt}) > 1 for rt in {r.runtime for r in records})
        return len({get(r) for r in records}) > 1

    return [name for name in fields if varies(name)]


def _series(records: Sequence[BenchRecord], x: Callable[[BenchRecord], float], y: Callable[[BenchRecord], float],
            fields: Sequence[str], line: bool = True,
            interval: Callable[[BenchRecord], tuple[float, float] | None] = lambda r: None) -> list[Series]:
    """One series per combination of `fields` that vary among the records; noisy rows drawn hollow,
    `interval` (where it gives one) drawn as a bar."""
    shown = _varying(records, fields)
    grouped: dict[tuple, list[BenchRecord]] = defaultdict(list)
    for r in records:
        grouped[tuple(_SERIES_FIELDS[f](r) for f in shown)].append(r)
    return [Series(" ".join(map(str, key)) or "all", tuple(_point(r, x, y, interval) for r in group), line)
            for key, group in grouped.items()]


def _point(r: BenchRecord, x, y, interval) -> Point:
    low, high = interval(r) or (None, None)
    noisy = "noisy" in r.measurement.problems() or bool(r.versus and r.versus.noisy and interval(r))
    return Point(x(r), y(r), _describe(r) + (" (noisy)" if noisy else ""), low, high, noisy)


def _typical_dispersion(records: Sequence[BenchRecord]) -> float:
    return statistics.median(r.measurement.dispersion for r in records)


def _quietest(records: Sequence[BenchRecord], values: set) -> int:
    """The thread count whose rows were measured with the least dispersion."""
    return min(values, key=lambda t: (_typical_dispersion([r for r in records if r.threads == t]), t))


#: axes a plot does not show are held at one value: the smallest batch, the thread count measured
#: with the least noise, the model's own (or shortest) length
_HELD = {
    "batch": (lambda r: r.batch_size, lambda records, values: min(values)),
    "threads": (lambda r: r.threads, _quietest),
    "length": (lambda r: r.sequence_length or 0, lambda records, values: min(values)),
}


def _held(records: Sequence[BenchRecord], shown: str = "") -> tuple[list[BenchRecord], str]:
    """The records at one value of each swept axis other than `shown`, and words saying which."""
    kept = list(records)
    said = []
    for name, (get, pick) in _HELD.items():
        values = {get(r) for r in kept}
        if name == shown or len(values) < 2:
            continue
        value = pick(kept, values)
        kept = [r for r in kept if get(r) == value]
        said.append(_SERIES_FIELDS[name](kept[0]))
    return kept, (" At " + ", ".join(said) + "." if said else "")


def _configuration(r: BenchRecord) -> str:
    stage = "" if r.stage == "forward" else f" {r.stage}"
    length = f" length {r.sequence_length}" if r.sequence_length else ""
    return f"{r.model} {r.prune} {r.form_label} {r.runtime} ({r.device}){stage} batch {r.batch_size}{length} threads {r.threads}"


def _from_baseline(records: Sequence[BenchRecord]) -> list[BenchRecord]:
    """The records with the unpruned model's (plan "none") put at the start of each pruning method's
    line: once per (method, form) the run pruned with, so no line starts at its first pruned point."""
    variants = {(r.model, r.prune.split(":")[0], r.form) for r in records if r.prune != "none"}
    out = [r for r in records if r.prune != "none"]
    for r in records:
        if r.prune == "none":
            copies = [dataclasses.replace(r, prune=f"{method}:0", form=form, quantization="")
                      for model, method, form in sorted(variants) if model == r.model]
            out += copies or [r]
    return out


def _describe(r: BenchRecord) -> str:
    if r.sparsity == 0 and (r.baseline or r.prune.endswith(":0")):
        return f"the unpruned model ({r.artifact}): p50 {r.measurement.median_ms:.4f} ms, disk {r.disk_bytes / MB:.3f} MB"
    metrics = "".join(f", {k} {v:.4f}" for k, v in r.metrics.items())
    return (f"{_configuration(r)}: p50 {r.measurement.median_ms:.4f} ms, disk {r.disk_bytes / MB:.3f} MB, "
            f"sparsity {100 * r.overall_sparsity:.1f}%{metrics}")


def _metric(records: Sequence[BenchRecord]) -> str | None:
    """The quality metric to plot: accuracy where measured, else the first one any record has."""
    names = [k for r in records for k in r.metrics]
    return "accuracy" if "accuracy" in names else (names[0] if names else None)


def _per_model(figures: Callable[[Sequence[BenchRecord], str], list[str]],
               records: Sequence[BenchRecord]) -> list[str]:
    """`figures` of each model's records on its own (a line never joins two models' points)."""
    models = sorted({r.model for r in records})
    if len(models) == 1:
        return figures(records, "")
    return [f for i, model in enumerate(models) for f in figures([r for r in records if r.model == model],
                                                                   f"-{i + 1}")]


def _front(records: Sequence[BenchRecord], cost: Callable[[BenchRecord], float], metric: str) -> list[BenchRecord]:
    """The records no other beats on `cost` (lower) and `metric` (better) at once, in one runtime."""
    direction = better_direction(metric)
    kept = [r for r in records if not r.wrong]
    scores = {id(r): (cost(r), -direction * r.metrics[metric]) for r in kept}
    return [r for r in kept if not any(dominates(scores[id(o)], scores[id(r)]) for o in kept if o is not r)]


def _with_fronts(series: list[Series], records: Sequence[BenchRecord], x: Callable[[BenchRecord], float],
                 metric: str) -> list[Series]:
    """`series`, and the Pareto front of each runtime's records drawn as a line of its own."""
    fronts = []
    for runtime in sorted({r.runtime for r in records}):
        front = _front([r for r in records if r.runtime == runtime], x, metric)
        if len(front) > 1:
            fronts.append(Series(f"Pareto front, {runtime}", tuple(
                Point(x(r), r.metrics[metric], "on the front: " + _describe(r)) for r in front), markers=False))
    return series + fronts


def _quality_figures(records: Sequence[BenchRecord], suffix: str = "") -> list[str]:
    metric = _metric(records)
    if metric is None:
        return []
    scored, held = _held([r for r in records if metric in r.metrics])
    title = f" ({scored[0].model})" if suffix else ""

    def quality(r: BenchRecord) -> float:
        return r.metrics[metric]

    def disk(r: BenchRecord) -> float:
        return r.disk_bytes / MB

    def p50(r: BenchRecord) -> float:
        return r.measurement.median_ms

    # quality belongs to the weights, not to the form or the runtime: one point per pruning plan
    plans = list({(r.model, r.prune): r for r in _from_baseline(scored)}.values())
    sized = list({(r.artifact, r.runtime): r for r in scored}.values())
    return [
        _figure(line_plot(f"dk-quality-sparsity{suffix}", f"{metric} vs sparsity{title}",
                          _series(plans, lambda r: 100 * r.overall_sparsity, quality, ("model", "method")),
                          Axis("zeros over all parameters (%)"), Axis(metric)),
                f"{metric} of each pruned model against its measured sparsity, one line per pruning method, each "
                "starting at the unpruned model."),
        _figure(line_plot(f"dk-quality-disk{suffix}", f"{metric} vs disk size{title}",
                          _with_fronts(_series(sized, disk, quality, ("model", "runtime", "form"), line=False), sized,
                                       disk, metric),
                          Axis("files the runtime loads (MB)"), Axis(metric)),
                "What each runtime loads: the weights file for torch, the ONNX files for onnxruntime; the line of "
                "each runtime joins its Pareto front (no variant both smaller and better). Hover a point for its "
                "configuration."),
        _figure(line_plot(f"dk-quality-latency{suffix}", f"{metric} vs latency{title}",
                          _with_fronts(_series(scored, p50, quality, ("model", "runtime", "device", "form", "stage"),
                                               line=False), scored, p50, metric),
                          Axis("p50 latency (ms)", log=True), Axis(metric)),
                "Median latency per call; the line of each runtime joins its Pareto front (no variant both faster "
                "and better); hollow points were noisy." + held),
    ]


def _missing_quality(records: Sequence[BenchRecord]) -> list[str]:
    if _metric(records) is not None:
        return []
    models = ", ".join(sorted({r.model for r in records}))
    return [f'<p class="dk-missing">No quality plots: {escape(models)} reported no accuracy (its model spec has no '
            "evaluation, as untrained models do not). lenet-300-100 and lenet-5 are trained and evaluated on "
            "the UCI handwritten digits (shipped with deploykit).</p>"]


#: what tells latency series apart, besides the plot's x axis
_LATENCY_FIELDS = ("model", "method", "sparsity", "runtime", "device", "form", "stage")


def _latency_figures(records: Sequence[BenchRecord], suffix: str = "") -> list[str]:
    def p50(r: BenchRecord) -> float:
        return r.measurement.median_ms

    title = f" ({records[0].model})" if suffix else ""
    figures = []
    kept, held = _held(records)
    fields = [f for f in _LATENCY_FIELDS if f != "sparsity"]
    joined = _from_baseline(kept)
    figures.append(_figure(line_plot(
        f"dk-size-sparsity{suffix}", f"Size vs sparsity{title}",
        _series(joined, lambda r: 100 * r.sparsity, lambda r: r.disk_bytes / MB, ("model", "method", "runtime", "form")),
        Axis("target sparsity (%)"), Axis("files the runtime loads (MB)")),
        "What each runtime loads, against the sparsity asked of the pruner; every method's line starts at the "
        "unpruned model." + held))
    compared = [r for r in joined if r.speedup is not None]
    if any(not r.baseline for r in compared):
        figures.append(_figure(line_plot(
            f"dk-speedup-sparsity{suffix}", f"Speedup over the unpruned model{title}",
            _series(compared, lambda r: 100 * r.sparsity, lambda r: r.speedup, fields,
                    interval=lambda r: r.versus.speedup_ci95() if r.versus else None),
            Axis("target sparsity (%)"), Axis("speedup (x the unpruned model's speed)")),
            "The unpruned model's p50 over each variant's, per interleaved round, median and 95% interval (the bar); "
            "1 is the unpruned model, below 1 slower; hollow points are noisy." + held))
    if len({r.sparsity for r in records}) > 1:
        figures.append(_figure(line_plot(
            f"dk-latency-sparsity{suffix}", f"Latency vs sparsity, per runtime{title}",
            _series(joined, lambda r: 100 * r.sparsity, p50, fields),
            Axis("target sparsity (%)"), Axis("p50 latency (ms)", log=True)),
            "Median latency against the sparsity asked of the pruner, one line per method, runtime and form, each "
            "starting at the unpruned model; hollow points were noisy." + held))
    for name, x, axis, caption in (
        ("batch", lambda r: r.batch_size, Axis("batch size", log=True), "Median latency of one call by batch size."),
        ("threads", lambda r: r.threads, Axis("threads"), "Median latency of one call by thread count."),
        ("length", lambda r: r.sequence_length, Axis("sequence length"),
         "Median latency by the length set on every sequence axis."),
    ):
        get = _HELD[name][0]
        if len({get(r) for r in records}) > 1 and (name != "length" or all(r.sequence_length for r in records)):
            kept, held = _held(records, shown=name)
            figures.append(_figure(line_plot(
                f"dk-latency-{name}{suffix}", f"Latency vs {axis.label}{title}", _series(kept, x, p50, _LATENCY_FIELDS),
                axis, Axis("p50 latency (ms)", log=True)), caption + " Hollow points were noisy." + held))
    return figures


def _comparison_figures(run, other) -> list[str]:
    theirs = {configuration_key(r): r for r in other.records}
    pairs = [(r, theirs[configuration_key(r)]) for r in run.records if configuration_key(r) in theirs]
    if not pairs:
        return [f'<p class="dk-missing">Runs {run.id} and {other.id} share no configuration to compare.</p>']
    labels = [f"run {run.id} ({run.profile})", f"run {other.id} ({other.profile})"]
    groups = [_configuration(a) for a, _ in pairs]
    values = [[a.measurement.median_ms for a, _ in pairs], [b.measurement.median_ms for _, b in pairs]]
    notes = [[f"{labels[k]}: {g}: p50 {v:.4f} ms" for g, v in zip(groups, values[k])] for k in range(2)]
    svg = bar_plot("dk-compare", "Latency per configuration, two runs", groups, list(zip(labels, values)),
                   Axis("p50 latency (ms)", log=True), notes)
    rows = [[i + 1, g, f"{a.measurement.median_ms:.4f}", f"{b.measurement.median_ms:.4f}",
             f"{b.measurement.median_ms / a.measurement.median_ms:.2f}x"] for i, (g, (a, b)) in enumerate(zip(groups, pairs))]
    table = tabulate(rows, headers=["#", "configuration", f"p50 ms {labels[0]}", f"p50 ms {labels[1]}", "ratio"],
                     tablefmt="html", disable_numparse=True)
    caption = (f"Configurations measured in both runs; ratio = {labels[1]} / {labels[0]}. Across machines or runs "
               "conditions differ as well as code: only ratios within one run are firm.")
    return [_figure(svg, caption) + table]


def _table(records: Sequence[BenchRecord]) -> str:
    headers, rows = bench_rows(records)
    return tabulate(rows, headers=headers, tablefmt="html", disable_numparse=True)


def _notes(records: Sequence[BenchRecord]) -> str:
    """The notes under the terminal table (sample counts, harness overhead, noise warnings)."""
    return "\n".join(bench_notes(records))
