"""`--round-to auto`: the channel alignment of a dense-shrunk export, chosen by measurement.

Structured pruning leaves whatever widths its scores give (87, 12, 11 channels); onnxruntime's and
oneDNN's fast convolution and matmul paths want multiples of the vector width, and off them a model
with half the FLOPs can run several times slower than the unpruned one. Which alignment pays
depends on the layer types, the runtime and the machine, so, like csr's kernels, it is measured:
each candidate multiple (`CANDIDATES`: 1, and the widths SIMD kernels block by) is exported, the
candidates that give distinct shapes are timed with the unpruned model in interleaved rounds on
every runtime the artifact targets, and the fastest that is measurably so is kept. Where the
candidates are within the run's noise of the plan as asked (1), 1 is kept (its sparsity is the one
asked for) and the choice says NOISY; where every candidate runs slower than the unpruned model the
export warns.

Why our own: torch-pruning takes `round_to` as given and measures nothing; no library chooses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deploykit.bench.against import MEASURED_RUNTIMES, QUICK_TIMING
from deploykit.bench.records import BenchRecord
from deploykit.bench.runner import BASELINE_PLAN, Progress, artifact_subject, bench_subjects
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.errors import DeployKitError, UsageError
from deploykit.core.fsutil import scratch_directory
from deploykit.export.build import export_artifact
from deploykit.model.sources import consent_of
from deploykit.model.spec import ModelSpec
from deploykit.pipelines.catalog import PIPELINES
from deploykit.prune.base import PRUNERS, PruningPlan

#: multiples tried: 1 (the widths the scores give) and the blocks CPU kernels vectorise by (8 floats in
#: an AVX2 register, 16 in AVX-512, 32 for oneDNN's blocked convolution layouts)
CANDIDATES = (1, 8, 16, 32)


def aligns(plan: PruningPlan, form: str) -> str | None:
    """None when `--round-to auto` can change `plan`'s export in `form`, else why it cannot."""
    if not getattr(PRUNERS.get(plan.method), "structured", False):
        return f"{plan.method} prunes single weights: no channel count to align"
    if form != "dense-shrunk":
        return f"form {form} keeps every channel (zeros stay in place): alignment changes no shape"
    if plan.is_empty():
        return "nothing is pruned"
    return None


@dataclass(frozen=True)
class Alignment:
    """The measured choice: the multiple kept, why, and each candidate's speedups per runtime."""

    choice: int
    noisy: bool
    reason: str
    #: candidate -> runtime (and stage) -> {"speedup", "ci95", "round_ratios"}; candidates that gave the
    #: same shapes as a smaller one are left out (`same_as`)
    candidates: dict[int, dict[str, dict[str, Any]]]
    same_as: dict[int, int]
    runtimes: tuple[str, ...]
    threads: int
    batch: int
    #: FLOPs per item of each measured candidate (None: not counted), and of the unpruned model
    flops: dict[int, int | None] = dataclasses.field(default_factory=dict)
    unpruned_flops: int | None = None
    #: the model's metrics of each measured candidate (where it has an evaluator)
    metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    unpruned_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    #: candidates whose export failed (a width the model cannot take), and why
    left_out: dict[int, str] = dataclasses.field(default_factory=dict)
    #: the rows of the chosen candidate (each with its `versus` the unpruned model's)
    records: tuple[BenchRecord, ...] = ()

    def to_recipe(self) -> dict[str, Any]:
        """What the manifest records (`form_recipe["round_to"]`)."""
        data = dataclasses.asdict(self)
        del data["records"]
        for name in ("candidates", "same_as", "flops", "metrics", "left_out"):
            data[name] = {str(k): v for k, v in data[name].items()}
        return data


def choose_round_to(spec: ModelSpec, plan: PruningPlan, threads: int, batch: int = 1,
                    runtimes: Sequence[str] = MEASURED_RUNTIMES, candidates: Sequence[int] = CANDIDATES,
                    timing: TimingSettings = QUICK_TIMING, progress: Progress = lambda message: None,
                    **export_options) -> Alignment:
    """Export `plan` dense-shrunk at each of `candidates`, time the distinct ones against the unpruned
    model together, and choose."""
    why = aligns(plan, "dense-shrunk")
    if why:
        raise UsageError(f"--round-to auto: {why}")
    with scratch_directory("alignment") as tmp:
        progress(f"exporting the unpruned {spec.name} to measure alignments against")
        base = export_artifact(spec, BASELINE_PLAN, "dense", Path(tmp) / "unpruned")
        subjects, shapes, same_as = [artifact_subject(base.directory, consent_of(base.manifest.source))], {}, {}
        flops, metrics, left_out = {}, {}, {}
        for n in candidates:
            progress(f"exporting {spec.name} {plan.label()} dense-shrunk --round-to {n}")
            try:
                result = export_artifact(spec, dataclasses.replace(plan, round_to=n), "dense-shrunk",
                                         Path(tmp) / f"round-to-{n}", **export_options)
            except DeployKitError as exc:
                if n == candidates[0]:  # the plan as asked: its failure is the export's
                    raise
                progress(f"note: --round-to {n} left out: {exc}")
                left_out[n] = str(exc)
                continue
            signature = tuple(sorted((name, str(after)) for name, (_, after) in result.manifest.shape_changes.items()))
            if signature in shapes:
                same_as[n] = shapes[signature]
                continue
            shapes[signature] = n
            flops[n], metrics[n] = result.manifest.flops, dict(result.manifest.metrics)
            subjects.append(artifact_subject(result.directory, consent_of(result.manifest.source)))
        measured = [n for n in candidates if n in flops]
        loaders = PIPELINES.get(subjects[0].pipeline).loaders
        grid = Grid(runtimes=tuple(r for r in runtimes if r in loaders), batches=(batch,), threads=(threads,))
        counted = dict(flops=flops, unpruned_flops=base.manifest.flops, metrics=metrics,
                       unpruned_metrics=dict(base.manifest.metrics), left_out=left_out)
        # measured even when only one candidate is left: the export's measurement against the unpruned model
        records = bench_subjects(subjects, grid, timing, progress, baselines=[0])
    by_candidate: dict[int, list[BenchRecord]] = {n: [] for n in measured}
    for r in records:
        if not r.baseline:
            by_candidate[measured[[str(s.location) for s in subjects[1:]].index(r.artifact)]].append(r)
    chosen = _choose(by_candidate, same_as, grid.runtimes, threads, batch)
    if len(measured) == 1:
        chosen = dataclasses.replace(chosen, noisy=False, reason=(
            f"every candidate gives the same shapes (each kept width is already a multiple of {max(candidates)}, or "
            "rounding would keep too few)"))
    return dataclasses.replace(chosen, **counted)


def _key(r: BenchRecord) -> str:
    return r.runtime + ("" if r.stage == "forward" else f" {r.stage}")


def _choose(by_candidate: dict[int, list[BenchRecord]], same_as: dict[int, int], runtimes: tuple[str, ...],
            threads: int, batch: int) -> Alignment:
    """The candidate whose worst runtime is fastest; 1 where that is within noise of 1 on every runtime."""
    table = {n: {_key(r): {"speedup": r.speedup, "ci95": list(r.versus.speedup_ci95()),
                           "round_ratios": list(r.versus.round_ratios)}
                 for r in rows if r.versus and r.versus.speedup is not None}
             for n, rows in by_candidate.items()}
    keys = sorted(set.intersection(*(set(t) for t in table.values()))) if table else []
    if not keys:
        return Alignment(1, True, "no runtime measured every candidate: kept 1 (the plan as asked)", table, same_as,
                         runtimes, threads, batch, records=tuple(by_candidate.get(1, ())))

    def worst(n: int) -> float:
        return min(table[n][k]["speedup"] for k in keys)

    best = max(table, key=worst)
    # measurably faster than 1 on some runtime and not measurably slower on any: else keep 1
    ahead = any(table[best][k]["ci95"][0] > table[1][k]["ci95"][1] for k in keys)
    behind = any(table[best][k]["ci95"][1] < table[1][k]["ci95"][0] for k in keys)
    if best == 1:
        choice, noisy, reason = 1, False, "1 (the widths the scores give) was the fastest"
    elif ahead and not behind:
        choice, noisy, reason = best, False, (f"{best} was faster than 1 beyond the rounds' intervals "
                                              f"({worst(best):.2f}x against {worst(1):.2f}x the unpruned speed, "
                                              "the slowest runtime)")
    else:
        # undecided: NOISY where the rounds scattered widely, else the candidates simply ran alike
        wide = any(r.versus.noisy for n in (1, best) for r in by_candidate[n] if _key(r) in keys)
        choice, noisy, reason = 1, wide, (f"{best} ({worst(best):.2f}x) and 1 ({worst(1):.2f}x) are within this "
                                          "run's " + ("noise" if wide else "rounds' intervals of each other")
                                          + ": kept 1 (the plan as asked)")
    return Alignment(choice, noisy, reason, table, same_as, runtimes, threads, batch,
                     records=tuple(by_candidate[choice]))
