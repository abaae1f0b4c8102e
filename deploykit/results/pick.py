"""The answer a release needs: which variants are worth shipping (the Pareto front), and which one to ship.

Variants are compared within one configuration (`slice_key`: profile, model, runtime, device, graph
optimisation, stage, batch, threads, length), where their p50s were measured in the same interleaved
rounds. A variant is on the front when no other variant of its slice is at least as fast, as small
and as good at once and better in one of them. Speed is the p50, size the bytes the runtime loads,
quality the model's first metric (`primary_metric`) where every variant of the slice has it. Rows
whose outputs are wrong (parity) are never on the front and never picked.

`pick` applies a release's constraints (quality drop against the baseline, size, speedup) and an
objective, per slice, and says why each other variant lost.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from deploykit.bench.records import BenchRecord
from deploykit.core.errors import UsageError

#: words of metric names where lower is better ("perplexity", "val_loss", "error_rate", "wer"); every
#: other metric is better higher ("accuracy", "bleu", "token_accuracy", "answer_f1")
LOWER_IS_BETTER = frozenset({"perplexity", "ppl", "loss", "error", "err", "wer", "cer", "mse", "mae", "rmse"})
MB = 1e6


def ratio_text(value: float, low: float, high: float) -> str:
    """A speedup with its interval, as every output writes one: "1.23x [1.10-1.31]"."""
    return f"{value:.2f}x [{low:.2f}-{high:.2f}]"


def better_direction(metric: str) -> int:
    """+1 where a higher value of `metric` is better, -1 where a lower one is."""
    return -1 if LOWER_IS_BETTER & set(re.split(r"[^a-z0-9]+", metric.lower())) else 1


def slice_key(r: BenchRecord) -> tuple:
    """What two variants must share for their figures to be compared."""
    return (r.profile, r.model, r.runtime, r.device, r.graph_optimization, r.precision, r.stage, r.batch_size,
            r.threads, r.sequence_length)


def primary_metric(records: Sequence[BenchRecord]) -> str | None:
    """The quality metric the slice is judged by: the first metric every record has."""
    if not records or not records[0].metrics:
        return None
    return next((name for name in records[0].metrics if all(name in r.metrics for r in records)), None)


def _scores(records: Sequence[BenchRecord]) -> list[tuple[float, ...]]:
    """Per record, its objectives as values where lower is better."""
    metric = primary_metric(records)
    return [(r.measurement.median_ms, float(r.disk_bytes),
             *((-better_direction(metric) * r.metrics[metric],) if metric else ())) for r in records]


def pareto_front(records: Sequence[BenchRecord]) -> set[int]:
    """Indices (into `records`) of the variants no other variant of their slice beats on speed, size
    and quality at once."""
    slices: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if not r.wrong:
            slices[slice_key(r)].append(i)
    front = set()
    for members in slices.values():
        scores = dict(zip(members, _scores([records[i] for i in members])))
        for i in members:
            if not any(dominates(scores[j], scores[i]) for j in members if j != i):
                front.add(i)
    return front


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether scores `a` (lower better in each) are nowhere worse than `b` and somewhere better."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@dataclass(frozen=True)
class Constraints:
    """What a variant must satisfy to ship, and what is then optimised."""

    #: most quality a variant may lose against the baseline, in the metric's units, or (relative)
    #: as a share of the baseline's value; None: no limit
    max_quality_drop: float | None = None
    relative_quality_drop: bool = False
    max_size_mb: float | None = None
    min_speedup: float | None = None
    #: "latency" (the smallest p50) or "size" (the fewest bytes, then the smallest p50)
    objective: str = "latency"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown --objective {self.objective!r}; known: {', '.join(OBJECTIVES)}")
        for name, value in (("--max-quality-drop", self.max_quality_drop), ("--max-size-mb", self.max_size_mb),
                            ("--min-speedup", self.min_speedup)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {value:g}")
        if self.max_size_mb == 0 or self.min_speedup == 0:
            raise UsageError("--max-size-mb 0 admits no variant and --min-speedup 0 admits every one: give a "
                             "positive limit")
        if self.relative_quality_drop and self.max_quality_drop is not None and self.max_quality_drop >= 1:
            raise UsageError(f"--max-quality-drop {100 * self.max_quality_drop:g}% would allow losing all of the "
                             "baseline's quality: give a share under 100%")

    @classmethod
    def parse_quality_drop(cls, text: str) -> tuple[float, bool]:
        """"0.01" (metric units) or "2%" (of the baseline's value) -> (value, relative)."""
        relative = text.strip().endswith("%")
        try:
            value = float(text.strip().rstrip("%"))
        except ValueError:
            raise UsageError(f"--max-quality-drop takes a number (metric units) or a percentage (e.g. 2%), got "
                             f"{text!r}") from None
        return (value / 100 if relative else value), relative


OBJECTIVES = ("latency", "size")


@dataclass(frozen=True)
class Choice:
    """The pick of one slice: the record chosen (None: nothing satisfies) and why each other lost."""

    key: tuple
    chosen: BenchRecord | None
    #: (record, why it was not chosen) for every other variant of the slice
    rejected: tuple[tuple[BenchRecord, str], ...]


def _why_not(r: BenchRecord, c: Constraints) -> str | None:
    """Why `r` may not ship under `c` (None: it may)."""
    if r.wrong:
        return f"wrong outputs (parity error {r.parity_max_abs_error:.1e} over {r.parity_tolerance:g})"
    if c.max_size_mb is not None and r.disk_bytes / MB > c.max_size_mb:
        return f"{r.disk_bytes / MB:.3f} MB over --max-size-mb {c.max_size_mb:g}"
    if c.min_speedup is not None:
        if r.speedup is None:
            return "no speedup measured (no baseline in its run)"
        if r.speedup < c.min_speedup:
            return f"speedup {r.speedup:.2f}x under --min-speedup {c.min_speedup:g}"
        low = r.versus.speedup_ci95()[0] if r.versus else r.speedup
        if low < c.min_speedup:  # a gate decides on what the rounds show for sure, not on their median
            return (f"speedup {r.speedup:.2f}x, but its 95% interval reaches {low:.2f}x, under --min-speedup "
                    f"{c.min_speedup:g} (noisy: raise --timing-rounds, or measure on a quieter machine)")
    if c.max_quality_drop is not None and not r.baseline:
        metric = next(iter(r.quality_change()), None)
        if metric is None:
            return "no quality measured against a baseline (the model has no evaluator, or the run no baseline)"
        drop = better_direction(metric) * -r.quality_change()[metric]
        allowed = c.max_quality_drop * (abs(r.versus.metrics[metric]) if c.relative_quality_drop else 1)
        if drop > allowed:
            return f"{metric} {r.metrics[metric]:.4f} loses {drop:.4f} against the baseline's, over {allowed:.4f}"
    return None


def _speed(r: BenchRecord, paired: bool) -> tuple[float, float, float]:
    """(value, low, high) of how fast `r` is, higher faster: its speedup over the baseline with the
    interval of its rounds where every variant of the slice has one (`paired`), else 1/p50 with the
    interval of its median."""
    if paired:
        if r.baseline:
            return 1.0, 1.0, 1.0
        low, high = r.versus.speedup_ci95()
        return r.speedup, low, high
    low, high = r.measurement.median_ci_ms()
    return 1 / r.measurement.median_ms, 1 / high, 1 / low


def _quality(r: BenchRecord, metric: str | None) -> float:
    return better_direction(metric) * r.metrics[metric] if metric else 0.0


def pick(records: Sequence[BenchRecord], constraints: Constraints) -> list[Choice]:
    """Per slice, the variant that satisfies `constraints` with the best objective.

    Latency: the fastest variant, and every variant whose interval reaches the fastest one's, are
    tied within the noise of the run; of those the one with the best quality (then the fewest bytes)
    is chosen: on a noisy machine the safe choice, said so in the reasons. Size: the fewest bytes,
    then the fastest."""
    slices: dict[tuple, list[BenchRecord]] = defaultdict(list)
    for r in records:
        slices[slice_key(r)].append(r)
    choices = []
    for key, members in slices.items():
        reasons = {id(r): _why_not(r, constraints) for r in members}
        allowed = [r for r in members if reasons[id(r)] is None]
        paired = all(r.baseline or (r.versus is not None and r.versus.speedup is not None) for r in allowed)
        metric = primary_metric(allowed)
        speed = {id(r): _speed(r, paired) for r in allowed}
        chosen, tied = None, []
        if allowed and constraints.objective == "size":
            chosen = min(allowed, key=lambda r: (r.disk_bytes, -speed[id(r)][0]))
        elif allowed:
            fastest = max(allowed, key=lambda r: speed[id(r)][0])
            tied = [r for r in allowed if speed[id(r)][2] >= speed[id(fastest)][1]]
            chosen = max(tied, key=lambda r: (_quality(r, metric), -r.disk_bytes, speed[id(r)][0]))
        rejected = []
        for r in members:
            if r is chosen:
                continue
            why = reasons[id(r)]
            if why is None and constraints.objective == "size":
                why = f"{r.disk_bytes / MB:.3f} MB against {chosen.disk_bytes / MB:.3f}"
            elif why is None and r in tied:
                why = ("as fast as the chosen within this run's noise (their intervals overlap), and not better in "
                       + (f"{metric}, then " if metric else "") + "size")
            elif why is None:
                why = f"slower: {_speed_words(speed[id(r)], paired)} against {_speed_words(speed[id(chosen)], paired)}"
            rejected.append((r, why))
        choices.append(Choice(key, chosen, tuple(rejected)))
    return choices


def _speed_words(speed: tuple[float, float, float], paired: bool) -> str:
    value, low, high = speed
    if paired:
        return ratio_text(value, low, high)
    return f"p50 {1 / value:.4f} ms [{1 / high:.4f}-{1 / low:.4f}]"


def _slice_label(key: tuple) -> str:
    profile, model, runtime, device, graph_optimization, precision, stage, batch, threads, length = key
    return (f"{profile}: {model} under {runtime} ({device})" + (f" at {precision}" if precision != "f32" else "")
            + (f" {stage}" if stage != "forward" else "")
            + f", batch {batch}" + (f", length {length}" if length else "") + f", {threads} threads")


def _variant(r: BenchRecord) -> str:
    speedup = "" if r.speedup is None else (", baseline" if r.baseline else f", {r.speedup:.2f}x the baseline's speed")
    metrics = "".join(f", {name} {value:.4f}" for name, value in r.metrics.items())
    return f"{r.prune} {r.form_label} (p50 {r.measurement.median_ms:.4f} ms{speedup}, {r.disk_bytes / MB:.3f} MB{metrics})"


def choices_text(choices: Sequence[Choice], constraints: Constraints) -> str:
    """Per slice, the variant to ship and why each other lost (or that none satisfies the constraints)."""
    asked = [f"{name} {value:g}" for name, value in (("--max-size-mb", constraints.max_size_mb),
                                                      ("--min-speedup", constraints.min_speedup)) if value is not None]
    if constraints.max_quality_drop is not None:
        drop = constraints.max_quality_drop
        asked.append(f"--max-quality-drop {100 * drop:g}%" if constraints.relative_quality_drop else
                     f"--max-quality-drop {drop:g}")
    lines = [f"pick: objective {constraints.objective}" + (f"; {', '.join(asked)}" if asked else "; no constraints")]
    for choice in choices:
        lines.append("")
        lines.append(_slice_label(choice.key) + ": " + (f"ship {_variant(choice.chosen)}" if choice.chosen
                                                        else "NOTHING satisfies the constraints"))
        lines += [f"  not {_variant(r)}: {why}" for r, why in choice.rejected]
    return "\n".join(lines)


SLICE_FIELDS = ("profile", "model", "runtime", "device", "graph_optimization", "precision", "stage", "batch_size",
                "threads", "sequence_length")


def choices_json(choices: Sequence[Choice], constraints: Constraints, run_id: int | None) -> str:
    """`choices_text` as one JSON object: the constraints, and per slice the chosen record (null: none
    qualifies) and each other variant with why it lost."""
    import dataclasses
    import json

    return json.dumps({
        "schema": "deploykit.pick/1",
        "run": run_id,
        "constraints": dataclasses.asdict(constraints),
        "choices": [{"slice": dict(zip(SLICE_FIELDS, c.key)),
                     "chosen": c.chosen.to_dict() if c.chosen else None,
                     "rejected": [{"record": r.to_dict(), "why": why} for r, why in c.rejected]} for c in choices],
    }, indent=2) + "\n"
