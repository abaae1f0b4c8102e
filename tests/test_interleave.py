"""Configurations compared in one run are measured in interleaved rounds, one worker at a time."""

import dataclasses
from pathlib import Path

import pytest

from deploykit.bench import interleave
from deploykit.bench.interleave import Job, paired_ratios, run_interleaved
from deploykit.bench.runner import artifact_subject
from deploykit.bench.settings import TimingSettings
from deploykit.core.errors import MeasurementError
from deploykit.core.ort import CPU_PROVIDER
from deploykit.export.build import export_artifact
from deploykit.prune.base import PruningPlan
from deploykit.runtime.session import Target


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interleave")
    directory = tmp / "art"
    export_artifact("mlp-sst2", PruningPlan.parse("magnitude:0.5"), "dense", directory)
    subject = artifact_subject(directory)
    inputs = tmp / "inputs.safetensors"
    from safetensors.numpy import save_file

    save_file(subject.inputs(1, 2, None), str(inputs))
    targets = [Target("onnxruntime", CPU_PROVIDER, graph_optimization="all"), Target("torch", "cpu")]
    return tmp, [Job(directory, "forward", t, 1, 1, inputs, sum(subject.files.values()), t.runtime) for t in targets]


def test_rounds_alternate_and_never_overlap(jobs):
    tmp, (ort, torch_job) = jobs
    timing = dataclasses.asdict(TimingSettings(warmup_s=0.01, min_time_s=0.05, min_iters=10, rounds=4))
    (a, _), (b, _) = run_interleaved([ort, torch_job], timing, Path(tmp))
    rounds = sorted([(start, end, "ort") for start, end in a["round_times_ns"]] +
                    [(start, end, "torch") for start, end in b["round_times_ns"]])
    assert len(rounds) == 8
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(rounds, rounds[1:]))  # one measures at a time
    # the order rotates: ort first in even rounds, torch first in odd ones
    assert [kind for _, _, kind in rounds] == ["ort", "torch", "torch", "ort", "ort", "torch", "torch", "ort"]
    assert len(a["stages"]["forward"]["samples_ns"]) >= 10  # the budget is the whole, split over the rounds


def test_a_worker_that_dies_fails_alone(jobs):
    tmp, (ort, torch_job) = jobs
    broken = dataclasses.replace(torch_job, location=Path(tmp) / "missing")
    timing = dataclasses.asdict(TimingSettings(warmup_s=0.01, min_time_s=0.02, min_iters=5, rounds=2))
    first, second = run_interleaved([broken, ort], timing, Path(tmp))
    assert isinstance(first, MeasurementError) and "torch worker (cpu) failed on" in str(first)
    result, outputs = second
    assert len(result["round_times_ns"]) == 2 and outputs


def test_processes_pool_their_samples(jobs):
    tmp, (ort, _) = jobs
    timing = dataclasses.asdict(TimingSettings(warmup_s=0.01, min_time_s=0.04, min_iters=10, rounds=2, processes=2))
    ((result, outputs),) = run_interleaved([ort], timing, Path(tmp))
    assert result["processes"] == 2 and len(result["round_times_ns"]) == 4  # two workers, two rounds each
    assert isinstance(result["stages"]["forward"]["overhead_ns"], int)  # a record reads it back as one
    assert len(result["stages"]["forward"]["samples_ns"]) >= 10  # the budget is split, the samples pooled


def test_the_baseline_is_measured_in_every_group_the_memory_bound_makes(jobs, monkeypatch):
    tmp, (ort, _) = jobs
    four = [dataclasses.replace(ort, label=f"job {i}") for i in range(4)]
    monkeypatch.setattr(interleave, "max_live", lambda jobs: 2)  # room for the baseline and one other at a time
    timing = dataclasses.asdict(TimingSettings(warmup_s=0.01, min_time_s=0.03, min_iters=6, rounds=3))
    outcomes = run_interleaved(four, timing, Path(tmp), anchors=[0])
    baseline, others = outcomes[0][0], [o[0] for o in outcomes[1:]]
    # three groups (the baseline and one other each): the baseline ran three rounds in each
    assert len(baseline["round_times_ns"]) == 9 and sorted({k[0] for k in baseline["round_keys"]}) == [0, 1, 2]
    for group, other in enumerate(others):
        assert {k[0] for k in other["round_keys"]} == {group}
        ratios = paired_ratios(baseline, other, "forward")
        assert len(ratios) == 3  # one per round they shared
        # each ratio pairs rounds that ran back to back: the baseline's round r of that group
        mine = other["stages"]["forward"]["round_p50_ns"]
        theirs = [p for k, p in zip(baseline["round_keys"], baseline["stages"]["forward"]["round_p50_ns"])
                  if k[0] == group]
        assert ratios == [b / a for a, b in zip(mine, theirs)]
