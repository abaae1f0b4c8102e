"""Deployable forms of a stripped model: how its weights are stored and how PyTorch runs it.

A `Form` has three steps:

- `convert(stripped, spec, inputs, options) -> Converted`: the dense module that is saved and
  exported to ONNX, plus a JSON-friendly `recipe` stored in the manifest (dense-shrunk records the
  channels it removed; csr the per-layer kernel it measured and chose; dense nothing);
- `restore(fresh, spec, inputs, recipe)`: the recipe applied to a freshly built model at load time,
  before the weights, so that their shapes fit;
- `for_torch(module, inputs, recipe)`: the module PyTorch executes (csr swaps the chosen Linear
  layers for `CSRLinear`).

How to add a form: write those functions and ``FORMS.add("name", Form(...))``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import kernel_choice
from .fsutil import write_text_atomic
from .hints import hints_of
from .hooks import observe_forward
from .registry import Registry
from .spec import cache_dir


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


def _as_is(module: nn.Module, inputs: Sequence[torch.Tensor], recipe: dict) -> tuple[nn.Module, list[str]]:
    return module, []


@dataclass(frozen=True)
class Form:
    name: str
    description: str
    #: weights-file encoding: "dense" (plain safetensors) or "compact" (smallest per tensor)
    encoding: str
    convert: Callable[..., Converted] = _keep
    restore: Callable[..., nn.Module] = _restore_nothing
    #: (saved module, example inputs, recipe) -> (module PyTorch runs, names of layers it swapped)
    for_torch: Callable[[nn.Module, Sequence[torch.Tensor], dict], tuple[nn.Module, list[str]]] = _as_is
    #: store sparse initializers in model.onnx where that is smaller
    sparse_onnx: bool = False


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


def csr_candidates(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[str]:
    """Linear layers with zero weights that can safely run as `CSRLinear`.

    Some parents read a Linear's `weight` themselves instead of calling it (nn.MultiheadAttention's
    out_proj); swapping those would break the parent, so only layers whose forward runs during a
    pass over `inputs` qualify. Parents with a fused inference path (`FUSED_PARENTS`) call their
    Linears only when hooks are attached, so their children never qualify.
    """
    called = _called_modules(model, inputs, nn.Linear)
    fused = {f"{parent}.{child}" if parent else child
             for parent, module in model.named_modules() if isinstance(module, FUSED_PARENTS)
             for child, _ in module.named_modules() if child}
    return [name for name, module in model.named_modules()
            if name in called and name not in fused and bool((module.weight == 0).any())]


def to_csr_modules(model: nn.Module, inputs: Sequence[torch.Tensor], recipe: dict) -> tuple[nn.Module, list[str]]:
    """Swap the layers chosen for CSR (see `deploykit.kernel_choice`) for `CSRLinear`.

    The recipe's decisions hold for the thread count and batch they were measured at; run at others
    (this process's torch threads, the batch of `inputs`), the layers are decided again, and that
    decision is cached per machine."""
    batch, threads = _batch_of(inputs), torch.get_num_threads()
    kernels = recipe.get("kernels", {})
    if (recipe.get("threads"), recipe.get("kernel_batch")) != (threads, batch):
        kernels = choose_kernels(model, inputs, cache=True)
    return swap_to_csr(model, [name for name, decision in kernels.items() if decision["choice"] == "csr"])


def swap_to_csr(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """`model` with the named Linear layers replaced by `CSRLinear` (in place), and those names."""
    for name in names:
        model.set_submodule(name, CSRLinear(model.get_submodule(name)))
    return model, list(names)


def _batch_of(inputs: Sequence[torch.Tensor]) -> int:
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1


def choose_kernels(model: nn.Module, inputs: Sequence[torch.Tensor], cache: bool = False) -> dict[str, dict]:
    """The kernel decision (`deploykit.kernel_choice.decide_layer`) of each pruned Linear that can run
    as CSR, measured on the input it really receives from `inputs` (whose batch the decision is for),
    at this process's thread count. With `cache`, decisions are read from and written to the
    per-machine cache; noisy ones are never cached."""
    candidates = csr_candidates(model, inputs)
    captured: dict[str, torch.Tensor] = {}
    observe_forward(model, inputs, {model.get_submodule(name): lambda args, _o, name=name: captured.setdefault(
        name, args[0].detach()) for name in candidates})
    batch, threads = _batch_of(inputs), torch.get_num_threads()
    folder = cache_dir() / "kernels"
    decisions = {}
    for name in candidates:
        dense = model.get_submodule(name)
        key = kernel_choice.cache_key(name, dense.weight, threads, batch) if cache else ""
        decision = kernel_choice.cached_decision(folder, key) if cache else None
        if decision is None:
            decision = kernel_choice.decide_layer(dense, CSRLinear(dense), captured[name], batch)
            if cache and not decision["noisy"]:
                folder.mkdir(parents=True, exist_ok=True)
                write_text_atomic(folder / f"{key}.json", json.dumps(decision))
        decisions[name] = decision
    return decisions


def _measured_csr(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict) -> Converted:
    batch = options.get("kernel_batch", 1)
    kernels = choose_kernels(stripped, spec.example_inputs(batch, seed=0) if spec is not None else inputs)
    recipe = {"kernels": kernels, "kernel_batch": batch, "threads": torch.get_num_threads()}
    chosen = [name for name, d in kernels.items() if d["choice"] == "csr"]
    noisy = [name for name, d in kernels.items() if d["noisy"]]
    return Converted(stripped, recipe, {"csr_layers": chosen, "dense_layers": sorted(set(kernels) - set(chosen)),
                                        "noisy_kernel_decisions": noisy})


#: modules whose inference fast path reads their children's weights directly (torch's fused
#: transformer encoder kernel), bypassing the children's forward
FUSED_PARENTS = (nn.TransformerEncoderLayer,)


def _called_modules(model: nn.Module, inputs: Sequence[torch.Tensor], kind: type) -> set[str]:
    called: set[str] = set()
    observe_forward(model, inputs, {m: lambda _a, _o, name=name: called.add(name)
                                    for name, m in model.named_modules() if isinstance(m, kind)})
    return called


def _shrink(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict) -> Converted:
    from .shrink import shrink

    result = shrink(stripped, inputs, keep=options.get("keep", ()), best_effort=options.get("best_effort", False),
                    hints=hints_of(spec))
    return Converted(result.model, {"history": result.history, "blocks": result.block_history},
                     {"channels_removed": result.removed, "left_dense": result.skipped})


def _replay(fresh: nn.Module, spec, inputs: Sequence[torch.Tensor], recipe: dict) -> nn.Module:
    from .shrink import replay

    return replay(fresh, inputs, recipe.get("history", []), recipe.get("blocks", []), hints_of(spec))


for _form in (
    Form("dense", "stripped weights stored and run densely (zeros included)", "dense"),
    Form("csr", "compact weights file and sparse ONNX initializers; pruned Linear layers run as "
         "torch.sparse_csr under PyTorch where a measurement shows it beats dense",
         "compact", convert=_measured_csr, for_torch=to_csr_modules, sparse_onnx=True),
    Form("dense-shrunk", "channels that are zero across their coupled group physically removed",
         "dense", convert=_shrink, restore=_replay),
):
    FORMS.add(_form.name, _form)
