"""Runtimes that load an exported artifact and run it: PyTorch eager, ONNX Runtime and OpenVINO.

All take and return numpy arrays keyed by the model's input names, so the same inputs, the same
timing loop and the same parity check apply to each. Importing this module imports none of torch,
onnxruntime and openvino: the ONNX Runtime worker must not pay for torch in its memory figures.

What running an artifact means is its *pipeline*'s (`deploykit.pipelines`): each pipeline names, per
runtime, the loader that makes a `Session` of it. This module holds what every runtime shares: the
session protocol, the target a worker is asked to load, and the runtimes' devices.

Each runtime also says which devices it can use on this machine and which of them a hardware profile
prefers; `deploykit.runtime.devices` turns a bench's device choices (auto, cpu, gpu) into concrete devices.

How to add a runtime: write a `Session` class taking `(artifact_dir, threads, target)`, with `run(feeds)
-> list[np.ndarray]`, `stages(feeds)` returning the zero-argument calls the timing loop repeats, by
stage name (inputs already converted), `synchronize` (waits for queued device work, or None when
calls return only once their work is done), an `info` and the artifact `files` it loaded; register a
`Runtime` naming its devices, and give each pipeline that it can run a loader for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from deploykit.core.errors import UsageError
from deploykit.core.extras import require
from deploykit.core.ort import CPU_PROVIDER, DEFAULT_GRAPH_OPTIMIZATION, ort_session
from deploykit.core.registry import Registry
from deploykit.model.onnxfile import read_onnx_graph, with_dense_initializers
from deploykit.runtime.accelerators import onnxruntime_providers, openvino_devices, torch_devices

if TYPE_CHECKING:
    from deploykit.runtime.profiles import Profile


@dataclass(frozen=True)
class RuntimeInfo:
    """What ran a configuration; recorded with every measurement."""

    runtime: str
    version: str
    threads: int
    device: str  # torch device or onnxruntime execution provider


class Session(Protocol):
    info: RuntimeInfo
    #: the artifact files this session loaded: their sizes are its "disk" figure
    files: Sequence[str]
    #: blocks until work queued on the device is done (CUDA kernels launch asynchronously: a timer
    #: read without it measures the launch, not the work); None where calls are synchronous
    synchronize: Callable[[], None] | None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def stages(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Callable[[], object]]: ...


@runtime_checkable
class ScoresContinuations(Protocol):
    """A generating session that can also say, per token, whether it would have chosen another model's
    greedy tokens (`GenerationSession` of a causal LM)."""

    def next_token_agreement(self, feeds: Mapping[str, np.ndarray], tokens: np.ndarray) -> float | None: ...


#: the stage of a one-graph artifact: one call
FORWARD_STAGE = "forward"

@dataclass(frozen=True)
class Target:
    """One runtime on one device with its settings: what a worker is asked to load."""

    runtime: str
    #: torch device ("cpu", "cuda", "mps") or onnxruntime execution provider
    device: str
    #: the device choice it came from (auto, cpu, gpu; see `deploykit.runtime.devices`)
    choice: str = "cpu"
    #: onnxruntime's graph optimisation level (None for runtimes without one)
    graph_optimization: str | None = None
    #: entry points the user consented to import when torch rebuilds an artifact's model
    #: (`deploykit.model.sources.code_refusal`); plain data, so it travels to the benchmark worker
    code_consent: tuple[str, ...] = ()
    #: the batch size the session will be fed: a form may choose its kernels for it
    batch: int = 1


@dataclass(frozen=True)
class Runtime:
    name: str
    #: libraries the runtime imports: the benchmark worker imports them before its baseline memory
    #: reading, so that "peak - baseline" is what loading and running the model cost
    modules: tuple[str, ...]
    #: the devices this runtime can use on this machine, accelerators first
    available_devices: Callable[[], tuple[str, ...]]
    #: the devices a hardware profile prefers for this runtime, in order
    preferred_devices: Callable[["Profile"], tuple[str, ...]]
    cpu_device: str
    #: what to tell a user who asked for a GPU this runtime cannot use here
    no_accelerator: str
    #: whether the runtime has graph optimisation levels (GRAPH_OPTIMIZATIONS)
    graph_optimizations: bool = False

    def default_target(self, consent: Sequence[str] = ()) -> Target:
        """This runtime on the CPU with its default settings, allowed to import the entry points in `consent`."""
        return Target(self.name, self.cpu_device,
                      graph_optimization=DEFAULT_GRAPH_OPTIMIZATION if self.graph_optimizations else None,
                      code_consent=tuple(consent))


RUNTIMES: Registry[Runtime] = Registry("runtime")


class OrtSession:
    #: session.run returns host arrays, so a call ends when its device work has
    synchronize = None

    def __init__(self, onnx_path: Path, threads: int, provider: str = CPU_PROVIDER, optimization: str | None = None):
        import onnxruntime as ort

        self.session = ort_session(onnx_path, threads, provider=provider, optimization=optimization)
        self.info = RuntimeInfo("onnxruntime", ort.__version__, threads, self.session.get_providers()[0])
        self.files = (Path(onnx_path).name,)

    def run(self, feeds):
        return list(self.session.run(None, dict(feeds)))

    def stages(self, feeds):
        feeds = dict(feeds)
        return {FORWARD_STAGE: lambda: self.session.run(None, feeds)}


class OpenVinoSession:
    """An ONNX graph as it is, compiled by OpenVINO (the `openvino` extra) for one device.

    Every setting that changes its speed is set, not left to the plugin's defaults, and said in the
    device the records keep ("CPU latency f32"): `threads` inference threads, the latency performance
    hint with one stream (what a single caller gets; the throughput hint runs several requests in
    parallel, which a one-request timing loop never uses), and f32 inference precision (on a CPU with
    AVX-512 BF16 or AMX the plugin's default is bf16, a different answer; other precisions are for the
    precision axis to ask for, measured and said)."""

    #: infer returns host arrays, so a call ends when its device work has
    synchronize = None
    HINT = "LATENCY"
    PRECISION = "f32"

    def __init__(self, onnx_path: Path, threads: int, device: str = "CPU"):
        ov = require("openvino", "the openvino runtime")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": self.HINT, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": self.PRECISION}
        if device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(_openvino_model(core, Path(onnx_path)), device, config)
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.info = RuntimeInfo("openvino", ov.get_version().split("-")[0], threads,
                                f"{device} {self.HINT.lower()} {self.PRECISION}")
        self.files = (Path(onnx_path).name,)

    def run(self, feeds):
        results = self.request.infer(dict(feeds))
        # the request's output buffers are reused by its next call: copy them out
        return [np.array(results[output], copy=True) for output in self.outputs]

    def stages(self, feeds):
        feeds = dict(feeds)
        return {FORWARD_STAGE: lambda: self.request.infer(feeds)}


def _openvino_model(core, path: Path):
    """The graph OpenVINO reads: the file itself, or, where it stores sparse initializers (the csr form's
    model.onnx), a copy with them dense (OpenVINO's ONNX reader takes none; onnxruntime densifies them at
    load too, so the figures are the same dense-kernel speed)."""
    proto = read_onnx_graph(path)
    if not proto.graph.sparse_initializer:
        return core.read_model(str(path))
    if any(t.data_location == t.EXTERNAL for t in proto.graph.initializer):
        raise UsageError(f"{str(path)!r}: openvino cannot read a graph with both sparse initializers and external data; "
                         "run it under onnxruntime, or export it in another form")
    return core.read_model(with_dense_initializers(proto, path).SerializeToString())


#: a loader: (artifact directory or file, threads, Target) -> Session; each pipeline names one per runtime
Loader = Callable[[Path, int, Target], Session]


RUNTIMES.add("torch", Runtime(
    "torch", ("torch",),
    available_devices=torch_devices,
    preferred_devices=lambda profile: (profile.runtime.torch_device, "cpu"),
    cpu_device="cpu",
    no_accelerator="torch sees no CUDA or MPS device",
))
RUNTIMES.add("onnxruntime", Runtime(
    "onnxruntime", ("onnxruntime",),
    available_devices=onnxruntime_providers,
    preferred_devices=lambda profile: profile.runtime.onnxruntime_providers,
    cpu_device=CPU_PROVIDER,
    no_accelerator="this onnxruntime build has no GPU execution provider (onnxruntime-gpu has CUDA's)",
    graph_optimizations=True,
))
RUNTIMES.add("openvino", Runtime(
    "openvino", ("openvino",),
    available_devices=openvino_devices,
    preferred_devices=lambda profile: ("CPU",),
    cpu_device="CPU",
    no_accelerator="OpenVINO sees no GPU or NPU device here",
))
