"""Runtimes that load an exported artifact and run it: PyTorch eager and ONNX Runtime.

Both take and return numpy arrays keyed by the model's input names, so the same inputs, the same
timing loop and the same parity check apply to each. Importing this module imports neither torch nor
onnxruntime: the ONNX Runtime worker must not pay for torch in its memory figures.

An artifact's *pipeline* says what running it means: `forward` is one call of one graph;
`speech-translation` is an encoder/decoder pair decoded token by token (`deploykit.st_decode`). Each
runtime names, per pipeline, the function that loads a session, as "module:function", imported on use.

Each runtime also says which devices it can use on this machine and which of them a hardware profile
prefers; `deploykit.devices` turns a bench's device choices (auto, cpu, gpu) into concrete devices.

How to add a runtime: write a `Session` class taking `(artifact_dir, threads, target)`, with `run(feeds)
-> list[np.ndarray]`, `stages(feeds)` returning the zero-argument calls the timing loop repeats, by
stage name (inputs already converted), `synchronize` (waits for queued device work, or None when
calls return only once their work is done), an `info` and the artifact `files` it loaded, then
register a `Runtime` naming its loader per pipeline and its devices.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

import numpy as np

from .artifact import ONNX_FILE, WEIGHTS_FILE
from .errors import ArtifactError, MeasurementError, UsageError
from .registry import Registry

if TYPE_CHECKING:
    from .profiles import Profile


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


#: the stage of a one-graph artifact: one call
FORWARD_STAGE = "forward"

#: onnxruntime graph optimisation levels by name (onnxruntime's own default is "all")
GRAPH_OPTIMIZATIONS = ("disabled", "basic", "extended", "all")
DEFAULT_GRAPH_OPTIMIZATION = "all"


@dataclass(frozen=True)
class Target:
    """One runtime on one device with its settings: what a worker is asked to load."""

    runtime: str
    #: torch device ("cpu", "cuda", "mps") or onnxruntime execution provider
    device: str
    #: the device choice it came from (auto, cpu, gpu; see `deploykit.devices`)
    choice: str = "cpu"
    #: onnxruntime's graph optimisation level (None for runtimes without one)
    graph_optimization: str | None = None
    #: entry points the user consented to import when torch rebuilds an artifact's model
    #: (`deploykit.sources.code_refusal`); plain data, so it travels to the benchmark worker
    code_consent: tuple[str, ...] = ()
    #: the batch size the session will be fed: a form may choose its kernels for it
    batch: int = 1


@dataclass(frozen=True)
class Runtime:
    name: str
    #: libraries the runtime imports: the benchmark worker imports them before its baseline memory
    #: reading, so that "peak - baseline" is what loading and running the model cost
    modules: tuple[str, ...]
    #: pipeline -> "module:function" loading a Session from (artifact directory, threads, Target)
    loaders: Mapping[str, str]
    #: the devices this runtime can use on this machine, accelerators first
    available_devices: Callable[[], tuple[str, ...]]
    #: the devices a hardware profile prefers for this runtime, in order
    preferred_devices: Callable[["Profile"], tuple[str, ...]]
    cpu_device: str
    #: what to tell a user who asked for a GPU this runtime cannot use here
    no_accelerator: str
    #: whether the runtime has graph optimisation levels (GRAPH_OPTIMIZATIONS)
    graph_optimizations: bool = False

    def load(self, pipeline: str, directory: Path, threads: int, target: Target | None = None,
             consent: Sequence[str] = ()) -> Session:
        """A session for the artifact in `directory` (on the CPU with default settings and the code
        `consent` given, unless `target` says)."""
        if pipeline not in self.loaders:
            raise UsageError(f"runtime {self.name!r} cannot run {pipeline!r} artifacts; it runs: {', '.join(self.loaders)}")
        if target is None:
            target = Target(self.name, self.cpu_device,
                            graph_optimization=DEFAULT_GRAPH_OPTIMIZATION if self.graph_optimizations else None,
                            code_consent=tuple(consent))
        module, _, function = self.loaders[pipeline].partition(":")
        return getattr(importlib.import_module(module), function)(Path(directory), threads, target)


RUNTIMES: Registry[Runtime] = Registry("runtime")


CPU_PROVIDER = "CPUExecutionProvider"


def ort_session(onnx_path: str | Path, threads: int, spinning: bool = True, provider: str = CPU_PROVIDER,
                optimization: str | None = None, optimized_path: str | Path | None = None, probe: bool = False):
    """An onnxruntime session on `provider` with `threads` intra-op threads and no inter-op parallelism,
    at graph optimisation level `optimization` (GRAPH_OPTIMIZATIONS; default onnxruntime's, "all"),
    writing the optimised graph to `optimized_path` when given.

    Operators the provider lacks run on the CPU provider, as onnxruntime intends; a provider that
    fails to start is an error here, not onnxruntime's silent fall-back to the CPU, so a figure
    labelled CUDA was measured on CUDA.

    `probe=True` silences onnxruntime's own error log, for sessions run to find out whether a graph
    fails (the caller reports the failure).

    `spinning=False` stops idle intra-op threads from busy-waiting after a run: sessions used in
    turn (an encoder then a decoder) each own a thread pool, and one pool spinning steals the cores
    the other needs (measured here: greedy decoding of espnet-st took 100 ms spinning, 69 ms not).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4 if probe else 3  # warnings about unused initializers are noise for users
    options.graph_optimization_level = _graph_level(optimization or DEFAULT_GRAPH_OPTIMIZATION)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers = [provider] + ([CPU_PROVIDER] if provider != CPU_PROVIDER else [])
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad graphs
        lines = str(exc).strip().splitlines()
        raise ArtifactError(f"onnxruntime cannot load {str(onnx_path)!r}: {lines[0][:300] if lines else type(exc).__name__}") from None
    if session.get_providers()[0] != provider:
        raise MeasurementError(f"onnxruntime could not start {provider} for {Path(onnx_path).name} "
                               f"(it offered {', '.join(session.get_providers())})")
    return session


def _graph_level(name: str):
    import onnxruntime as ort

    levels = dict(zip(GRAPH_OPTIMIZATIONS, (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)))
    if name not in levels:
        raise UsageError(f"unknown graph optimisation {name!r}; choose from {', '.join(GRAPH_OPTIMIZATIONS)}")
    return levels[name]


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


class TorchSession:
    def __init__(self, artifact_dir: Path, threads: int, target: Target):
        import torch

        from .artifact import load_torch_model

        torch.set_num_threads(threads)
        self.torch = torch
        device = target.device
        self.device = torch.device(device)
        model, self.manifest = load_torch_model(artifact_dir, consent=target.code_consent, batch=target.batch)
        self.model = model.to(self.device)
        self.input_names = [spec["name"] for spec in self.manifest.inputs]
        self.info = RuntimeInfo("torch", torch.__version__, threads, device)
        self.files = (WEIGHTS_FILE,)
        self.synchronize = _TORCH_SYNC.get(self.device.type, lambda torch: None)(torch)

    def _tensors(self, feeds):
        return [self.torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in self.input_names]

    def run(self, feeds):
        with self.torch.inference_mode():
            outputs = self.model(*self._tensors(feeds))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return [out.cpu().numpy() for out in outputs]

    def stages(self, feeds):
        tensors = self._tensors(feeds)
        model, inference_mode = self.model, self.torch.inference_mode

        def call():
            with inference_mode():
                return model(*tensors)

        return {FORWARD_STAGE: call}


#: torch device type -> (torch -> the call that waits for its queued work); CPU calls are synchronous
_TORCH_SYNC = {
    "cuda": lambda torch: torch.cuda.synchronize,
    "mps": lambda torch: torch.mps.synchronize,
}


def load_onnxruntime(artifact_dir: Path, threads: int, target: Target) -> Session:
    return OrtSession(Path(artifact_dir) / ONNX_FILE, threads, target.device, target.graph_optimization)


def load_onnx_file(path: Path, threads: int, target: Target) -> Session:
    """A user's ONNX file as it is (its external data checked by `deploykit.onnxfile` before any run)."""
    return OrtSession(path, threads, target.device, target.graph_optimization)


def torch_devices() -> tuple[str, ...]:
    import torch

    found = [name for name, available in (("cuda", torch.cuda.is_available), ("mps", torch.backends.mps.is_available))
             if available()]
    return (*found, "cpu")


def onnxruntime_providers() -> tuple[str, ...]:
    """This build's execution providers that run on this machine (remote ones, like Azure's, are not)."""
    import onnxruntime as ort

    from .profiles import LOCAL_PROVIDERS

    available = set(ort.get_available_providers())
    return tuple(p for p in LOCAL_PROVIDERS if p in available)


RUNTIMES.add("torch", Runtime(
    "torch", ("torch",),
    {"forward": "deploykit.runtime:TorchSession", "speech-translation": "deploykit.espnet:load_torch_session",
     "text-generation": "deploykit.gpt2:load_torch_session"},
    available_devices=torch_devices,
    preferred_devices=lambda profile: (profile.runtime.torch_device, "cpu"),
    cpu_device="cpu",
    no_accelerator="torch sees no CUDA or MPS device",
))
RUNTIMES.add("onnxruntime", Runtime(
    "onnxruntime", ("onnxruntime",),
    {"forward": "deploykit.runtime:load_onnxruntime", "speech-translation": "deploykit.st_decode:load_onnxruntime",
     "text-generation": "deploykit.textgen:load_onnxruntime", "onnx-file": "deploykit.runtime:load_onnx_file"},
    available_devices=onnxruntime_providers,
    preferred_devices=lambda profile: profile.runtime.onnxruntime_providers,
    cpu_device=CPU_PROVIDER,
    no_accelerator="this onnxruntime build has no GPU execution provider (onnxruntime-gpu has CUDA's)",
    graph_optimizations=True,
))
