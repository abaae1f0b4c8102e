"""The exported artifact: a directory holding weights, `model.onnx` and `manifest.json`.

The manifest records everything needed to rebuild the PyTorch model (model name or source, form) and to judge
the artifact (pruning plan, per-parameter sparsity, sizes, parity errors, versions). This module does
not import torch: rebuilding the PyTorch model is the runtime layer's (`deploykit.runtime.loading`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.core.confine import check_named_paths, inside
from deploykit.core.errors import ArtifactError, IntegrityError
from deploykit.core.fsutil import atomic_directory, file_digest, read_text
from deploykit.core.storage import load_weights
from deploykit.model.spec import InputSpec

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
#: what a speech-translation artifact records about its graphs (feature width, decoder shape, token ids)
ST_CONFIG_FILE = "st_config.json"
FORMAT = "deploykit.artifact"
FORMAT_VERSION = 3
#: versions this deploykit reads (1: no checksums; 2: none of the manifest itself; such an artifact is
#: only used with --no-verify)
READABLE_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class Manifest:
    """What an artifact directory holds. Sizes are bytes; errors are max absolute differences."""

    model: str
    form: str
    #: the PruningPlan's fields
    plan: dict[str, Any]
    pruned_parameters: list[str]
    excluded_modules: list[str]
    #: the pruned (stripped) model, one entry per parameter: name, shape, numel, nonzero, sparsity, pruned
    sparsity: list[dict[str, Any]]
    #: parameters of the saved model (after conversion: fewer for dense-shrunk), and how many are nonzero
    parameters: int
    nonzero_parameters: int
    #: zeros over all parameters / over the pruned ones, in the saved model (after conversion)
    overall_sparsity: float
    pruned_sparsity: float
    #: parameters of the pruned model before conversion
    parameters_before_conversion: int
    #: FLOPs of one item (batch 1) by torch's flop counter, before and after conversion; None for models
    #: that are not one forward pass (encoder/decoder pairs)
    flops_before_conversion: int | None
    flops: int | None
    #: what Form.restore needs to rebuild the saved shapes (dense-shrunk: the pruning history)
    form_recipe: dict[str, Any]
    #: facts about the conversion (channels removed per layer; layers swapped for sparse kernels)
    conversion: dict[str, Any]
    #: module -> [shape before, shape after] for modules the conversion changed
    shape_changes: dict[str, list[str]]
    #: layers the form runs with other kernels under PyTorch (e.g. Linear -> CSRLinear)
    converted_layers: list[str]
    #: tensor name -> how the weights file stores it (dense, csr, bitmask), and its payload bytes
    weight_encodings: dict[str, str]
    weight_bytes: dict[str, int]
    #: codec the weights file is compressed with, if any
    weight_compression: str | None
    #: initializer name -> nonzeros, for initializers model.onnx stores as sparse_initializer
    onnx_sparse_initializers: dict[str, int]
    #: InputSpec fields per input
    inputs: list[dict[str, Any]]
    outputs: list[str]
    opset: int
    #: file name -> bytes on disk (the manifest itself excluded)
    files: dict[str, int]
    #: output name -> max |onnxruntime - torch| on the parity inputs
    onnx_parity_max_abs_error: dict[str, float]
    #: output name -> max |torch form - stripped dense model|
    form_parity_max_abs_error: dict[str, float]
    parity_tolerance: float
    versions: dict[str, str]
    created_utc: str
    #: quality of the pruned model from the model spec's evaluator (e.g. accuracy), when it has one
    metrics: dict[str, float] = field(default_factory=dict)
    #: what running the artifact means: "forward" (one graph) or "speech-translation" (encoder/decoder pair)
    pipeline: str = "forward"
    #: how to rebuild the PyTorch model: {"kind": "zoo"} (by model name), or a record naming files in
    #: the artifact (`deploykit.model.sources`)
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "zoo"})
    #: post-training quantization (`deploykit.convert.quantize`): scheme, settings, error statistics and task
    #: metrics per runtime; empty when the artifact is float
    quantization: dict[str, Any] = field(default_factory=dict)
    #: FLOPs of one item of the saved model with zero weights' multiply-adds left out (what sparse
    #: kernels could skip; pruning-at-initialisation papers' "remaining FLOPs"); None where not counted
    sparse_flops: int | None = None
    #: sparse_flops (of the saved model) / flops_before_conversion: the AG News study's "remaining
    #: FLOPs"; for dense-shrunk, whose weights are all nonzero, flops / flops_before_conversion
    remaining_flops_fraction: float | None = None
    #: the pruned model's figures before conversion (dense-shrunk changes them; dense and csr do not)
    nonzero_parameters_before_conversion: int | None = None
    overall_sparsity_before_conversion: float | None = None
    pruned_sparsity_before_conversion: float | None = None
    sparse_flops_before_conversion: int | None = None
    #: output name -> max abs error over the largest |PyTorch| value of that output, on the parity inputs
    onnx_parity_max_rel_error: dict[str, float] = field(default_factory=dict)
    #: what makes the artifact's checks weaker than they look (outputs constant on the parity inputs)
    warnings: list[str] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)
    #: file name -> SHA-256 (hex) of its contents, for every file in `files`; checked before use
    checksums: dict[str, str] = field(default_factory=dict)
    #: weight (a float parameter of 2+ dimensions) the plan left dense -> why (`prune.base.unpruned_weights`)
    unpruned_weights: dict[str, str] = field(default_factory=dict)
    #: for a model the zoo trains: its recipe (`deploykit.model.training.Recipe`) and the trained model's
    #: quality before pruning ("result"), beside which `metrics` (after pruning) is read
    training: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 (hex) of the manifest's own canonical JSON without this field (`manifest_digest`): an edit of
    #: any figure or setting in it (its form, its plan) is caught like an edited weights file
    manifest_sha256: str = ""
    #: the saved (converted) model's parameters, each tied tensor once: what `count_weights` counts in
    #: the weights file (a conversion may rename them: dense-shrunk's head-pruned attention splits
    #: `in_proj_weight` into q/k/v projections); empty in artifacts written before it was recorded
    parameter_names: list[str] = field(default_factory=list)
    #: how pruning went, beyond the plan: seconds it took; for the pruners that run the model, the
    #: calibration data (source, items), the outputs' agreement with the unpruned model, each layer's
    #: record (SparseGPT's output error, act-structured's reconstruction error before/after), recovery
    pruning: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @property
    def onnx_parity_error(self) -> float:
        return max(self.onnx_parity_max_abs_error.values(), default=0.0)


#: fields added to format 3 after its first release, with the value a manifest without them reads as:
#: left out of the digest at that value, so a manifest written before they existed still verifies
_LATER_FIELDS = {"parameter_names": [], "pruning": {}}
#: fields added after format version 1 first shipped: older manifests lack them and get the defaults
OPTIONAL_FIELDS = ("notes", "metrics", "pipeline", "source", "quantization", "sparse_flops",
                   "remaining_flops_fraction", "checksums", "nonzero_parameters_before_conversion",
                   "overall_sparsity_before_conversion", "pruned_sparsity_before_conversion",
                   "sparse_flops_before_conversion", "onnx_parity_max_rel_error", "warnings", "unpruned_weights",
                   "manifest_sha256", *_LATER_FIELDS)
#: keys of a manifest's source record that are provenance (never read as files) or code (`sources`)
_SOURCE_NOT_FILES = ("kind", "from", "entry_point")


def file_sizes(directory: str | Path) -> dict[str, int]:
    """File name -> bytes of an artifact directory's files, the manifest itself excluded; a file in a folder
    of the artifact (its bundled `code/`) by its relative POSIX path."""
    directory = Path(directory)
    return {name: (directory / name).stat().st_size for name in _files_in(directory) if name != MANIFEST_FILE}


def _files_in(directory: Path) -> list[str]:
    """Every entry of `directory` that is not a folder, by relative POSIX path, walking its folders (never a
    symbolic link to one), sorted."""
    found = []
    for root, folders, files in os.walk(directory, followlinks=False):
        relative = Path(root).relative_to(directory)
        found += [(relative / name).as_posix() for name in files]
        found += [(relative / name).as_posix() for name in folders if (Path(root) / name).is_symlink()]
    return sorted(found)


def with_file_records(manifest: Manifest, directory: str | Path) -> Manifest:
    """`manifest` with the sizes and checksums of the files `directory` holds now, and its own digest
    (the last step of writing an artifact)."""
    sizes = file_sizes(directory)
    recorded = dataclasses.replace(manifest, files=sizes, format_version=FORMAT_VERSION,
                                   checksums={name: file_digest(Path(directory) / name) for name in sizes})
    return dataclasses.replace(recorded, manifest_sha256=manifest_digest(recorded))


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 of the manifest's canonical JSON (keys sorted, no spaces), its own digest left out: the
    same for the manifest written and the one read back (JSON turns tuples into lists either way)."""
    return digest_of(json.loads(json.dumps(dataclasses.asdict(manifest))))


def digest_of(data: dict[str, Any]) -> str:
    """`manifest_digest` of a manifest's JSON object."""
    data = {k: v for k, v in data.items()
            if k != "manifest_sha256" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _annotation_types(annotation: str) -> tuple[type, ...]:
    """The JSON types a field's annotation allows ("dict[str, int]" -> dict; "int | None" -> int, None)."""
    kinds = {"dict": dict, "list": list, "str": str, "int": int, "float": (int, float), "None": type(None)}
    allowed: list[type] = []
    for part in annotation.split("|"):
        kind = kinds[part.strip().split("[")[0]]
        allowed.extend(kind if isinstance(kind, tuple) else (kind,))
    return tuple(allowed)


def _check_types(data: dict[str, Any], path: Path) -> None:
    for f in dataclasses.fields(Manifest):
        if f.name not in data:
            continue
        value, allowed = data[f.name], _annotation_types(f.type)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise ArtifactError(f"{str(path)!r}: field {f.name!r} is {type(value).__name__}, not "
                                f"{' or '.join(t.__name__ for t in allowed)}")
    for name, size in data["files"].items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{str(path)!r}: files[{name!r}] is not a size in bytes: {size!r}")


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the artifact in `directory`, checked for shape (fields and their types) and for
    the files it names (each inside the directory). Its figures are claims: `verify_artifact` checks
    the files against their recorded sizes and checksums, and counts come from the files themselves."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {str(directory)!r} does not exist")
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise ArtifactError(f"{str(directory)!r} is not a deploykit artifact (no {MANIFEST_FILE})")
    if not path.is_file() or path.is_symlink():
        raise ArtifactError(f"{str(path)!r} is not a regular file")
    try:
        data = json.loads(read_text(path, "manifest", ArtifactError))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"cannot read manifest {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{str(path)!r} is not a deploykit manifest")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{str(path)!r}: unsupported format_version {data.get('format_version')!r}")
    names = {f.name for f in dataclasses.fields(Manifest)}
    missing = sorted(n for n in names - set(data) if n not in OPTIONAL_FIELDS)
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise ArtifactError(f"{str(path)!r}: missing fields {missing}, unknown fields {unknown}")
    _check_types(data, path)
    for name in {*data["files"], *data.get("checksums", {})}:
        inside(directory, name, f"manifest files[{name!r}]")
    check_named_paths(data.get("source", {}), directory, f"{str(path)!r} source", skip=_SOURCE_NOT_FILES)
    try:
        for spec in data["inputs"]:
            InputSpec(**{**spec, "shape": tuple(spec["shape"])})
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{str(path)!r}: its inputs are malformed ({exc})") from None
    return Manifest(**data)


def owned_artifact(directory: Path) -> str | None:
    """None when `directory` is an artifact deploykit wrote (a manifest, and no file the manifest does
    not list), else why it is not: the test `--overwrite` applies before replacing a directory."""
    try:
        manifest = read_manifest(directory)
    except ArtifactError:
        return "it is not a deploykit artifact (no readable manifest.json)"
    extra = [name for name in _files_in(directory) if name != MANIFEST_FILE and name not in manifest.files]
    if extra:
        return f"it holds files its manifest does not list ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    return None


def verify_artifact(directory: str | Path, manifest: Manifest) -> None:
    """Check every file the manifest lists: present, a regular file inside the directory, of the
    recorded size and SHA-256. Raises `IntegrityError` naming the first file that differs."""
    directory = Path(directory)
    if not manifest.checksums or manifest.format_version < 3 or not manifest.manifest_sha256:
        raise IntegrityError(f"{str(directory)!r} records no checksums" + (" of its own manifest" if manifest.checksums
                                                                            else "")
                             + " (exported by an older deploykit): re-export it, or pass --no-verify to use it unchecked")
    if manifest_digest(manifest) != manifest.manifest_sha256:
        raise IntegrityError(f"{str(directory)!r}: {MANIFEST_FILE} does not match its own recorded SHA-256 (edited "
                             "since export: its form, plan or figures cannot be believed)")
    unchecked = sorted(set(manifest.files) ^ set(manifest.checksums))
    if unchecked:
        raise IntegrityError(f"{str(directory)!r}: the manifest lists {unchecked[0]!r} without a size and checksum")
    for name, size in manifest.files.items():
        path = inside(directory, name, f"manifest files[{name!r}]")
        if not path.is_file():
            raise IntegrityError(f"{str(directory)!r}: {name} is missing (the manifest lists it)")
        actual = path.stat().st_size
        if actual != size:
            raise IntegrityError(f"{str(directory)!r}: {name} is {actual:,} bytes, the manifest recorded {size:,} "
                                 "(truncated or replaced)")
        if file_digest(path) != manifest.checksums[name]:
            raise IntegrityError(f"{str(directory)!r}: {name} does not match its recorded SHA-256 (damaged or "
                                 "modified since export)")


def copy_artifact(source: str | Path, destination: str | Path, overwrite: bool = False) -> Manifest:
    """Copy the artifact at `source` to `destination` (created atomically; an existing one replaced
    only with `overwrite` and only if deploykit wrote it), verified before and after the copy."""
    source = Path(source)
    manifest = read_manifest(source)
    verify_artifact(source, manifest)
    with atomic_directory(destination, overwrite, owned=owned_artifact) as tmp:
        for name in (MANIFEST_FILE, *manifest.files):
            target = inside(tmp, name, f"manifest files[{name!r}]")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(inside(source, name, f"manifest files[{name!r}]"), target)
        verify_artifact(tmp, read_manifest(tmp))
    return manifest


def count_weights(directory: str | Path, manifest: Manifest) -> tuple[int, int]:
    """(parameters, nonzero parameters) counted in the artifact's weights file. The manifest only says
    which of its tensors are parameters (`parameter_names`, or in older artifacts its per-parameter
    rows; buffers such as BatchNorm statistics are not); every tensor it names must be in the file,
    and each tied tensor counts once."""
    directory = Path(directory)
    state = load_weights(inside(directory, WEIGHTS_FILE, "weights"))
    names = manifest.parameter_names or [row.get("name") for row in manifest.sparsity if isinstance(row, dict)]
    missing = [name for name in names if name not in state]
    if missing:
        raise IntegrityError(f"{str(directory)!r}: the manifest lists parameter {missing[0]!r}, which "
                             f"{WEIGHTS_FILE} does not hold")
    seen: set[int] = set()
    total = nonzero = 0
    for name in names:
        tensor = state[name]
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel()
        nonzero += int(tensor.count_nonzero())
    return total, nonzero
