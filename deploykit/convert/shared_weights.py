"""One copy of the weights for graphs that hold the same ones: ONNX external data shared between files.

optimum exports a generating model as several graphs (a decoder without and with the key/value cache;
an encoder beside them) and writes every weight into each, so the artifact holds the model twice.
`share_weights` moves the initializers of those graphs into one external-data file, each distinct
tensor once (found by content, since the graphs may name the same weight differently), and points
every graph at it by offset: the ONNX format's own mechanism, which onnxruntime reads. Small tensors
(shapes, scales, constants) stay inside their graph. The graphs keep working alone; the data file is
part of the artifact like any other file (sizes and checksums in its manifest, verified on load).

Run it last on graphs deploykit writes (after sparse storage and after quantization, which both rewrite
graphs with their tensors inline): the data file is rewritten from the graphs as they are then.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from deploykit.core.fsutil import atomic_path

#: the external data file the graphs of an artifact share
SHARED_WEIGHTS_FILE = "graphs.weights"
#: tensors smaller than this stay inside their graph (an external reference costs about 60 bytes)
MIN_EXTERNAL_BYTES = 1024
#: offsets are aligned so that a reader may map the file (onnxruntime does for large tensors)
ALIGNMENT = 4096


def share_weights(directory: str | Path, names: Sequence[str]) -> None:
    """Put the large initializers of the graphs `names` (files in `directory`) into one shared
    external-data file, each distinct tensor once, and point the graphs at it."""
    import onnx
    from onnx import numpy_helper

    directory = Path(directory)
    models = {name: onnx.load(str(directory / name)) for name in names}  # external data loaded, if any
    offsets: dict[str, tuple[int, int]] = {}  # content digest -> (offset, length)
    with atomic_path(directory / SHARED_WEIGHTS_FILE) as tmp, open(tmp, "wb") as data:
        for model in models.values():
            for tensor in model.graph.initializer:
                raw = numpy_helper.to_array(tensor).tobytes()
                if len(raw) < MIN_EXTERNAL_BYTES:
                    continue
                digest = hashlib.sha256(raw + str((tensor.data_type, tuple(tensor.dims))).encode()).hexdigest()
                if digest not in offsets:
                    offset = -(-data.tell() // ALIGNMENT) * ALIGNMENT
                    data.seek(offset)
                    data.write(raw)
                    offsets[digest] = (offset, len(raw))
                offset, length = offsets[digest]
                _point_at(tensor, SHARED_WEIGHTS_FILE, offset, length)
        data.flush()
        os.fsync(data.fileno())
    for name, model in models.items():
        with atomic_path(directory / name) as tmp:
            onnx.save(model, str(tmp))


def with_shared_weights(directory: str | Path, names: Sequence[str]) -> list[str]:
    """The files graphs `names` load from `directory`: themselves, and the shared weights if written."""
    return [*names, *([SHARED_WEIGHTS_FILE] if (Path(directory) / SHARED_WEIGHTS_FILE).is_file() else [])]


def _point_at(tensor, location: str, offset: int, length: int) -> None:
    """Make `tensor` an external reference into `location` at `offset` (its data leaves the graph)."""
    import onnx

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
