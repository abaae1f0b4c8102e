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
`Runtime` naming its devices and the precisions it offers (and which a device computes natively), and
give each pipeline that it can run a loader for it. A runtime that runs ONNX graphs registers a
`deploykit.runtime.graphs.GraphRuntime` instead of a session class: every pipeline's decoding loop
then runs on it through `load_graph` and the pipelines' `load_graphs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from deploykit.core.ort import CPU_PROVIDER, DEFAULT_GRAPH_OPTIMIZATION
from deploykit.core.registry import Registry
from deploykit.runtime.accelerators import onnxruntime_providers, openvino_devices, torch_devices
from deploykit.runtime.precisions import (
    DEFAULT_PRECISION,
    onnxruntime_precisions,
    openvino_precisions,
    torch_precisions,
)

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
    #: the numeric precision it computes in (`deploykit.runtime.precisions`): f32 unless the bench's
    #: precision axis asks for another that this runtime offers and this machine computes natively
    precision: str = DEFAULT_PRECISION


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
    #: the precisions it can be asked for, and, per device, those this machine computes natively
    precisions: tuple[str, ...] = (DEFAULT_PRECISION,)
    native_precisions: Callable[[str], tuple[str, ...]] = lambda device: (DEFAULT_PRECISION,)

    def default_target(self, consent: Sequence[str] = ()) -> Target:
        """This runtime on the CPU with its default settings, allowed to import the entry points in `consent`."""
        return Target(self.name, self.cpu_device,
                      graph_optimization=DEFAULT_GRAPH_OPTIMIZATION if self.graph_optimizations else None,
                      code_consent=tuple(consent))


RUNTIMES: Registry[Runtime] = Registry("runtime")


#: a loader: (artifact directory or file, threads, Target) -> Session; each pipeline names one per runtime
Loader = Callable[[Path, int, Target], Session]


RUNTIMES.add("torch", Runtime(
    "torch", ("torch",),
    available_devices=torch_devices,
    preferred_devices=lambda profile: (profile.runtime.torch_device, "cpu"),
    cpu_device="cpu",
    no_accelerator="torch sees no CUDA or MPS device",
    precisions=("f32", "bf16", "f16"),  # autocast
    native_precisions=torch_precisions,
))
RUNTIMES.add("onnxruntime", Runtime(
    "onnxruntime", ("onnxruntime",),
    available_devices=onnxruntime_providers,
    preferred_devices=lambda profile: profile.runtime.onnxruntime_providers,
    cpu_device=CPU_PROVIDER,
    no_accelerator="this onnxruntime build has no GPU execution provider (onnxruntime-gpu has CUDA's)",
    graph_optimizations=True,
    precisions=("f32", "f16"),  # onnxruntime's float16 conversion of the graph
    native_precisions=onnxruntime_precisions,
))
RUNTIMES.add("openvino", Runtime(
    "openvino", ("openvino",),
    available_devices=openvino_devices,
    preferred_devices=lambda profile: profile.runtime.openvino_devices,
    cpu_device="CPU",
    no_accelerator="OpenVINO sees no GPU or NPU device here",
    precisions=("f32", "bf16", "f16"),  # its inference precision hint
    native_precisions=openvino_precisions,
))
