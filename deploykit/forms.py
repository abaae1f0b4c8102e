"""Deployable forms of a stripped model: how its weights are stored and how PyTorch runs it.

A `Form` has three steps:

- `convert(stripped, spec, inputs) -> Converted`: the dense module that is saved and exported to ONNX,
  plus a JSON-friendly `recipe` that turns a freshly built model into one of the same shapes
  (dense-shrunk records which channels it removed; dense and csr need nothing);
- `restore(fresh, spec, inputs, recipe)`: that recipe applied at load time, before the weights;
- `for_torch(module)`: the module PyTorch executes (csr swaps pruned Linear layers for `CSRLinear`).

How to add a form: write those three functions and ``FORMS.add("name", Form(...))``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .registry import Registry


@dataclass(frozen=True)
class Converted:
    #: the dense module to save (its state dict) and to export to ONNX
    module: nn.Module
    #: what `Form.restore` needs to rebuild these shapes from a fresh model; stored in the manifest
    recipe: dict[str, Any] = field(default_factory=dict)
    #: human-readable facts about the conversion, e.g. channels removed per layer
    summary: dict[str, Any] = field(default_factory=dict)


def _keep(stripped: nn.Module, spec, inputs, options) -> Converted:
    return Converted(stripped)


def _restore_nothing(fresh: nn.Module, spec, inputs, recipe) -> nn.Module:
    return fresh


def _as_is(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[nn.Module, list[str]]:
    return module, []


@dataclass(frozen=True)
class Form:
    name: str
    description: str
    #: weights-file encoding: "dense" (plain safetensors) or "compact" (smallest per tensor)
    encoding: str
    convert: Callable[..., Converted] = _keep
    restore: Callable[..., nn.Module] = _restore_nothing
    #: (saved module, example inputs) -> (module PyTorch runs, names of layers it swapped)
    for_torch: Callable[[nn.Module, Sequence[torch.Tensor]], tuple[nn.Module, list[str]]] = _as_is


FORMS: Registry[Form] = Registry("form")


class CSRLinear(nn.Module):
    """A Linear layer whose weight is a `torch.sparse_csr` matrix (inference only).

    y = x W^T + b is computed as (W x^T)^T so that the sparse operand is on the left, the layout
    PyTorch's CSR kernels (`torch.addmm` with a CSR first argument) support.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta": true, and not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        out = torch.addmm(self.bias.unsqueeze(1), self.weight, flat.T).T  # (out, N) -> (N, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def to_csr_modules(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """Replace every Linear layer that has zero weights, and is called as a module, by a `CSRLinear`.

    Some parents read a Linear's `weight` themselves instead of calling it (nn.MultiheadAttention's
    out_proj); swapping those would break the parent, so only layers whose forward runs during a
    pass over `inputs` are converted. Parents with a fused inference path (`FUSED_PARENTS`) call
    their Linears only when hooks are attached, so their children are never converted.
    """
    called = _called_modules(model, inputs, nn.Linear)
    fused = {f"{parent}.{child}" if parent else child
             for parent, module in model.named_modules() if isinstance(module, FUSED_PARENTS)
             for child, _ in module.named_modules() if child}
    converted = []
    for name, module in list(model.named_modules()):
        if name in called and name not in fused and bool((module.weight == 0).any()):
            model.set_submodule(name, CSRLinear(module))
            converted.append(name)
    return model, converted


#: modules whose inference fast path reads their children's weights directly (torch's fused
#: transformer encoder kernel), bypassing the children's forward
FUSED_PARENTS = (nn.TransformerEncoderLayer,)


def _called_modules(model: nn.Module, inputs: Sequence[torch.Tensor], kind: type) -> set[str]:
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, name=name: called.add(name))
               for name, m in model.named_modules() if isinstance(m, kind)]
    try:
        with torch.inference_mode():  # the mode runtimes use, which is when fused paths kick in
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return called


def _shrink(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict) -> Converted:
    from .shrink import shrink

    result = shrink(stripped, inputs, keep=options.get("keep", ()), best_effort=options.get("best_effort", False))
    return Converted(result.model, {"history": result.history, "blocks": result.block_history},
                     {"channels_removed": result.removed, "left_dense": result.skipped})


def _replay(fresh: nn.Module, spec, inputs: Sequence[torch.Tensor], recipe: dict) -> nn.Module:
    from .shrink import replay

    return replay(fresh, inputs, recipe.get("history", []), recipe.get("blocks", []))


for _form in (
    Form("dense", "stripped weights stored and run densely (zeros included)", "dense"),
    Form("csr", "compact weights file; pruned Linear layers run as torch.sparse_csr under PyTorch",
         "compact", for_torch=to_csr_modules),
    Form("dense-shrunk", "channels that are zero across their coupled group physically removed",
         "dense", convert=_shrink, restore=_replay),
):
    FORMS.add(_form.name, _form)
