"""Deployable forms of a stripped model: how its weights are stored and how PyTorch runs it.

A `Form` has three steps:

- `convert(stripped, spec, inputs, options) -> Converted`: the dense module that is saved and
  exported to ONNX, plus a JSON-friendly `recipe` stored in the manifest (dense-shrunk records the
  channels it removed; csr the per-layer kernel it measured and chose; dense nothing);
- `restore(fresh, spec, inputs, recipe)`: the recipe applied to a freshly built model at load time,
  before the weights, so that their shapes fit;
- `for_torch(module, inputs, recipe)`: the module PyTorch executes (csr and bsr swap the chosen layers
  for `CSRLinear` / `BSRLinear`).

How to add a form: write those functions and ``FORMS.add("name", Form(...))``. This module is cheap
to import (the command line reads the form names from it; onnxruntime workers load it): a form's
torch side lives in its own module (`deploykit.convert.sparse`, `deploykit.convert.shrink`), imported by
the form's functions when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from deploykit.core.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Converted:
    #: the dense module to save (its state dict) and to export to ONNX
    module: "nn.Module"
    #: what `Form.restore` needs to rebuild these shapes from a fresh model; stored in the manifest
    recipe: dict[str, Any] = field(default_factory=dict)
    #: human-readable facts about the conversion, e.g. channels removed per layer
    summary: dict[str, Any] = field(default_factory=dict)


def _keep(stripped: "nn.Module", spec, inputs, options) -> Converted:
    return Converted(stripped)


def _restore_nothing(fresh: "nn.Module", spec, inputs, recipe) -> "nn.Module":
    return fresh


def _as_is(module: "nn.Module", inputs: "Sequence[torch.Tensor]", recipe: dict) -> "tuple[nn.Module, list[str]]":
    return module, []


@dataclass(frozen=True)
class Form:
    name: str
    description: str
    #: weights-file encoding: "dense" (plain safetensors) or "compact" (smallest per tensor)
    encoding: str
    convert: Callable[..., Converted] = _keep
    restore: "Callable[..., nn.Module]" = _restore_nothing
    #: (saved module, example inputs, recipe) -> (module PyTorch runs, names of layers it swapped)
    for_torch: "Callable[[nn.Module, Sequence[torch.Tensor], dict], tuple[nn.Module, list[str]]]" = _as_is
    #: store sparse initializers in model.onnx where that is smaller
    sparse_onnx: bool = False

    @property
    def rebuilds_shapes(self) -> bool:
        """Whether `restore` changes the fresh model (it then needs the model's values, not only its shapes)."""
        return self.restore is not _restore_nothing


FORMS: Registry[Form] = Registry("form")


def _measured_csr(stripped: "nn.Module", spec, inputs: "Sequence[torch.Tensor]", options: dict) -> Converted:
    from deploykit.convert.sparse import measured_csr  # torch side

    recipe, summary = measured_csr(stripped, spec, inputs, options)
    return Converted(stripped, recipe, summary)


def _measured_bsr(stripped: "nn.Module", spec, inputs: "Sequence[torch.Tensor]", options: dict) -> Converted:
    from deploykit.convert.sparse import measured_bsr  # torch side

    recipe, summary = measured_bsr(stripped, spec, inputs, options)
    return Converted(stripped, recipe, summary)


def _to_sparse_modules(model: "nn.Module", inputs: "Sequence[torch.Tensor]", recipe: dict) -> "tuple[nn.Module, list[str]]":
    from deploykit.convert.sparse import to_sparse_modules  # torch side

    return to_sparse_modules(model, inputs, recipe)


def _shrink(stripped: "nn.Module", spec, inputs: "Sequence[torch.Tensor]", options: dict) -> Converted:
    from deploykit.convert.shrink import shrink  # torch side
    from deploykit.model.hints import hints_of  # torch side

    result = shrink(stripped, inputs, keep=options.get("keep", ()), best_effort=options.get("best_effort", False),
                    hints=hints_of(spec), graph_timeout_s=options.get("graph_timeout_s"))
    return Converted(result.model, {"history": result.history, "blocks": result.block_history},
                     {"channels_removed": result.removed, "left_dense": result.skipped})


def _replay(fresh: "nn.Module", spec, inputs: "Sequence[torch.Tensor]", recipe: dict) -> "nn.Module":
    from deploykit.convert.shrink import replay  # torch side
    from deploykit.model.hints import hints_of  # torch side

    return replay(fresh, inputs, recipe.get("history", []), recipe.get("blocks", []), hints_of(spec))


for _form in (
    Form("dense", "stripped weights stored and run densely (zeros included)", "dense"),
    Form("csr", "compact weights file and sparse ONNX initializers; pruned Linear layers run as "
         "torch.sparse_csr under PyTorch where a measurement shows it beats dense",
         "compact", convert=_measured_csr, for_torch=_to_sparse_modules, sparse_onnx=True),
    Form("bsr", "compact weights file (kept blocks and a block mask where the zeros fall in blocks); pruned layers "
         "(Linear, 1x1 Conv, GPT-2's Conv1D) run as torch.sparse_bsr or torch.sparse_csr under PyTorch, whichever a "
         "measurement shows beats dense by most; onnxruntime runs dense initializers",
         "compact", convert=_measured_bsr, for_torch=_to_sparse_modules),
    Form("dense-shrunk", "channels that are zero across their coupled group physically removed",
         "dense", convert=_shrink, restore=_replay),
):
    FORMS.add(_form.name, _form)

#: what `deploykit export` and `deploykit audit` convert to without --form
DEFAULT_FORM = "dense"
#: what `deploykit bench` sweeps without --form
DEFAULT_FORMS = ("dense", "csr")
#: the batch csr times each layer's kernels at, unless asked otherwise
DEFAULT_KERNEL_BATCH = 1
