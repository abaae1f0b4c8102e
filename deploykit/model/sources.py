"""Where a model comes from: a zoo name, the user's code, or a path the user points at.

`resolve_model` turns what the user typed after `--model` into a `ModelSpec`: a registered name, an
entry point (`package.module:factory`, `path/to/file.py:factory`; see `deploykit.model.entrypoint`), or a
path one of the `PATH_SOURCES` recognises (today: a local Hugging Face model directory, an ESPnet
experiment directory or zip). `ModelOptions` adds what the user gave beside it: a weights file for a
zoo or entry-point model (loaded safely: `deploykit.model.checkpoints`), input specs, and the task of a
Hugging Face directory. A spec
that is not from the zoo carries a `bundle` hook that writes what rebuilding it needs into the
artifact, and the manifest's `source` record names the loader that reads it back
(`spec_for_artifact`), so an artifact never depends on the path it was exported from.

How to add a source: write `accepts(path) -> bool` and `spec(path, task) -> ModelSpec` (whose `bundle`
returns {"kind": KIND, ...}) and `from_artifact(directory, manifest) -> ModelSpec`, then add a
`PathSource` to `PATH_SOURCES` and KIND to `ARTIFACT_SOURCES`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from deploykit.core.errors import ArtifactError, UntrustedCodeError, UsageError
from deploykit.core.fsutil import file_digest
from deploykit.model import hf
from deploykit.model.catalog import get_model  # the zoo, registered into MODELS on import
from deploykit.model.checkpoints import apply_checkpoint, load_checkpoint
from deploykit.model.entrypoint import (
    bundled_code_digest,
    entry_point_spec,
    parse_entry_point,
    spec_from_artifact as entrypoint_spec_from_artifact,
)
from deploykit.model.spec import MODELS, InputSpec, ModelSpec, apply_input_values
from deploykit.model.zoo import espnet_st as zoo_espnet

if TYPE_CHECKING:
    from deploykit.model.artifact import Manifest


@dataclass(frozen=True)
class PathSource:
    """Models read from a path: which paths it takes, and the spec of one."""

    kind: str
    description: str
    accepts: Callable[[Path], bool]
    #: (path, task or None) -> spec
    spec: Callable[[Path, "str | None"], ModelSpec]
    #: whether the model can be read for a task the user names (--task)
    takes_task: bool = False


def _espnet_spec(path: Path, task: str | None) -> ModelSpec:
    return zoo_espnet.experiment_spec(path)


PATH_SOURCES = (
    PathSource("hf-directory", "a local Hugging Face model directory (config.json + weights)",
               hf.is_hf_directory, hf.hf_directory_spec, takes_task=True),
    PathSource("espnet-experiment", "an ESPnet ST experiment directory or zip (config.yaml + model .pth)",
               zoo_espnet.is_experiment, _espnet_spec),
)
#: manifest source kind -> the function rebuilding the spec from (artifact directory, manifest)
ARTIFACT_SOURCES: dict[str, Callable[[Path, "Manifest"], ModelSpec]] = {
    "hf-directory": hf.hf_spec_from_artifact,
    "espnet-experiment": zoo_espnet.spec_from_artifact,
    "entry-point": entrypoint_spec_from_artifact,
}


@dataclass(frozen=True)
class ModelOptions:
    """What the user gave beside `--model`."""

    #: a weights file loaded into the built model (safetensors, or a torch checkpoint)
    weights: str | None = None
    #: let `weights` be a full pickle (it can run code)
    trust_pickle: bool = False
    #: inputs replacing the model's own description (entry points; ONNX files)
    inputs: tuple[InputSpec, ...] = ()
    #: the task a Hugging Face directory is loaded and exported for (default: its architectures')
    task: str | None = None
    #: input name -> what it holds instead of random data (`--input-value`, `deploykit.model.spec.VALUE_FORMS`)
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    #: a file entry point's artifact carries its code (`deploykit.model.entrypoint.bundle_files`)
    bundle_code: bool = True


def resolve_model(text: str, options: ModelOptions = ModelOptions()) -> ModelSpec:
    """The spec `text` names (a registered model, an entry point, else a path a source recognises),
    with `options` applied."""

    if text.endswith(".onnx"):
        raise UsageError(f"{text!r} is an ONNX file: `deploykit bench` and `deploykit audit` take it as it is; "
                         "pruning and export need the PyTorch model")
    from_code = text not in MODELS and parse_entry_point(text) is not None and not Path(text).exists()
    if options.inputs and not from_code:
        raise UsageError(f"--input-spec describes the inputs of an entry point (module:factory, file.py:factory) "
                         f"or an ONNX file; {text!r} declares its own")
    if options.trust_pickle and not options.weights:
        raise UsageError("--trust-pickle applies to a --weights file")
    if options.task is not None and (from_code or text in MODELS):
        raise UsageError(f"--task applies to a Hugging Face model directory; {text!r} is not one")
    if from_code:
        spec = entry_point_spec(text, options.inputs or None, options.bundle_code)
    elif text in MODELS:
        spec = get_model(text)
    else:
        spec = _path_spec(text, options.task)
        if options.weights:
            raise UsageError(f"--weights loads into a zoo or entry-point model; {text!r} carries its own weights")
    if options.values:
        spec = dataclasses.replace(spec, inputs=apply_input_values(spec.inputs, options.values, spec.name))
    return with_weights(spec, options.weights, options.trust_pickle) if options.weights else spec


def with_weights(spec: ModelSpec, path: str, trust_pickle: bool = False) -> ModelSpec:
    """`spec` building its model with the weights in `path` (read once, now: a bad file fails early).

    The artifact records which file (name and sha256) it came from; it does not need the file again,
    since it carries the pruned weights itself."""

    state = load_checkpoint(path, trust_pickle)
    apply_checkpoint(spec.make(trained=False), state, path)  # fits? (errors name what differs)
    provenance = {"file": Path(path).name, "sha256": file_digest(path)}
    bundle = spec.bundle

    def bundle_with_weights(directory: Path, model) -> dict:
        return {**(bundle(directory, model) if bundle else {"kind": "zoo"}), "weights": provenance}

    return dataclasses.replace(spec, build=lambda: apply_checkpoint(spec.build(), state, path), train=None,
                               bundle=bundle_with_weights)


def _path_spec(text: str, task: str | None) -> ModelSpec:
    path = Path(text)
    if path.exists():
        for source in PATH_SOURCES:
            if source.accepts(path):
                if task is not None and not source.takes_task:
                    raise UsageError(f"--task applies to a Hugging Face model directory; {text!r} is {source.description}")
                return source.spec(path, task)
        kinds = "; ".join(s.description for s in PATH_SOURCES)
        raise UsageError(f"{text!r} is not a model deploykit can read (it reads {kinds})")
    raise UsageError(f"unknown model {text!r}; known: {', '.join(MODELS.names())}; or an entry point "
                     f"(package.module:factory, path/to/file.py:factory); "
                     f"or the path of {' or '.join(s.description for s in PATH_SOURCES)}")


#: code consent that lets every entry point an artifact names be imported (`--trust-code`)
TRUST_ALL_CODE = "*"
#: code consent to bundled code of one digest (`deploykit.model.entrypoint.code_digest`): "sha256:HEX"
CODE_DIGEST_PREFIX = "sha256:"


def consent_of(source: dict) -> tuple[str, ...]:
    """The code consent a source record carries when deploykit made it from what the user gave this
    run (an entry point on the command line): that entry point (its bundled code's digest), and nothing else."""
    if source.get("kind") != "entry-point":
        return ()
    code = source.get("code")
    if isinstance(code, dict) and isinstance(code.get("sha256"), str):
        return (CODE_DIGEST_PREFIX + code["sha256"],)
    return (str(source["entry_point"]),)


def code_refusal(directory: Path, manifest: "Manifest", consent: Sequence[str] = ()) -> str | None:
    """Why rebuilding the artifact's PyTorch model would import code it names without the user's
    consent; None when it imports none (zoo, Hugging Face, ESPnet sources) or the user consented.

    `consent` holds TRUST_ALL_CODE, the entry points the user gave on the command line, and the digests
    of bundled code the user trusts (CODE_DIGEST_PREFIX + digest: `deploykit trust`, or this run's export).
    Bundled code is judged by the digest of its files as they are now, never by the recorded one."""
    if manifest.source.get("kind") != "entry-point":
        return None
    if TRUST_ALL_CODE in consent:
        return None
    named = str(manifest.source.get("entry_point"))
    digest = bundled_code_digest(Path(directory), manifest.source)
    if digest is not None:
        if CODE_DIGEST_PREFIX + digest in consent:
            return None
        return (f"{str(directory)!r}: its PyTorch model is built by the code it bundles ({named}, SHA-256 "
                f"{digest[:12]}...), which deploykit imports only with --trust-code, or once you trust that code: "
                f"`deploykit trust {directory}`; onnxruntime needs no code")
    entry = parse_entry_point(named)
    given = {parsed.text for text in consent if (parsed := parse_entry_point(text)) is not None}
    if entry is not None and entry.text in given:
        return None
    return (f"{str(directory)!r}: its PyTorch model is built by code the manifest names ({named}), which deploykit "
            "imports only with --trust-code (or when you give that entry point with --model); onnxruntime needs "
            "no code")


def spec_for_artifact(directory: Path, manifest: "Manifest", consent: Sequence[str] = ()) -> ModelSpec:
    """The spec an artifact's PyTorch model is rebuilt from: by zoo name, or from files it holds.
    Code the artifact names (an entry point) is imported only with `consent` (see `code_refusal`)."""
    kind = manifest.source.get("kind")
    if kind == "zoo":
        return get_model(manifest.model)
    if kind == "library":
        raise ArtifactError(f"{str(directory)!r} was exported from a ModelSpec built in Python, not a zoo name or an "
                            "entry point: load it with load_torch_model(directory, spec=that spec)")
    if kind not in ARTIFACT_SOURCES:
        raise ArtifactError(f"{str(directory)!r}: unknown model source {kind!r}; known: zoo, {', '.join(ARTIFACT_SOURCES)}")
    refusal = code_refusal(directory, manifest, consent)
    if refusal:
        raise UntrustedCodeError(refusal)
    return ARTIFACT_SOURCES[kind](Path(directory), manifest)


def inputs_for_artifact(directory: Path, manifest: "Manifest") -> ModelSpec:
    """A spec that makes the artifact's inputs without importing code it names: the source's own spec
    where building it runs no user code (its samplers), else one described by the manifest's inputs."""
    if code_refusal(directory, manifest) is None:
        return spec_for_artifact(directory, manifest)
    try:
        inputs = tuple(InputSpec(**{**i, "shape": tuple(i["shape"])}) for i in manifest.inputs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{str(directory)!r}: the manifest's inputs are malformed ({exc})") from None
    return ModelSpec(name=manifest.model, build=_no_model(directory), inputs=inputs, outputs=tuple(manifest.outputs))


def _no_model(directory: Path):
    def build():
        raise UntrustedCodeError(f"{str(directory)!r}: its PyTorch model needs code deploykit may not import")

    return build
