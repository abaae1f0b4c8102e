"""onnxruntime sessions made one way: explicit threads, no inter-op parallelism, a provider that either
starts or fails loudly, an optional optimised-graph file.

In the bottom layer because every layer that touches ONNX needs a session the same way: parity
checks after export (convert), quantization's calibration (convert), benchmark sessions (runtime).
onnxruntime itself is imported on use: importing this module must stay cheap.
"""

from __future__ import annotations

import contextlib
import re
from contextvars import ContextVar
from pathlib import Path

from deploykit.core.errors import ArtifactError, ExportError, MeasurementError, UsageError

#: onnxruntime graph optimisation levels by name (onnxruntime's own default is "all")
GRAPH_OPTIMIZATIONS = ("disabled", "basic", "extended", "all")
DEFAULT_GRAPH_OPTIMIZATION = "all"


CPU_PROVIDER = "CPUExecutionProvider"
#: while `recording_feeds` is active: resolved graph path -> the feeds of its session's last run
_RECORDING: ContextVar[dict | None] = ContextVar("deploykit_ort_recording", default=None)


def ort_session(onnx_path: str | Path, threads: int, spinning: bool = True, provider: str = CPU_PROVIDER,
                optimization: str | None = None, optimized_path: str | Path | None = None, probe: bool = False,
                graph: bytes | None = None):
    """An onnxruntime session on `provider` with `threads` intra-op threads and no inter-op parallelism,
    at graph optimisation level `optimization` (GRAPH_OPTIMIZATIONS; default onnxruntime's, "all"),
    writing the optimised graph to `optimized_path` when given.

    Operators the provider lacks run on the CPU provider, as onnxruntime intends; a provider that
    fails to start is an error here, not onnxruntime's silent fall-back to the CPU, so a figure
    labelled CUDA was measured on CUDA.

    `probe=True` silences onnxruntime's own error log, for sessions run to find out whether a graph
    fails (the caller reports the failure).

    `graph`, where given, is the serialized graph to run in place of the file's (a converted copy of
    it: float16); `onnx_path` still names it in messages.

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
        session = ort.InferenceSession(str(onnx_path) if graph is None else graph, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad graphs
        lines = str(exc).strip().splitlines()
        raise ArtifactError(f"onnxruntime cannot load {str(onnx_path)!r}: {lines[0][:300] if lines else type(exc).__name__}") from None
    if session.get_providers()[0] != provider:
        raise MeasurementError(f"onnxruntime could not start {provider} for {Path(onnx_path).name} "
                               f"(it offered {', '.join(session.get_providers())})")
    calls = _RECORDING.get()
    return session if calls is None else _RecordingSession(session, Path(onnx_path).resolve(), calls)


_FAILED_NODE = re.compile(r"running (?P<op>\w+) node\. Name:'(?P<name>[^']*)' Status Message: (?P<status>.*)", re.S)


def run_graph(session, feeds: dict, what: str) -> list:
    """`session.run(None, feeds)`, an onnxruntime failure raised as one line naming the node, its
    operator and onnxruntime's reason (`ExportError`), not onnxruntime's exception."""
    try:
        return session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        text = " ".join(str(exc).split())
        failed = _FAILED_NODE.search(text)
        if failed is None:
            raise ExportError(f"{what}: onnxruntime cannot run the graph: {text[:300]}") from None
        status = re.sub(r"/\S+:\d+ ", "", failed["status"])  # onnxruntime's source path and line
        raise ExportError(f"{what}: onnxruntime fails at node {failed['name']!r} ({failed['op']}): {status[:240]}; "
                          "a shape fixed when the graph was traced (at the trace batch) that these inputs do not "
                          "have does this: export with --form dense to tell the form from the model, and name "
                          "the node when you report it") from None


@contextlib.contextmanager
def recording_feeds():
    """Within it, every session `ort_session` makes keeps the feeds of its last run, in the dictionary
    yielded (resolved graph path -> feeds): what a pipeline fed each of its graphs, for measuring a
    graph's nodes on their real inputs. Only the last run's, so a decoding loop holds one step's cache."""
    calls: dict[Path, dict] = {}
    token = _RECORDING.set(calls)
    try:
        yield calls
    finally:
        _RECORDING.reset(token)


class _RecordingSession:
    """An onnxruntime session that records its feeds (see `recording_feeds`), otherwise itself."""

    def __init__(self, session, path: Path, calls: dict):
        self._session, self._path, self._calls = session, path, calls

    def run(self, output_names, feeds, *args, **kwargs):
        self._calls[self._path] = dict(feeds)
        return self._session.run(output_names, feeds, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def _graph_level(name: str):
    import onnxruntime as ort

    levels = dict(zip(GRAPH_OPTIMIZATIONS, (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)))
    if name not in levels:
        raise UsageError(f"unknown graph optimisation {name!r}; choose from {', '.join(GRAPH_OPTIMIZATIONS)}")
    return levels[name]

