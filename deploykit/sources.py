"""Where a model comes from: a zoo name, or a path the user points at.

`resolve_model` turns what the user typed after `--model` into a `ModelSpec`: a registered name, or
a path one of the `PATH_SOURCES` recognises (today: a local Hugging Face GPT-2 directory, an ESPnet
experiment directory or zip). A spec
that is not from the zoo carries a `bundle` hook that writes what rebuilding it needs into the
artifact, and the manifest's `source` record names the loader that reads it back
(`spec_for_artifact`), so an artifact never depends on the path it was exported from.

How to add a source: write `accepts(path) -> bool` and `spec(path) -> ModelSpec` (whose `bundle`
returns {"kind": KIND, ...}) and `from_artifact(directory, manifest) -> ModelSpec`, then add a
`PathSource` to `PATH_SOURCES` and KIND to `ARTIFACT_SOURCES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ArtifactError, UsageError
from .spec import MODELS, ModelSpec, get_model, list_models

if TYPE_CHECKING:
    from .artifact import Manifest


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class PathSource:
    """Models read from a path: "module:function" names, imported on use (they import heavy libraries)."""

    kind: str
    description: str
    accepts: str
    spec: str


PATH_SOURCES = (
    PathSource("hf-directory", "a local Hugging Face GPT-2 directory (config.json + weights)",
               "deploykit.zoo.gpt2:is_hf_directory", "deploykit.zoo.gpt2:hf_directory_spec"),
    PathSource("espnet-experiment", "an ESPnet ST experiment directory or zip (config.yaml + model .pth)",
               "deploykit.zoo.espnet_st:is_experiment", "deploykit.zoo.espnet_st:experiment_spec"),
)
#: manifest source kind -> "module:function" rebuilding the spec from (artifact directory, manifest)
ARTIFACT_SOURCES = {
    "hf-directory": "deploykit.zoo.gpt2:hf_spec_from_artifact",
    "espnet-experiment": "deploykit.zoo.espnet_st:spec_from_artifact",
}


def resolve_model(text: str) -> ModelSpec:
    """The spec `text` names: a registered model, else a path a source recognises."""
    list_models()
    if text in MODELS:
        return get_model(text)
    path = Path(text)
    if path.exists():
        for source in PATH_SOURCES:
            if _resolve(source.accepts)(path):
                return _resolve(source.spec)(path)
        kinds = "; ".join(s.description for s in PATH_SOURCES)
        raise UsageError(f"{text!r} is not a model deploykit can read (it reads {kinds})")
    raise UsageError(f"unknown model {text!r}; known: {', '.join(MODELS.names())}; "
                     f"or the path of {' or '.join(s.description for s in PATH_SOURCES)}")


def spec_for_artifact(directory: Path, manifest: "Manifest") -> ModelSpec:
    """The spec an artifact's PyTorch model is rebuilt from: by zoo name, or from files it holds."""
    kind = manifest.source.get("kind")
    if kind == "zoo":
        return get_model(manifest.model)
    if kind not in ARTIFACT_SOURCES:
        raise ArtifactError(f"{str(directory)!r}: unknown model source {kind!r}; known: zoo, {', '.join(ARTIFACT_SOURCES)}")
    return _resolve(ARTIFACT_SOURCES[kind])(Path(directory), manifest)
