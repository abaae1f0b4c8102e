"""Configurations compared in one run are measured in interleaved rounds, one worker at a time."""

import dataclasses
from pathlib import Path

import pytest

from deploykit.bench.interleave import Job, run_interleaved
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
    assert len(result["stages"]["forward"]["samples_ns"]) >= 10  # the budget is split, the samples pooled
