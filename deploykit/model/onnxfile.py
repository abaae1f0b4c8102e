"""An ONNX file the user brings: checked, described, audited and benchmarked as it is (no pruning).

Large ONNX models keep their tensors in *external data* files named by relative paths inside the
graph. A crafted graph can name `../../home/user/.ssh/id_rsa` or an absolute path and make whoever
loads it read (and, through outputs, leak) any file; so every external reference is checked before
onnx or onnxruntime open anything: it must be relative, resolve (symbolic links followed) inside the
model's directory, and exist.

Inputs come from the graph: a symbolic first dimension is the batch axis, other symbolic dimensions
are sequence axes (set by --seq-len), integer inputs need a value range (--input-spec NAME:...:HIGH).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from deploykit.core.env import available_memory_bytes
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.model.spec import INPUT_DTYPES, InputSpec, with_value

if TYPE_CHECKING:
    import onnx

#: the pipeline name runtimes register a loader for (`deploykit.runtime.session`)
PIPELINE = "onnx-file"
#: element types of stored tensors that are not parameters (shape and index constants, conditions)
_INDEX_TYPES = ("int64", "int32", "bool")


@dataclass(frozen=True)
class ExternalData:
    tensor: str
    #: the file, relative to the model's directory, as the graph names it
    location: str
    length: int


def read_onnx_graph(path: Path) -> "onnx.ModelProto":
    import onnx

    if not path.is_file():
        raise UsageError(f"ONNX file {str(path)!r} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, onnx its own types
        raise ArtifactError(f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _tensors(graph) -> Iterator:
    """Every TensorProto a graph holds: initializers, sparse initializers' parts, Constant attributes,
    and those of subgraphs (If/Loop bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)


@dataclass(frozen=True)
class OnnxFile:
    """An ONNX file read once: its graph (external data not loaded) and its checked external references.
    Everything below works from this, so a large model is parsed once per command, not per question."""

    path: Path
    proto: "onnx.ModelProto"
    external: tuple[ExternalData, ...]

    def files(self) -> dict[str, int]:
        """File name (relative to the model's directory) -> bytes, for the model and its external data."""
        files = {self.path.name: self.path.stat().st_size}
        for ref in self.external:
            files.setdefault(ref.location, (self.path.parent / ref.location).stat().st_size)
        return files


def open_onnx_file(path: str | Path) -> OnnxFile:
    """Read the graph at `path` and check it before anything loads it: every external data reference
    stays inside the model's directory and fits its file, every tensor's declared size matches the
    bytes it holds, and the graph passes onnx's checker."""
    path = Path(path)
    proto = read_onnx_graph(path)
    external = tuple(_checked_external_data(path, proto))
    _check_tensor_sizes(path, proto, {ref.tensor: ref for ref in external})
    _check_graph(path, proto)
    return OnnxFile(path, proto, external)


def check_runnable(model: OnnxFile) -> None:
    """Refuse, before anything runs the graph, one whose work or memory is beyond a bound on its face:
    Loop trip counts and fixed tensor shapes (the inputs' own sizes are checked per batch and length).
    Only what runs the graph asks; an audit reads it without running it."""
    _check_loops(model.path, model.proto.graph)
    _check_static_sizes(model.path, model.proto)


#: a tensor the graph computes may take at most this share of the memory available (the inputs' rule)
TENSOR_MEMORY_SHARE = 0.25


def _check_static_sizes(path: Path, proto: "onnx.ModelProto") -> None:
    """Refuse a graph that computes a tensor of a fixed shape too large for the memory available
    (a ConstantOfShape or Expand to 10^12 elements), found by onnx's shape inference with constant
    propagation before anything runs. Shapes that depend on the inputs' named axes are left to the
    inputs' own memory check; a graph shape inference cannot read is left to onnxruntime."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a best effort; onnx.checker already passed
        return
    limit = TENSOR_MEMORY_SHARE * available_memory_bytes()
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if not tensor_type.HasField("shape") or not all(d.HasField("dim_value") for d in dims):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        size = math.prod(d.dim_value for d in dims) * itemsize
        if size > limit:
            raise ArtifactError(f"{str(path)!r}: the graph computes {value.name!r} of shape "
                                f"{[d.dim_value for d in dims]} ({size / 2**30:.3g} GiB), more than "
                                f"{TENSOR_MEMORY_SHARE:.0%} of the {available_memory_bytes() / 2**30:.3g} GiB available; "
                                "refused before running it")


#: the most iterations the Loop nodes of a graph may declare, nested loops multiplied: one call of a
#: model should finish in useful time (generation loops run hundreds of steps, not billions). Loops
#: whose count is computed at run time are bounded by bench's --max-time instead.
MAX_LOOP_ITERATIONS = 10**6


def _constant_ints(graph) -> dict[str, int]:
    """Name -> value of the graph's one-element integer constants (initializers and Constant nodes)."""
    from onnx import TensorProto, numpy_helper

    def scalar(tensor) -> int | None:
        if tensor.data_type in (TensorProto.INT32, TensorProto.INT64) and math.prod(tensor.dims) == 1:
            return int(numpy_helper.to_array(tensor).reshape(-1)[0])
        return None

    values = {init.name: scalar(init) for init in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute if node.op_type == "Constant" and node.output else ():
            if attribute.name == "value" and attribute.HasField("t"):
                values[node.output[0]] = scalar(attribute.t)
            elif attribute.name == "value_int":
                values[node.output[0]] = int(attribute.i)
            elif attribute.name == "value_ints" and len(attribute.ints) == 1:
                values[node.output[0]] = int(attribute.ints[0])
    return {name: value for name, value in values.items() if value is not None}


def _check_loops(path: Path, graph, outer: int = 1, scope: dict[str, int] | None = None) -> None:
    """Refuse a graph whose Loop nodes declare more than MAX_LOOP_ITERATIONS iterations in all (a
    constant trip count, multiplied through nested loops) before anything runs it. A subgraph sees
    the constants of the graphs around it (ONNX's outer scope)."""
    constants = {**(scope or {}), **_constant_ints(graph)}
    for node in graph.node:
        iterations = outer
        if node.op_type == "Loop" and node.input and node.input[0] in constants:
            iterations = outer * max(constants[node.input[0]], 0)
            if iterations > MAX_LOOP_ITERATIONS:
                raise ArtifactError(f"{str(path)!r}: Loop node {node.name or node.output[0]!r} runs {iterations:,} "
                                    f"iterations (nested loops multiplied), more than the {MAX_LOOP_ITERATIONS:,} "
                                    "one call may take; refused before running it")
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _check_loops(path, sub, iterations, constants)


def _check_graph(path: Path, proto: "onnx.ModelProto") -> None:
    import onnx

    try:
        # by path: external data is checked where it lies (beside the model), not beside the process
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ArtifactError(f"{str(path)!r} is not a valid ONNX graph: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _check_tensor_sizes(path: Path, proto: "onnx.ModelProto", external: dict[str, ExternalData]) -> None:
    """Refuse tensors whose declared shape does not match the bytes they hold (read nothing yet): a
    crafted dimension of 10^12 would otherwise be allocated when the tensor is read."""
    import onnx

    for tensor in _tensors(proto.graph):
        if any(dim < 0 for dim in tensor.dims):
            raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} declares a negative dimension {list(tensor.dims)}")
        count = 1
        for dim in tensor.dims:
            count *= dim
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} has unknown element type {tensor.data_type}") from None
        if tensor.name in external and tensor.data_location == onnx.TensorProto.EXTERNAL:
            held = external[tensor.name].length
        elif tensor.HasField("raw_data"):
            held = len(tensor.raw_data)
        else:  # typed fields (float_data, int64_data, ...): one entry per element (two for complex)
            held = None
            stored = max(len(tensor.float_data), len(tensor.int32_data), len(tensor.int64_data),
                         len(tensor.double_data), len(tensor.uint64_data), len(tensor.string_data))
            if stored and stored < count:
                raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} declares {count:,} elements and holds "
                                    f"{stored:,}")
        if held is not None and itemsize and held < count * itemsize and tensor.data_type != onnx.TensorProto.STRING:
            raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} declares shape {list(tensor.dims)} "
                                f"({count * itemsize:,} bytes) and holds {held:,} bytes")


def _checked_external_data(path: Path, proto: "onnx.ModelProto") -> list[ExternalData]:
    """The external data references of `proto`, each checked to stay inside the model's directory."""
    import onnx

    root = path.parent.resolve()
    found = []
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                                "model's directory; refused (external data must sit beside the model)")
        if not target.is_file():
            raise ArtifactError(f"{str(path)!r}: external data file {location!r} of tensor {tensor.name!r} is missing")
        size = target.stat().st_size
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else size - offset
        except ValueError:
            raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} has a non-numeric external offset or length "
                                f"({entries.get('offset')!r}, {entries.get('length')!r})") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ArtifactError(f"{str(path)!r}: tensor {tensor.name!r} keeps {length:,} bytes at offset {offset:,} of "
                                f"{location!r}, which holds {size:,}: impossible (truncated or crafted)")
        found.append(ExternalData(tensor.name, location, length))
    return found


def input_specs(model: OnnxFile, overrides: Sequence[InputSpec] = (), values: "dict[str, str] | None" = None,
                ) -> tuple[InputSpec, ...]:
    """The graph's inputs as InputSpecs, with `overrides` (by name; an unnamed one for a one-input graph)
    and `values` (`--input-value`, by name) applied."""
    import onnx

    path, graph = model.path, model.proto.graph
    constants = {init.name for init in graph.initializer}
    declared = [value for value in graph.input if value.name not in constants]
    by_name = {spec.name: spec for spec in overrides if spec.name}
    unnamed = [spec for spec in overrides if not spec.name]
    if unnamed and len(declared) != 1:
        raise UsageError(f"--input-shape needs a one-input model; {path.name} has inputs "
                         f"{', '.join(v.name for v in declared)}: use --input-spec NAME:SHAPE")
    values = values or {}
    unknown = sorted(set(values) - {v.name for v in declared})
    if unknown:
        raise UsageError(f"--input-value names {', '.join(unknown)}, not inputs of {path.name} "
                         f"(its inputs: {', '.join(v.name for v in declared)})")
    unknown = sorted(set(by_name) - {v.name for v in declared})
    if unknown:
        raise UsageError(f"--input-spec names {', '.join(unknown)}, not inputs of {path.name} "
                         f"(its inputs: {', '.join(v.name for v in declared)})")
    specs = []
    for value in declared:
        if unnamed:
            specs.append(dataclasses.replace(unnamed[0], name=value.name))
            continue
        tensor_type = value.type.tensor_type
        if value.name in by_name:
            spec = _fitting(by_name[value.name], value.name, tensor_type, path)
            specs.append(with_value(spec, values[value.name]) if value.name in values else spec)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        if dtype not in INPUT_DTYPES:
            raise UsageError(f"input {value.name!r} of {path.name} is {dtype}; deploykit feeds {', '.join(INPUT_DTYPES)}")
        shape = _shape(value.name, tensor_type)
        if value.name in values:
            specs.append(with_value(InputSpec(value.name, shape, dtype, values="0"), values[value.name]))
            continue
        if dtype.startswith("int"):
            raise UsageError(f"input {value.name!r} of {path.name} is {dtype} of shape ({','.join(map(str, shape))}): "
                             f"say what it holds with --input-value {value.name}=int:0:HIGH (random integers below "
                             "HIGH: token ids), a number (a setting such as a sample rate: 16000), ones or arange")
        specs.append(InputSpec(value.name, shape, dtype))
    return tuple(specs)


def _fitting(spec: InputSpec, name: str, tensor_type, path: Path) -> InputSpec:
    """`spec` (from --input-spec), refused in one line where the graph declares another rank, fixed size
    or element type for the input: onnxruntime would refuse it mid-run."""
    import onnx

    declared = _shape(name, tensor_type)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    given = ",".join(map(str, spec.shape))
    if tensor_type.HasField("shape") and len(declared) != len(spec.shape):
        raise UsageError(f"--input-spec {name}:{given} has {len(spec.shape)} axes; {path.name} declares "
                         f"{len(declared)} ({','.join(map(str, declared))})")
    for axis, (want, got) in enumerate(zip(declared, spec.shape)):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            raise UsageError(f"--input-spec {name}:{given}: axis {axis} is {got}; {path.name} declares {want}")
    if dtype != spec.dtype:
        raise UsageError(f"--input-spec {name} is {spec.dtype}; {path.name} declares {dtype}")
    return spec


def _shape(name: str, tensor_type) -> tuple[int | str, ...]:
    dims = []
    for i, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        elif i == 0:
            dims.append("batch")
        else:
            dims.append(dim.dim_param if dim.dim_param.isidentifier() else f"{name}_{i}")
    return tuple(dims)


@dataclass(frozen=True)
class InitializerRow:
    name: str
    shape: list[int]
    dtype: str
    numel: int
    nonzero: int
    #: "inline", "constant" (a Constant node's value), "external:FILE" or "sparse"
    storage: str
    stored_bytes: int


def initializers(model: OnnxFile) -> list[InitializerRow]:
    """Every stored tensor of the graph a model computes with, each once: initializers, sparse
    initializers, the values of `Constant` nodes (where some exporters keep every weight), and the same
    inside subgraphs (`If` branches, `Loop` and `Scan` bodies), a subgraph's rows named after the node
    that holds it ("If_3/then_branch/W"). External data is read from the checked references. A
    weight used by many nodes is one tensor, counted once; a fill value of another operator
    (ConstantOfShape's) is not a weight."""
    rows: list[InitializerRow] = []
    _collect_tensors(model, model.proto.graph, "", rows)
    return rows


def _collect_tensors(model: OnnxFile, graph, prefix: str, rows: list[InitializerRow]) -> None:
    for init in graph.initializer:
        rows.append(_tensor_row(model, init, prefix + init.name, "inline"))
    for sparse in graph.sparse_initializer:
        rows.append(_sparse_row(model, sparse, prefix + (sparse.values.name or "sparse")))
    for index, node in enumerate(graph.node):
        where = f"{node.name or f'{node.op_type}_{index}'}"
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    rows.append(_tensor_row(model, attribute.t, prefix + node.output[0], "constant"))
                elif attribute.name == "sparse_value" and attribute.HasField("sparse_tensor"):
                    rows.append(_sparse_row(model, attribute.sparse_tensor, prefix + node.output[0]))
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _collect_tensors(model, attribute.g, f"{prefix}{where}/{attribute.name}/", rows)
            for i, sub in enumerate(attribute.graphs):
                _collect_tensors(model, sub, f"{prefix}{where}/{attribute.name}[{i}]/", rows)


def _tensor_row(model: OnnxFile, tensor, name: str, storage: str) -> InitializerRow:
    import numpy as np
    from onnx import numpy_helper

    if tensor.data_location == tensor.EXTERNAL:  # every external reference was checked by open_onnx_file
        entries = {entry.key: entry.value for entry in tensor.external_data}
        array = numpy_helper.to_array(tensor, base_dir=str(model.path.parent))
        storage, stored = f"external:{entries.get('location', '')}", array.nbytes
    else:
        array = numpy_helper.to_array(tensor)
        stored = len(tensor.raw_data) or array.nbytes
    return InitializerRow(name, list(array.shape), array.dtype.name, int(array.size), int(np.count_nonzero(array)),
                          storage, stored)


def _sparse_row(model: OnnxFile, sparse, name: str) -> InitializerRow:
    import numpy as np
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values, base_dir=str(model.path.parent))
    indices = numpy_helper.to_array(sparse.indices, base_dir=str(model.path.parent))
    numel = int(np.prod(sparse.dims)) if len(sparse.dims) else 1
    return InitializerRow(name, list(sparse.dims), values.dtype.name, numel, int(np.count_nonzero(values)), "sparse",
                          values.nbytes + indices.nbytes)


def is_parameter(row: InitializerRow) -> bool:
    return row.dtype not in _INDEX_TYPES


def with_dense_initializers(proto: "onnx.ModelProto", path: Path) -> "onnx.ModelProto":
    """A copy of `proto` whose graph's sparse initializers are dense initializers of the same names: for a
    runtime whose ONNX reader takes none (OpenVINO's). Indices are checked against the shape (a damaged
    file is an `ArtifactError` naming the tensor, not an IndexError)."""
    import numpy as np
    from onnx import numpy_helper

    out = type(proto)()
    out.CopyFrom(proto)
    for sparse in out.graph.sparse_initializer:
        name, dims = sparse.values.name, tuple(int(d) for d in sparse.dims)
        values = numpy_helper.to_array(sparse.values, base_dir=str(path.parent)).reshape(-1)
        indices = numpy_helper.to_array(sparse.indices, base_dir=str(path.parent)).astype(np.int64)
        numel = math.prod(dims)
        if any(d < 0 for d in dims) or numel * values.itemsize > available_memory_bytes():
            raise ArtifactError(f"{str(path)!r}: sparse initializer {name!r} declares a {dims} tensor, more than this "
                                "machine's free memory holds dense")
        if indices.ndim == 2 and indices.shape == (values.size, len(dims)):
            if ((indices < 0) | (indices >= np.array(dims, dtype=np.int64))).any():
                raise ArtifactError(f"{str(path)!r}: sparse initializer {name!r} has an index outside its shape {dims}")
            indices = np.ravel_multi_index(indices.T, dims) if values.size else indices.reshape(-1)
        if indices.ndim != 1 or indices.size != values.size or (indices.size and (indices.min() < 0 or
                                                                                  indices.max() >= numel)):
            raise ArtifactError(f"{str(path)!r}: sparse initializer {name!r}: its indices do not address its "
                                f"{values.size} values in a {dims} tensor")
        dense = np.zeros(numel, dtype=values.dtype)
        dense[indices] = values
        out.graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), name))
    del out.graph.sparse_initializer[:]
    return out
