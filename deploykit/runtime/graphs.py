"""An artifact's ONNX graphs opened in the runtime and precision a target names, each called like
onnxruntime's `InferenceSession`.

The pipelines that run several graphs in turn (text generation with its key/value caches, text2text,
speech translation's encoder and decoder) call each graph through the few methods of onnxruntime's
`InferenceSession` they need: `get_inputs()` / `get_outputs()` (each with `name` and `shape`) and
`run(output names or None, feeds)`. A `GraphOpener` opens a file that way in onnxruntime, or in
OpenVINO behind the same interface (`OpenVinoGraph`), so one decoding loop serves every ONNX runtime.
Written here because neither library offers the other's interface, and the alternative (one copy of
each decoding loop per runtime) is the duplication the pipelines exist to avoid.

Precision is the opener's too: onnxruntime's float16 runs a copy of the graph converted by
onnxruntime's own `float16` tool (inputs and outputs kept float32, so callers feed and read the same
arrays); OpenVINO's is its compiled model's inference precision hint. Whether the machine runs a
precision natively is decided before anything is opened (`deploykit.runtime.precisions`).

Imports neither torch nor a runtime until a graph is opened: benchmark workers import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.extras import require
from deploykit.core.ort import CPU_PROVIDER, ort_session
from deploykit.core.registry import Registry
from deploykit.core.sigstack import signal_stack_kept
from deploykit.model.onnxfile import read_onnx_graph, with_dense_initializers
from deploykit.runtime.session import FORWARD_STAGE, RUNTIMES, RuntimeInfo, Target


@dataclass(frozen=True)
class GraphOpener:
    """Opens ONNX graphs as sessions of one runtime, on one device, with one precision and thread count."""

    runtime: str = "onnxruntime"
    threads: int = 1
    device: str = CPU_PROVIDER
    #: onnxruntime's graph optimisation level (None: its default; other runtimes have none)
    optimization: str | None = None
    precision: str = "f32"

    @classmethod
    def of(cls, target: Target, threads: int) -> "GraphOpener":
        return cls(target.runtime, threads, target.device, target.graph_optimization, target.precision)

    @classmethod
    def on_cpu(cls, runtime: str, threads: int = 1) -> "GraphOpener":
        """`runtime` on this machine's CPU, in f32 with its default settings."""
        return cls.of(RUNTIMES.get(runtime).default_target(), threads)

    def __call__(self, path: str | Path, spinning: bool = True):
        """The graph at `path` as a session. `spinning=False` where graphs take turns (an encoder, then
        a decoder): idle threads of one must not busy-wait while another runs (`core.ort.ort_session`)."""
        return GRAPH_RUNTIMES.get(self.runtime).open(self, Path(path), spinning)

    @property
    def info(self) -> RuntimeInfo:
        return GRAPH_RUNTIMES.get(self.runtime).info(self)


@dataclass(frozen=True)
class GraphRuntime:
    open: Callable[[GraphOpener, Path, bool], object]
    info: Callable[[GraphOpener], RuntimeInfo]


GRAPH_RUNTIMES: Registry[GraphRuntime] = Registry("graph runtime")


def _open_onnxruntime(opener: GraphOpener, path: Path, spinning: bool):
    if opener.precision not in ("f32", "f16"):
        raise UsageError(f"onnxruntime runs graphs in f32 or f16, not {opener.precision}")
    graph = float16_graph(path) if opener.precision == "f16" else None
    return ort_session(path, opener.threads, spinning=spinning, provider=opener.device,
                       optimization=opener.optimization, graph=graph)


def _onnxruntime_info(opener: GraphOpener) -> RuntimeInfo:
    import onnxruntime as ort

    return RuntimeInfo("onnxruntime", ort.__version__, opener.threads, opener.device)


def float16_graph(path: Path) -> bytes:
    """The graph at `path` (external data read from its own directory) with its float tensors and
    operators in float16, inputs and outputs still float32: onnxruntime's own converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    read_onnx_graph(path)  # a file that is not ONNX fails here in one line, before the converter
    try:
        model = onnx.load(str(path))
        return convert_float_to_float16(model, keep_io_types=True).SerializeToString()
    except (ValueError, KeyError, onnx.checker.ValidationError) as exc:
        raise ArtifactError(f"{str(path)!r}: onnxruntime's float16 converter cannot convert it ({exc})") from None


class OpenVinoGraph:
    """One ONNX graph as it is, compiled by OpenVINO (the `openvino` extra), called like an onnxruntime
    session.

    Every setting that changes its speed is set, not left to the plugin's defaults, and said in the
    device the records keep ("CPU latency f32"): `threads` inference threads, the latency performance
    hint with one stream (what a single caller gets; the throughput hint runs several requests in
    parallel, which a one-request timing loop never uses), and the inference precision (on a CPU with
    AVX-512 BF16 or AMX the plugin's own default is bf16, a different answer, so f32 is asked for
    unless the bench's precision axis asks otherwise)."""

    HINT = "LATENCY"

    def __init__(self, path: Path, threads: int, device: str = "CPU", precision: str = "f32"):
        ov = require("openvino", "the openvino runtime")
        core = ov.Core()
        config = {"PERFORMANCE_HINT": self.HINT, "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": precision}  # OpenVINO names them as deploykit does
        if device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        proto = read_onnx_graph(Path(path))
        # compiling installs a signal stack that goes with the compiled model (`core.sigstack`)
        with signal_stack_kept():
            self.compiled = core.compile_model(_openvino_model(core, Path(path), proto), device, config)
        self.request = self.compiled.create_infer_request()
        # a port carries every name its tensor has in the graph: the one the graph declares is its name
        declared = {v.name for v in (*proto.graph.input, *proto.graph.output)}
        self.input_ports = [_Port(p, declared) for p in self.compiled.inputs]
        self.output_ports = [_Port(p, declared) for p in self.compiled.outputs]
        self.by_name = {name: port for port in self.compiled.outputs for name in port.get_names()}

    def get_inputs(self):
        return self.input_ports

    def get_outputs(self):
        return self.output_ports

    def infer(self, feeds):
        """Run, leaving the outputs in the request's buffers (what a timing loop calls)."""
        return self.request.infer(feeds)

    def run(self, output_names, feeds) -> list[np.ndarray]:
        results = self.request.infer(dict(feeds))
        ports = self.compiled.outputs if output_names is None else [self.by_name[name] for name in output_names]
        # the request's output buffers are reused by its next call (a decoder feeds them back): copy
        return [np.array(results[port], copy=True) for port in ports]


class _Port:
    """An OpenVINO input or output as onnxruntime describes one: the name the graph declares (a port
    also carries the names of the tensors OpenVINO merged into it: T5's encoder output is one of three)
    and a shape whose dynamic dimensions are None."""

    def __init__(self, port, declared: set[str]):
        self.name = min((n for n in port.get_names() if n in declared), default=port.get_any_name())
        shape = port.get_partial_shape()
        self.shape = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else None


def _openvino_model(core, path: Path, proto):
    """The graph OpenVINO reads: the file itself, or, where it stores sparse initializers (the csr form's
    model.onnx), a copy with them dense (OpenVINO's ONNX reader takes none; onnxruntime densifies them at
    load too, so the figures are the same dense-kernel speed). `proto`: the file read without its
    external data."""
    if not proto.graph.sparse_initializer:
        return core.read_model(str(path))
    if any(t.data_location == t.EXTERNAL for t in proto.graph.initializer):
        raise UsageError(f"{str(path)!r}: openvino cannot read a graph with both sparse initializers and external data; "
                         "run it under onnxruntime, or export it in another form")
    return core.read_model(with_dense_initializers(proto, path).SerializeToString())


def _openvino_info(opener: GraphOpener) -> RuntimeInfo:
    ov = require("openvino", "the openvino runtime")
    return RuntimeInfo("openvino", ov.get_version().split("-")[0], opener.threads,
                       f"{opener.device} {OpenVinoGraph.HINT.lower()} {opener.precision}")


GRAPH_RUNTIMES.add("onnxruntime", GraphRuntime(_open_onnxruntime, _onnxruntime_info))
GRAPH_RUNTIMES.add("openvino", GraphRuntime(
    lambda opener, path, spinning: OpenVinoGraph(path, opener.threads, opener.device, opener.precision),
    _openvino_info))


class GraphSession:
    """A one-graph artifact (or ONNX file) in any ONNX runtime: the `Session` the forward and onnx-file
    pipelines load."""

    #: runs return host arrays, so a call ends when its device work has
    synchronize = None

    def __init__(self, path: Path, threads: int, target: Target):
        opener = GraphOpener.of(target, threads)
        self.graph = opener(path)
        self.info = opener.info
        self.files = (Path(path).name,)

    def run(self, feeds):
        return list(self.graph.run(None, dict(feeds)))

    def stages(self, feeds):
        feeds, graph = dict(feeds), self.graph
        # OpenVINO's `infer` leaves its outputs in the request's buffers: the timed call copies nothing
        call = graph.infer if isinstance(graph, OpenVinoGraph) else lambda f: graph.run(None, f)
        return {FORWARD_STAGE: lambda: call(feeds)}


def load_graph(path: Path, threads: int, target: Target) -> GraphSession:
    """The loader of a one-graph file, for every ONNX runtime."""
    return GraphSession(path, threads, target)
