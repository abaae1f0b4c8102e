"""Models from the user's own code: `--model package.module:factory` or `--model path/to/file.py:factory`.

The factory takes no arguments and returns one of:

- a `ModelSpec`: the protocol the zoo uses (build, inputs, outputs, and the optional hooks: evaluate,
  calibration, output layers, pruning hints);
- `(model, example_inputs)`: an `nn.Module` and a tensor or tuple of tensors for one call. The inputs
  are described from the examples: names from `forward`'s signature, dim 0 is the batch (dynamic),
  other dims are fixed, dtypes as given, integer inputs take values in [0, max + 1). Outputs are named
  from one call: "output" for a tensor, "output_0", ... for a tuple, the keys of a dict;
- an `nn.Module` alone, when `--input-spec` describes its inputs.

`--input-spec` replaces whatever inputs the factory describes (to name a sequence axis, say). The
factory is called again each time the model is built, so it should build the same model every time
(deploykit seeds torch before calling it).

An artifact of a file entry point carries its code (`bundle_code`, export's default): the file and the
modules it imported from its own folder, copied into the artifact's `code/` folder, each file checksummed
like the artifact's others, and their combined SHA-256 (`code_digest`) in the source record, so a copied
artifact rebuilds its PyTorch model anywhere. A module entry point (`package.module:factory`) is recorded
by name and imported again where the artifact is loaded. Either way the code runs only with the user's
consent (`deploykit.model.sources.code_refusal`); onnxruntime needs only the ONNX file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from deploykit.core.confine import inside
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.fsutil import file_digest
from deploykit.core.outputs import flatten_outputs
from deploykit.model.spec import INPUT_DTYPES, InputSpec, ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

KIND = "entry-point"
#: the artifact's folder for the bundled code of a file entry point
CODE_DIR = "code"
#: what bundling copies at most: a factory's own modules, not a project (or a virtualenv inside it)
MAX_BUNDLED_FILES = 200
MAX_BUNDLED_BYTES = 16 * 2**20
#: file entry point's path -> the .py files it imported from its own folder (found when it is imported)
_LOCAL_MODULES: dict[str, tuple[Path, ...]] = {}
_TEXT = re.compile(r"^(?P<target>.+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class EntryPoint:
    """A factory by location: a module name or a .py file path (absolute once resolved), and its name."""

    target: str
    name: str

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py")

    @property
    def text(self) -> str:
        return f"{self.target}:{self.name}"

    @property
    def label(self) -> str:
        """The model's name in records: the file's name (not its directory) or the module, and the factory."""
        return f"{Path(self.target).name if self.is_file else self.target}:{self.name}"


def parse_entry_point(text: str) -> EntryPoint | None:
    """The entry point `text` names, or None when it is not `module:name` / `file.py:name`."""
    match = _TEXT.match(text)
    if match is None:
        return None
    target = match["target"]
    if target.endswith(".py"):
        return EntryPoint(str(Path(target).expanduser().absolute()), match["name"])
    return EntryPoint(target, match["name"]) if _MODULE.match(target) else None


def load_factory(entry: EntryPoint) -> Callable[[], Any]:
    module = _import_file(Path(entry.target)) if entry.is_file else _import_module(entry.target)
    factory = getattr(module, entry.name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"{entry.text}: {entry.target} has no factory {entry.name!r}"
                         f"{'; its functions and classes: ' + ', '.join(found) if found else ''}")
    return factory


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - user code: any import failure is theirs to read
        raise UsageError(f"cannot import {name!r}: {type(exc).__name__}: {exc}") from None


def _import_file(path: Path):
    """Import a .py file by path. Its directory is put first on sys.path while it runs, as when it
    runs as a script, so it can import modules beside it."""
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist")
    # one module per file path, so two files named model.py do not replace each other
    name = f"deploykit_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name while they load
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        del sys.modules[name]
        raise UsageError(f"cannot import {str(path)!r}: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(path.parent))
    _LOCAL_MODULES[str(path)] = _local_files(path.parent, [sys.modules[n] for n in set(sys.modules) - before
                                                           if n != name and sys.modules[n] is not None])
    return module


def _local_files(folder: Path, modules) -> tuple[Path, ...]:
    """The .py files of `modules` that lie in `folder` or below it, outside any installed environment."""
    environments = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    found = set()
    for module in modules:
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        resolved = Path(file).resolve()
        if (resolved.is_relative_to(folder.resolve()) and "site-packages" not in resolved.parts
                and not any(resolved.is_relative_to(env) for env in environments)):
            found.add(resolved)
    return tuple(sorted(found))


def entry_point_spec(text: str, inputs: Sequence[InputSpec] | None = None, bundle_code: bool = True) -> ModelSpec:
    """The ModelSpec of the entry point `text`, with `inputs` (from --input-spec) replacing its own.
    `bundle_code`: an artifact of a file entry point carries the file (and the modules it imported from
    its folder) in `code/`; without it the artifact names the file by its absolute path."""
    entry = parse_entry_point(text)
    if entry is None:
        raise UsageError(f"{text!r} is not an entry point (package.module:factory or path/to/file.py:factory)")
    factory = load_factory(entry)
    produced = _call(factory, entry)
    if isinstance(produced, ModelSpec):
        spec = produced
        if inputs:
            model = spec.build()
            inputs = _named(inputs, model)
            spec = dataclasses.replace(spec, inputs=tuple(inputs), sampler=None)
            _runs_on_described_inputs(model, spec, entry)
    else:
        model, examples = _module_and_examples(produced, entry, bool(inputs))
        if not inputs and _generates(model):
            return _as_hf_directory(model, entry)
        inputs = _named(inputs, model) if inputs else inputs
        described = tuple(inputs) if inputs else describe_inputs(model, examples)
        spec = ModelSpec(
            name=entry.label,
            build=lambda: _module_and_examples(_call(factory, entry), entry, True)[0],
            inputs=described,
            outputs=(),
            description=(inspect.getdoc(factory) or "").split("\n")[0],
        )
        spec = dataclasses.replace(spec, outputs=_runs_on_described_inputs(model, spec, entry))
    record = {"kind": KIND, "entry_point": entry.text,
              "inputs": [dataclasses.asdict(i) for i in inputs] if inputs else None}
    if entry.is_file and bundle_code:
        return dataclasses.replace(spec, bundle=lambda directory, model: bundle_files(directory, entry, record))
    return dataclasses.replace(spec, bundle=lambda directory, model: dict(record))


def bundle_files(directory: Path, entry: EntryPoint, record: dict) -> dict:
    """Copy the file of `entry`, and the modules it imported from its folder, into `directory`/code/ (keeping
    their places relative to the file), and return the source record naming them: the entry point inside
    the artifact, each file's SHA-256, their `code_digest`, and where they came from (provenance only)."""
    origin = Path(entry.target)
    files = (origin.resolve(), *(f for f in _LOCAL_MODULES.get(entry.target, ()) if f != origin.resolve()))
    if len(files) > MAX_BUNDLED_FILES or sum(f.stat().st_size for f in files) > MAX_BUNDLED_BYTES:
        raise UsageError(f"{entry.text} imported {len(files)} files from {str(origin.parent)!r} (over "
                         f"{MAX_BUNDLED_FILES} files or {MAX_BUNDLED_BYTES // 2**20} MB): too many to bundle into the "
                         "artifact; make the model's code a package and give package.module:factory, or --no-bundle-code")
    digests = {}
    for file in files:
        name = f"{CODE_DIR}/{file.relative_to(origin.parent.resolve()).as_posix()}"
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        digests[name] = file_digest(target)
    first = f"{CODE_DIR}/{origin.name}"
    return {**record, "entry_point": f"{first}:{entry.name}", "from": entry.text,
            "code": {"files": digests, "sha256": code_digest(digests)}}


def code_digest(digests: dict[str, str]) -> str:
    """One SHA-256 for a set of code files (name -> SHA-256): what `deploykit trust` consents to."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def bundled_files(directory: Path, source: dict) -> dict[str, Path] | None:
    """The files an artifact's source record bundles (name -> path inside the artifact); None where it
    bundles none. A file named outside the artifact, or a malformed record, is refused."""
    code = source.get("code")
    if code is None:
        return None
    files = code.get("files") if isinstance(code, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(n, str) and n.startswith(f"{CODE_DIR}/")
                                                           for n in files):
        raise ArtifactError(f"{str(directory)!r}: the manifest's source code record is malformed")
    return {name: inside(directory, name, "source code file") for name in files}


def bundled_code_digest(directory: Path, source: dict) -> str | None:
    """The `code_digest` of the code an artifact's source record bundles, computed from the files as they
    are now (never the recorded figure); None where it bundles none."""
    files = bundled_files(directory, source)
    return None if files is None else code_digest({name: file_digest(path) for name, path in files.items()})


def _generates(model) -> bool:
    """A transformers model that generates (a causal LM, an encoder-decoder) with its caches on: its
    forward returns them, and its ONNX export needs the decoder split optimum makes, not one traced
    call. With `config.use_cache = False` its forward pass is exported as one call like any model's."""
    can_generate = getattr(model, "can_generate", None)
    return (type(model).__module__.startswith("transformers.") and callable(can_generate)
            and hasattr(model, "save_pretrained") and bool(can_generate())
            and bool(getattr(getattr(model, "config", None), "use_cache", False)))


def _as_hf_directory(model, entry: EntryPoint) -> ModelSpec:
    """The spec of a generating transformers model returned by an entry point: saved (`save_pretrained`,
    config and safetensors) into a directory of this process's own, then read as a user's Hugging Face
    directory, so it is exported through the same optimum path (its caches as graph inputs and outputs)
    and its artifact carries its config and weights like a directory's. The directory is removed
    when the process ends."""
    import atexit
    import shutil
    import tempfile

    from deploykit.model.hf import hf_directory_spec  # torch side: transformers and torch

    directory = Path(tempfile.mkdtemp(prefix="deploykit-entry-point-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    try:
        model.save_pretrained(str(directory / "model"), safe_serialization=True)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises on a model it cannot save
        raise UsageError(f"{entry.text} returned a generating {type(model).__name__}, which deploykit exports "
                         f"through its Hugging Face directory; save_pretrained failed ({type(exc).__name__}: {exc})") from None
    try:
        spec = hf_directory_spec(directory / "model")
    except UsageError as exc:
        raise UsageError(f"{entry.text} returned a generating {type(model).__name__}, which deploykit exports through "
                         f"optimum as a generator, and cannot here ({str(exc).split(': ', 1)[-1]}); set "
                         "model.config.use_cache = False in the factory to export its forward pass (one call, no "
                         "caches) instead") from None
    return dataclasses.replace(spec, name=entry.label, description=f"{type(model).__name__} from {entry.text}")


def spec_from_artifact(directory: Path, manifest) -> ModelSpec:
    """The spec of an artifact exported from an entry point: the entry point imported again."""
    source = manifest.source
    inputs = [InputSpec(**{**i, "shape": tuple(i["shape"])}) for i in source.get("inputs") or []]
    text = str(source["entry_point"])
    files = bundled_files(directory, source)
    if files is not None:  # bundled: the entry point names one of the files inside the artifact
        entry = parse_entry_point(text)
        relative = text.rpartition(":")[0]
        if entry is None or not entry.is_file or relative not in files:
            raise ArtifactError(f"{str(directory)!r}: its entry point {text!r} is not one of its bundled files")
        text = f"{files[relative]}:{entry.name}"
    try:
        return entry_point_spec(text, inputs or None, bundle_code=True)
    except UsageError as exc:
        raise ArtifactError(f"{str(directory)!r}: its PyTorch model comes from {source['entry_point']}, which "
                            f"cannot be loaded here ({exc}); onnxruntime needs only the ONNX file") from None


def _named(inputs: Sequence[InputSpec], model: "nn.Module") -> list[InputSpec]:
    """`inputs` with an unnamed one (--input-shape) named after forward's one input."""
    if all(spec.name for spec in inputs):
        return list(inputs)
    if len(inputs) != 1:
        raise UsageError("--input-shape describes a one-input model; name each input with --input-spec")
    return [dataclasses.replace(inputs[0], name=_forward_names(model, 1)[0])]


def _call(factory: Callable[[], Any], entry: EntryPoint) -> Any:
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"factory {entry.text} failed: {type(exc).__name__}: {exc}") from None


def _module_and_examples(produced: Any, entry: EntryPoint, inputs_given: bool) -> "tuple[nn.Module, tuple]":
    import torch
    from torch import nn

    if isinstance(produced, nn.Module):
        if not inputs_given:
            raise UsageError(f"{entry.text} returned a model without example inputs: return (model, example_inputs) "
                             "or describe them with --input-spec NAME:SHAPE[:DTYPE[:HIGH]]")
        return produced, ()
    if isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], nn.Module):
        examples = produced[1]
        examples = (examples,) if isinstance(examples, torch.Tensor) else examples
        if isinstance(examples, (tuple, list)) and examples and all(isinstance(t, torch.Tensor) for t in examples):
            return produced[0], tuple(examples)
        raise UsageError(f"{entry.text}: example inputs must be a tensor or a tuple of tensors, got "
                         f"{type(produced[1]).__name__}")
    raise UsageError(f"{entry.text} returned {type(produced).__name__}; expected a ModelSpec, (nn.Module, example "
                     "inputs) or an nn.Module with --input-spec")


def describe_inputs(model: "nn.Module", examples: "Sequence[torch.Tensor]") -> tuple[InputSpec, ...]:
    """InputSpecs for example tensors: forward's parameter names, dim 0 the batch axis."""
    names = _forward_names(model, len(examples))
    specs = []
    for name, tensor in zip(names, examples):
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in INPUT_DTYPES:
            raise UsageError(f"example input {name!r} is {dtype}; deploykit feeds {', '.join(INPUT_DTYPES)}")
        if tensor.dim() == 0:  # a setting (a sample rate, a temperature), not data: every call gets its value
            try:
                specs.append(InputSpec(name, (), dtype, values=repr(tensor.item())))
            except ValueError as exc:  # nan, inf
                raise UsageError(f"example input {name!r} is a scalar deploykit cannot record: {exc}") from None
            continue
        high = int(tensor.max()) + 1 if dtype.startswith("int") else None
        if high is not None and int(tensor.min()) < 0:
            raise UsageError(f"example input {name!r} has negative values; describe its range with --input-spec")
        specs.append(InputSpec(name, ("batch", *tensor.shape[1:]), dtype, high))
    return tuple(specs)


def _runs_on_described_inputs(model: "nn.Module", spec: ModelSpec, entry: EntryPoint) -> tuple[str, ...]:
    """The model's output names, from one call on inputs as described (by --input-spec or its examples);
    a model that cannot take them (a wrong shape, rank or dtype) is the description's fault, said in
    one line, not a fault of deploykit's."""
    try:
        return output_names(model, spec.example_inputs(1))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises on inputs it cannot take
        shapes = ", ".join(f"{i.name}:{','.join(map(str, i.shape))}:{i.dtype}" for i in spec.inputs)
        raise UsageError(f"{entry.text} does not run on the inputs described ({shapes}): {type(exc).__name__}: "
                         f"{(str(exc).strip().splitlines() or [''])[0][:200]}; check --input-spec") from None


def _forward_names(model: "nn.Module", count: int) -> list[str]:
    schema = getattr(model.forward, "schema", None)  # a TorchScript method: no Python signature
    if schema is not None:
        parameters = [a.name for a in schema.arguments if a.name != "self" and not a.kwarg_only]
    else:
        parameters = [p.name for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = parameters[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def output_names(model: "nn.Module", inputs: "Sequence[torch.Tensor]") -> tuple[str, ...]:
    """Names for the outputs of one call (`deploykit.core.outputs`): "output", "output_0".., a dict's or
    ModelOutput's keys, paths into nested ones."""
    import torch

    with torch.no_grad():
        return tuple(name for name, _ in flatten_outputs(model.eval()(*inputs)))
