"""Pre-release size audit: per-layer storage of an artifact, totals, and a verdict against budgets.

The audit reads the artifact itself rather than trusting its manifest: tensor shapes and nonzeros
come from loading (and so validating) the weights file, and stored bytes per tensor from the file's
own safetensors header. Budgets live in a TOML file, one table per model:

    ["mlp-sst2"]
    max_disk_mb = 1.5           # weights + model.onnx, MB = 10^6 bytes
    max_weights_mb = 0.7        # the weights file alone (an ONNX file's external data)
    max_onnx_mb = 1.0           # model.onnx alone
    max_parameters = 1_500_000  # parameters of the saved model
    max_growth = 0.05           # allowed growth of disk bytes and parameters over `baseline`
    baseline = "audits/mlp-sst2.json"   # an earlier `deploykit audit --json`, relative to this file

An unknown key or a value of the wrong type is an error naming the key and its line.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.core.confine import inside
from deploykit.core.errors import UsageError
from deploykit.core.storage import SEPARATOR, check_safetensors, load_weights
from deploykit.core.tomlfile import line_of, read_toml
from deploykit.model.artifact import WEIGHTS_FILE, count_weights, read_manifest, verify_artifact
from deploykit.model.onnxfile import initializers, is_parameter, open_onnx_file

MB = 1e6
#: budget key -> accepted value types
BUDGET_KEYS: dict[str, tuple[type, ...]] = {
    "max_disk_mb": (int, float),
    "max_weights_mb": (int, float),
    "max_onnx_mb": (int, float),
    "max_parameters": (int,),
    "max_growth": (int, float),
    "baseline": (str,),
}


@dataclass(frozen=True)
class LayerRow:
    parameter: str
    shape: list[int]
    numel: int
    nonzero: int
    sparsity: float
    #: dense, csr or bitmask (with "+zlib"/"+lzma" when compressed)
    storage: str
    stored_bytes: int
    #: a buffer (BatchNorm statistics, ...): stored, but not a parameter, as export counts them
    buffer: bool = False


@dataclass(frozen=True)
class Check:
    name: str
    limit: float
    actual: float
    ok: bool


@dataclass(frozen=True)
class AuditReport:
    model: str
    artifact: str
    rows: list[LayerRow]
    #: the parameters, counted as export counts them (each tied tensor once; buffers apart)
    parameters: int
    nonzero_parameters: int
    weights_bytes: int
    onnx_bytes: int
    checks: list[Check] = field(default_factory=list)
    #: elements of the stored tensors that are not parameters (BatchNorm's running statistics, ...)
    buffer_elements: int = 0

    @property
    def disk_bytes(self) -> int:
        return self.weights_bytes + self.onnx_bytes

    @property
    def within_budget(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "disk_bytes": self.disk_bytes, "within_budget": self.within_budget}


@dataclass(frozen=True)
class Budget:
    model: str
    limits: dict[str, Any]
    #: the budget file's directory, against which `baseline` is resolved
    root: Path


def load_budgets(path: str | Path) -> dict[str, Budget]:
    path = Path(path)
    data, text = read_toml(path, "budget file")
    budgets = {}
    for model, limits in data.items():
        if not isinstance(limits, dict):
            raise UsageError(f"budget file {str(path)!r}, line {line_of(text, model)}: {model!r} must be a "
                             f"table of limits, e.g. [\"{model}\"]")
        for key, value in limits.items():
            if key not in BUDGET_KEYS:
                raise UsageError(f"budget file {str(path)!r}, line {line_of(text, key)}: unknown key {key!r} "
                                 f"in [{model}]; known: {', '.join(BUDGET_KEYS)}")
            if not isinstance(value, BUDGET_KEYS[key]) or isinstance(value, bool):
                raise UsageError(f"budget file {str(path)!r}, line {line_of(text, key)}: {key} must be "
                                 f"{' or '.join(t.__name__ for t in BUDGET_KEYS[key])}, got {value!r}")
        budgets[model] = Budget(model, limits, path.parent)
    return budgets


def stored_bytes_per_tensor(path: Path) -> dict[str, int]:
    """Bytes each logical tensor occupies in a weights file, summed over its parts, from the header."""
    check_safetensors(path)  # a damaged header is refused naming the file, before it is read here
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    sizes: dict[str, int] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        name = key.split(SEPARATOR)[0]
        sizes[name] = sizes.get(name, 0) + end - start
    return sizes


def audit_artifact(directory: str | Path, verify: bool = True) -> AuditReport:
    """Per-tensor storage of an artifact, counted from its files (shapes, nonzeros and bytes as read,
    never as the manifest claims). With `verify`, every file is first checked against the sizes and
    checksums its manifest recorded (`IntegrityError` names the first that differs)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_artifact(directory, manifest)
    weights_path = inside(directory, WEIGHTS_FILE, "weights")
    tensors = load_weights(weights_path)  # validates every encoded part
    # every parameter the manifest lists is in the file: an artifact bench would refuse fails here too; the
    # count is export's, so that audit and export say the same number
    parameters, nonzero = count_weights(directory, manifest)
    names = set(manifest.parameter_names or [row.get("name") for row in manifest.sparsity if isinstance(row, dict)])
    sizes = stored_bytes_per_tensor(weights_path)
    codec = f"+{manifest.weight_compression}" if manifest.weight_compression else ""
    rows = []
    seen: set[int] = set()
    order = [n for n in manifest.weight_encodings if n in tensors] + sorted(set(tensors) - set(manifest.weight_encodings))
    for name in order:  # the model's own order (state dict), not the file's alphabetical one
        tensor = tensors[name]
        if id(tensor) in seen:  # a tied alias: stored once, listed once
            continue
        seen.add(id(tensor))
        rows.append(_row(name, list(tensor.shape), tensor.numel(), int(tensor.count_nonzero()),
                         manifest.weight_encodings.get(name, "dense") + codec, sizes.get(name, 0), name not in names))
    # every ONNX file the artifact ships: model.onnx, or an encoder/decoder pair
    onnx_bytes = sum(p.stat().st_size for p in directory.glob("*.onnx") if p.is_file() and not p.is_symlink())
    return dataclasses.replace(_report(manifest.model, directory, rows, weights_path.stat().st_size, onnx_bytes),
                               parameters=parameters, nonzero_parameters=nonzero)


def audit_onnx_file(path: str | Path) -> AuditReport:
    """The audit of an ONNX file as it is: its initializers (shape and index constants left out: they
    are not parameters), the graph file as "onnx" bytes and its external data files as "weights"
    bytes. The model's name, for budgets, is the file's name (["model.onnx"])."""

    path = Path(path)
    model = open_onnx_file(path)
    rows = [_row(r.name, r.shape, r.numel, r.nonzero, r.storage, r.stored_bytes)
            for r in initializers(model) if is_parameter(r)]
    files = model.files()
    external = sum(size for name, size in files.items() if name != path.name)
    return _report(path.name, path, rows, external, files[path.name])


def _row(name: str, shape: list[int], numel: int, nonzero: int, storage: str, stored_bytes: int,
         buffer: bool = False) -> LayerRow:
    return LayerRow(name, shape, numel, nonzero, (numel - nonzero) / numel if numel else 0.0, storage, stored_bytes,
                    buffer)


def _report(model: str, location: Path, rows: list[LayerRow], weights_bytes: int, onnx_bytes: int) -> AuditReport:
    parameters = [r for r in rows if not r.buffer]
    return AuditReport(model=model, artifact=str(location), rows=rows, parameters=sum(r.numel for r in parameters),
                       nonzero_parameters=sum(r.nonzero for r in parameters), weights_bytes=weights_bytes,
                       onnx_bytes=onnx_bytes, buffer_elements=sum(r.numel for r in rows if r.buffer))


def check_budget(report: AuditReport, budget: Budget) -> AuditReport:
    """The report with one `Check` per limit of `budget`."""
    limits = budget.limits
    checks = []
    for key, actual in (("max_disk_mb", report.disk_bytes / MB), ("max_weights_mb", report.weights_bytes / MB),
                        ("max_onnx_mb", report.onnx_bytes / MB), ("max_parameters", report.parameters)):
        if key in limits:
            checks.append(Check(key, limits[key], actual, actual <= limits[key]))
    if "max_growth" in limits:
        if "baseline" not in limits:
            raise UsageError(f"budget for {budget.model!r}: max_growth needs a baseline audit file")
        baseline = _read_baseline(inside(budget.root, limits["baseline"], f"budget {budget.model!r} baseline"))
        for what, now, before in (("disk", report.disk_bytes, baseline["disk_bytes"]),
                                  ("parameters", report.parameters, baseline["parameters"])):
            growth = (now - before) / before if before else 0.0
            checks.append(Check(f"max_growth ({what})", limits["max_growth"], growth, growth <= limits["max_growth"]))
    return dataclasses.replace(report, checks=checks)


def _read_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(data.get(k), int) for k in ("disk_bytes", "parameters")):
            raise ValueError("no disk_bytes/parameters")
        return data
    except FileNotFoundError:
        raise UsageError(f"baseline audit {str(path)!r} does not exist: write it from the release you compare "
                         f"against with `deploykit audit DIR --json={path}` (the budget's baseline is relative to the "
                         "budget file)") from None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError) as exc:
        raise UsageError(f"baseline audit {str(path)!r} is not a deploykit audit JSON ({exc})") from None
