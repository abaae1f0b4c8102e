"""Device placement from hardware profiles, device synchronisation in timing, and sequence-length sweeps."""

import dataclasses

import pytest
import torch

from deploykit.bench.runner import bench_artifact
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.errors import UsageError
from deploykit.core.measure import measure
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.model.spec import InputSpec, ModelSpec
from deploykit.prune.base import PruningPlan
from deploykit.runtime.devices import place
from deploykit.runtime.profiles import get_profile
from deploykit.runtime.session import RUNTIMES

CPU_ONLY = {"torch": ("cpu",), "onnxruntime": ("CPUExecutionProvider",)}
WITH_CUDA = {"torch": ("cuda", "cpu"), "onnxruntime": ("CUDAExecutionProvider", "CPUExecutionProvider")}


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine's runtimes see `devices` (runtime -> available devices)."""
    def pretend(devices):
        for name, available in devices.items():
            fake = dataclasses.replace(RUNTIMES.get(name), available_devices=lambda available=available: available)
            monkeypatch.setitem(RUNTIMES._entries, name, fake)

    return pretend


def test_auto_follows_the_profile_and_falls_back_to_the_cpu_with_a_note(machine):
    t4 = get_profile("nvidia-t4-cloud")
    machine(WITH_CUDA)
    placement = place(["torch", "onnxruntime"], ["auto"], t4)
    assert [(t.runtime, t.device) for t in placement.targets] == [("torch", "cuda"),
                                                                  ("onnxruntime", "CUDAExecutionProvider")]
    assert placement.notes == ()
    machine(CPU_ONLY)
    placement = place(["torch", "onnxruntime"], ["auto"], t4)
    assert [(t.runtime, t.device) for t in placement.targets] == [("torch", "cpu"),
                                                                  ("onnxruntime", "CPUExecutionProvider")]
    assert placement.notes == (
        "torch on auto: profile nvidia-t4-cloud prefers cuda, not available here: running on cpu",
        "onnxruntime on auto: profile nvidia-t4-cloud prefers CUDAExecutionProvider, not available here: running on "
        "CPUExecutionProvider",
    )


def test_an_unavailable_gpu_is_skipped_never_replaced(machine):
    machine(CPU_ONLY)
    placement = place(["torch", "onnxruntime"], ["gpu", "cpu"], get_profile("apple-m1-pro"))
    assert [(t.runtime, t.device, t.choice) for t in placement.targets] == [
        ("torch", "cpu", "cpu"), ("onnxruntime", "CPUExecutionProvider", "cpu")]
    assert placement.notes[0] == "torch on gpu: skipped: torch sees no CUDA or MPS device"
    assert placement.notes[1].startswith("onnxruntime on gpu: skipped: this onnxruntime build has no GPU")


def test_choices_that_land_on_one_device_are_measured_once(machine):
    machine(WITH_CUDA)
    placement = place(["torch"], ["auto", "gpu", "cpu"], get_profile("nvidia-t4-cloud"))
    assert [(t.device, t.choice) for t in placement.targets] == [("cuda", "auto"), ("cpu", "cpu")]
    with pytest.raises(UsageError, match="unknown device 'tpu'; choose from auto, cpu, gpu"):
        place(["torch"], ["tpu"], get_profile("nvidia-t4-cloud"))


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_bench_on_gpu_without_one_fails_before_measuring(cli):
    result = cli("bench", "--device", "gpu", "--no-store")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "deploykit: error: nothing to run: torch on gpu: skipped: torch sees no CUDA or MPS device; onnxruntime on gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_torch_on_cuda_is_timed_with_synchronisation_and_matches_the_cpu(tmp_path):
    directory = export_artifact("mlp-sst2", PruningPlan("magnitude", 0.5), "dense", tmp_path / "a").directory
    records = bench_artifact(directory, Grid(runtimes=("torch",), devices=("gpu",)),
                             TimingSettings(warmup_s=0.05, min_time_s=0.05, min_iters=10))
    assert [r.device for r in records] == ["cuda"]
    assert records[0].parity_max_abs_error <= 1e-4


class Device:
    """A fake accelerator: calls queue work, which the clock sees only once synchronised."""

    def __init__(self, step_ns):
        self.now, self.pending, self.step_ns, self.syncs = 0, 0, step_ns, 0

    def clock(self):
        return self.now

    def launch(self):
        self.pending += self.step_ns

    def synchronize(self):
        self.syncs += 1
        self.now += self.pending
        self.pending = 0


def test_timing_waits_for_the_device_before_reading_the_clock():
    device = Device(1_000_000)
    m = measure(device.launch, warmup_s=0.005, min_time_s=0.02, min_iters=10, clock=device.clock,
                sync=device.synchronize)
    assert set(m.samples_ns) == {1_000_000} and m.calls_per_sample == 1
    unsynced = Device(1_000_000)
    m = measure(unsynced.launch, warmup_s=0, min_time_s=0, min_iters=10, clock=unsynced.clock)
    assert set(m.samples_ns) == {0}  # what timing asynchronous work without synchronising measures


def test_a_length_sets_every_sequence_axis():
    spec = get_model("seq2seq-transformer")
    src, tgt = spec.example_inputs(3, seed=0, length=7)
    assert src.shape == tgt.shape == (3, 7)
    with pytest.raises(UsageError, match=r"mlp-sst2 has no sequence axis to set a length on \(inputs: bow"):
        get_model("mlp-sst2").example_inputs(1, length=7)


def _tiny_seq2seq():
    from deploykit.model.zoo.text import Seq2SeqTransformer

    return Seq2SeqTransformer(layers=1, dim=16, heads=2, ffn=32, src_vocab=50, tgt_vocab=40)


def test_export_fixes_sequence_axes_the_traced_graph_does_not_honour(tmp_path):
    spec = ModelSpec("tiny-seq2seq", _tiny_seq2seq,
                     (InputSpec("src", ("batch", "src_len"), "int64", high=50),
                      InputSpec("tgt", ("batch", "tgt_len"), "int64", high=40)), ("logits",),
                     sampler=lambda b, g: (torch.randint(0, 50, (b, 9), generator=g), torch.randint(0, 40, (b, 6), generator=g)),
                     output_layers=("generator",))
    manifest = export_artifact(spec, PruningPlan(), "dense", tmp_path / "a").manifest
    assert [i["shape"] for i in manifest.inputs] == [["batch", 9], ["batch", 6]]
    assert any(n.startswith("sequence axes fixed at the traced lengths: the traced graph fails at length 12")
               for n in manifest.notes)


def test_sequence_length_sweep_records_each_length(tmp_path):
    pytest.importorskip("espnet")
    result = export_artifact("espnet-st-small", PruningPlan("magnitude", 0.5, scope="layer"), "dense", tmp_path / "a")
    records = bench_artifact(result.directory, Grid(runtimes=("torch", "onnxruntime"), lengths=(60, 240)),
                             TimingSettings(warmup_s=0.01, min_time_s=0.01, min_iters=3))
    stages = {"torch": ("encoder", "decoder-step", "greedy", "decoder-step-cached", "greedy-cached"),
              "onnxruntime": ("encoder", "decoder-step", "greedy")}
    assert [(r.runtime, r.stage, r.sequence_length) for r in records] == [
        (runtime, stage, length) for length in (60, 240) for runtime in ("torch", "onnxruntime")
        for stage in stages[runtime]]
    assert all(r.parity_max_abs_error <= result.manifest.parity_tolerance for r in records)


def test_graph_optimisation_levels_are_swept_for_onnxruntime_only(tmp_path):
    directory = export_artifact("lenet-300-100", PruningPlan("magnitude", 0.5), "dense", tmp_path / "a",
                                save_optimized="extended").directory
    records = bench_artifact(directory, Grid(runtimes=("torch", "onnxruntime"), graph_optimizations=("disabled", "all")),
                             TimingSettings(warmup_s=0.01, min_time_s=0.01, min_iters=5))
    assert [(r.runtime, r.graph_optimization) for r in records] == [
        ("torch", ""), ("onnxruntime", "disabled"), ("onnxruntime", "all")]
    with pytest.raises(UsageError, match="unknown graph optimisation 'fast'; choose from disabled, basic, extended, all"):
        Grid(graph_optimizations=("fast",)).placement()


def test_the_optimised_graph_is_saved_beside_the_original_and_computes_the_same(tmp_path):
    import numpy as np

    from deploykit.core.ort import ort_session

    result = export_artifact("lenet-5", PruningPlan(), "dense", tmp_path / "a", save_optimized="extended")
    assert "model.extended.onnx" in result.manifest.files
    assert result.manifest.notes[-1].startswith("onnxruntime's extended-optimised graphs saved beside the originals")
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 1, 28, 28), dtype=np.float32)}
    original = ort_session(result.directory / "model.onnx", 1, optimization="disabled").run(None, feeds)[0]
    optimised = ort_session(result.directory / "model.extended.onnx", 1, optimization="disabled").run(None, feeds)[0]
    np.testing.assert_allclose(optimised, original, rtol=1e-5, atol=1e-5)
