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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from deploykit.core.errors import ArtifactError, UsageError
from deploykit.model.spec import INPUT_DTYPES, InputSpec

if TYPE_CHECKING:
    import onnx

#: the pipeline name runtimes register a loader for (`deploykit.runtime.session`)
PIPELINE = "onnx-file"
#: initializer element types counted as parameters (shape and index constants are not)
_INDEX_TYPES = ("int64", "int32")


@dataclass(frozen=True)
class ExternalData:
    tensor: str
    #: the file, relative to the model's directory, as the graph names it
    location: str
    length: int


def _model_proto(path: Path) -> "onnx.ModelProto":
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
    proto = _model_proto(path)
    external = tuple(_checked_external_data(path, proto))
    _check_tensor_sizes(path, proto, {ref.tensor: ref for ref in external})
    _check_graph(path, proto)
    return OnnxFile(path, proto, external)


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


def input_specs(model: OnnxFile, overrides: Sequence[InputSpec] = ()) -> tuple[InputSpec, ...]:
    """The graph's inputs as InputSpecs, with `overrides` (by name; an unnamed one for a one-input graph)."""
    import onnx

    path, graph = model.path, model.proto.graph
    constants = {init.name for init in graph.initializer}
    declared = [value for value in graph.input if value.name not in constants]
    by_name = {spec.name: spec for spec in overrides if spec.name}
    unnamed = [spec for spec in overrides if not spec.name]
    if unnamed and len(declared) != 1:
        raise UsageError(f"--input-shape needs a one-input model; {path.name} has inputs "
                         f"{', '.join(v.name for v in declared)}: use --input-spec NAME:SHAPE")
    unknown = sorted(set(by_name) - {v.name for v in declared})
    if unknown:
        raise UsageError(f"--input-spec names {', '.join(unknown)}, not inputs of {path.name} "
                         f"(its inputs: {', '.join(v.name for v in declared)})")
    specs = []
    for value in declared:
        if unnamed:
            specs.append(dataclasses.replace(unnamed[0], name=value.name))
            continue
        if value.name in by_name:
            specs.append(by_name[value.name])
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        if dtype not in INPUT_DTYPES:
            raise UsageError(f"input {value.name!r} of {path.name} is {dtype}; deploykit feeds {', '.join(INPUT_DTYPES)}")
        if dtype.startswith("int"):
            raise UsageError(f"input {value.name!r} of {path.name} is {dtype}: give its value range, e.g. "
                             f"--input-spec {value.name}:{','.join(map(str, _shape(value.name, tensor_type)))}:"
                             f"{dtype}:HIGH")
        specs.append(InputSpec(value.name, _shape(value.name, tensor_type), dtype))
    return tuple(specs)


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
    #: "inline", "external:FILE" or "sparse"
    storage: str
    stored_bytes: int


def initializers(model: OnnxFile) -> list[InitializerRow]:
    """Every initializer of the graph (external data read from the checked references)."""
    import numpy as np
    from onnx import numpy_helper

    path, graph = model.path, model.proto.graph
    refs = {ref.tensor: ref for ref in model.external}
    rows = []
    for init in graph.initializer:
        if init.name in refs:
            array = numpy_helper.to_array(init, base_dir=str(path.parent))
            storage, stored = f"external:{refs[init.name].location}", refs[init.name].length
        else:
            array = numpy_helper.to_array(init)
            storage, stored = "inline", len(init.raw_data) or array.nbytes
        rows.append(InitializerRow(init.name, list(array.shape), array.dtype.name, int(array.size),
                                   int(np.count_nonzero(array)), storage, stored))
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values, base_dir=str(path.parent))
        indices = numpy_helper.to_array(sparse.indices, base_dir=str(path.parent))
        numel = int(np.prod(sparse.dims)) if len(sparse.dims) else 1
        rows.append(InitializerRow(sparse.values.name or "sparse", list(sparse.dims), values.dtype.name, numel,
                                   int(np.count_nonzero(values)), "sparse", values.nbytes + indices.nbytes))
    return rows


def is_parameter(row: InitializerRow) -> bool:
    return row.dtype not in _INDEX_TYPES
