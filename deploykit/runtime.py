"""Runtimes that load an exported artifact and run it: PyTorch eager and ONNX Runtime.

Both take and return numpy arrays keyed by the model's input names, so the same inputs, the same
timing loop and the same parity check apply to each. Importing this module imports neither torch nor
onnxruntime: the ONNX Runtime worker must not pay for torch in its memory figures.

An artifact's *pipeline* says what running it means: `forward` is one call of one graph;
`speech-translation` is an encoder/decoder pair decoded token by token (`deploykit.st_decode`). Each
runtime names, per pipeline, the function that loads a session, as "module:function", imported on use.

How to add a runtime: write a `Session` class taking `(artifact_dir, threads)`, with `run(feeds) ->
list[np.ndarray]`, `stages(feeds)` returning the zero-argument calls the timing loop repeats, by stage
name (inputs already converted), an `info` and the artifact `files` it loaded, then
``RUNTIMES.add("name", Runtime("name", modules, {"forward": "package.module:MySession"}))``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from .artifact import ONNX_FILE, WEIGHTS_FILE
from .errors import UsageError
from .registry import Registry


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

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def stages(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Callable[[], object]]: ...


#: the stage of a one-graph artifact: one call
FORWARD_STAGE = "forward"


@dataclass(frozen=True)
class Runtime:
    name: str
    #: libraries the runtime imports: the benchmark worker imports them before its baseline memory
    #: reading, so that "peak - baseline" is what loading and running the model cost
    modules: tuple[str, ...]
    #: pipeline -> "module:function" loading a Session from (artifact directory, threads)
    loaders: Mapping[str, str]

    def load(self, pipeline: str, directory: Path, threads: int) -> Session:
        if pipeline not in self.loaders:
            raise UsageError(f"runtime {self.name!r} cannot run {pipeline!r} artifacts; it runs: {', '.join(self.loaders)}")
        module, _, function = self.loaders[pipeline].partition(":")
        return getattr(importlib.import_module(module), function)(Path(directory), threads)


RUNTIMES: Registry[Runtime] = Registry("runtime")


def ort_session(onnx_path: str | Path, threads: int, spinning: bool = True):
    """An onnxruntime CPU session with `threads` intra-op threads and no inter-op parallelism.

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
    options.log_severity_level = 3  # warnings about unused initializers are noise for users
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


class OrtSession:
    def __init__(self, onnx_path: Path, threads: int):
        import onnxruntime as ort

        self.session = ort_session(onnx_path, threads)
        self.info = RuntimeInfo("onnxruntime", ort.__version__, threads, self.session.get_providers()[0])
        self.files = (Path(onnx_path).name,)

    def run(self, feeds):
        return list(self.session.run(None, dict(feeds)))

    def stages(self, feeds):
        feeds = dict(feeds)
        return {FORWARD_STAGE: lambda: self.session.run(None, feeds)}


class TorchSession:
    def __init__(self, artifact_dir: Path, threads: int):
        import torch

        from .artifact import load_torch_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, self.manifest = load_torch_model(artifact_dir)
        self.input_names = [spec["name"] for spec in self.manifest.inputs]
        self.info = RuntimeInfo("torch", torch.__version__, threads, "cpu")
        self.files = (WEIGHTS_FILE,)

    def _tensors(self, feeds):
        return [self.torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.input_names]

    def run(self, feeds):
        with self.torch.inference_mode():
            outputs = self.model(*self._tensors(feeds))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return [out.numpy() for out in outputs]

    def stages(self, feeds):
        tensors = self._tensors(feeds)
        model, inference_mode = self.model, self.torch.inference_mode

        def call():
            with inference_mode():
                return model(*tensors)

        return {FORWARD_STAGE: call}


def load_onnxruntime(artifact_dir: Path, threads: int) -> Session:
    return OrtSession(Path(artifact_dir) / ONNX_FILE, threads)


RUNTIMES.add("torch", Runtime("torch", ("torch",), {
    "forward": "deploykit.runtime:TorchSession",
    "speech-translation": "deploykit.espnet:load_torch_session",
}))
RUNTIMES.add("onnxruntime", Runtime("onnxruntime", ("onnxruntime",), {
    "forward": "deploykit.runtime:load_onnxruntime",
    "speech-translation": "deploykit.st_decode:load_onnxruntime",
}))
