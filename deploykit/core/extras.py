"""The optional extras (pyproject's `[project.optional-dependencies]`): which packages each brings,
and the one line that says which extra to install when one of them is missing.

One table, so that every missing optional package is reported the same way wherever it is first
imported: by the functions that need it (`require`), and by the CLI's last line of defence
(`missing_extra`), which turns any `ModuleNotFoundError` of a package listed here into that line
instead of an "internal error". A package imported by one of these (espnet's own `yaml`, say) is
listed under the extra that brings it, since installing the extra is what fixes it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from deploykit.core.errors import UsageError


@dataclass(frozen=True)
class Extra:
    name: str
    #: what it is for, as `deploykit models` and the install line say it
    purpose: str
    #: top-level import names of the packages it installs (and of what they import that may be missing)
    modules: tuple[str, ...]


EXTRAS: dict[str, Extra] = {e.name: e for e in (
    Extra("espnet", "ESPnet speech translation (espnet, espnet_onnx, torchaudio, sacrebleu)",
          ("espnet", "espnet2", "espnet_onnx", "espnet_model_zoo", "torchaudio", "typeguard", "yaml", "sacrebleu",
           "torch_complex", "sentencepiece", "humanfriendly", "librosa", "soundfile")),
    Extra("hf", "Hugging Face support: model directories, GPT-2, the trained language models (transformers, optimum)",
          ("transformers", "optimum", "tokenizers", "huggingface_hub", "accelerate")),
    Extra("fleet", "benchmarking on the machines of a Ray cluster (ray)", ("ray",)),
    Extra("openvino", "the openvino runtime: Intel's inference engine, running the artifacts' ONNX graphs, and its "
          "int8 quantizers (openvino, nncf)", ("openvino", "nncf")),
)}


class MissingExtraError(UsageError):
    """An optional package is not installed; the message names the extra that installs it."""


def extra_of(module: str) -> Extra | None:
    """The extra whose packages include the top-level package of `module` (a dotted name), if any."""
    top = module.partition(".")[0]
    return next((extra for extra in EXTRAS.values() if top in extra.modules), None)


def install_line(extra: str) -> str:
    return f"pip install 'deploykit[{extra}]'"


def missing_extra(exc: BaseException | None, needed_for: str | None = None) -> MissingExtraError | None:
    """The one-line error for `exc`, or an exception it was raised from, when that is an import of a package
    an extra brings; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # a missing top-level package only: a missing submodule or name means the package is there but another
        # release than deploykit expects, which installing the extra would not change
        name = exc.name if isinstance(exc, ModuleNotFoundError) else None
        extra = extra_of(name) if name and "." not in name else None
        if extra is not None:
            break
        exc = exc.__cause__ or exc.__context__
    else:
        return None
    what = needed_for or extra.purpose.partition(" (")[0].partition(":")[0]
    return MissingExtraError(f"{what} needs the '{extra.name}' extra ({name} is not installed): "
                             f"{install_line(extra.name)}")


def require(module: str, needed_for: str):
    """`import module`, or a `MissingExtraError` naming the extra to install and what needs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, needed_for)
        if error is None:
            raise
        raise error from None
