"""Deployable forms of a stripped model: how its weights are stored and how PyTorch runs it.

A `Form` pairs a weights-file encoding (see `deploykit.storage`) with a conversion of the stripped,
dense-with-zeros model into the module PyTorch executes. The weights file always holds the stripped
model's own state-dict names, so any form can be rebuilt from the model spec plus the file.

How to add a form: write `to_torch(model) -> (model, converted_layer_names)` and register
``FORMS.add("name", Form("name", "what it is", encoding, to_torch))``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .registry import Registry


@dataclass(frozen=True)
class Form:
    name: str
    description: str
    #: weights-file encoding: "dense" (plain safetensors) or "compact" (smallest per tensor)
    encoding: str
    #: stripped model -> (module to run under PyTorch, names of the layers it converted)
    to_torch: Callable[[nn.Module], tuple[nn.Module, list[str]]]


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


def _as_is(model: nn.Module) -> tuple[nn.Module, list[str]]:
    return model, []


def to_csr_modules(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace every Linear layer that has zero weights by a `CSRLinear`; returns the converted names."""
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and bool((module.weight == 0).any()):
            model.set_submodule(name, CSRLinear(module))
            converted.append(name)
    return model, converted


for _form in (
    Form("dense", "stripped weights stored and run densely (zeros included)", "dense", _as_is),
    Form(
        "csr",
        "compact weights file; pruned Linear layers run as torch.sparse_csr under PyTorch",
        "compact",
        to_csr_modules,
    ),
):
    FORMS.add(_form.name, _form)
