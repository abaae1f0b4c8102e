"""The csr form's torch side: `CSRLinear`, and the measured choice of which pruned Linear layers run as CSR.

Its own module because it imports torch at import time: the forms registry (`deploykit.convert.forms`)
stays cheap to import, for the command line's choices and for onnxruntime workers.
"""

from __future__ import annotations

import json
import warnings
from typing import Sequence

import torch
from torch import nn

from deploykit.convert import kernel_choice
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.hooks import called_modules, observe_forward
from deploykit.model.spec import cache_dir


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
    called = called_modules(model, inputs, nn.Linear)
    fused = {f"{parent}.{child}" if parent else child
             for parent, module in model.named_modules() if isinstance(module, FUSED_PARENTS)
             for child, _ in module.named_modules() if child}
    return [name for name, module in model.named_modules()
            if name in called and name not in fused and bool((module.weight == 0).any())]


def to_csr_modules(model: nn.Module, inputs: Sequence[torch.Tensor], recipe: dict) -> tuple[nn.Module, list[str]]:
    """Swap the layers chosen for CSR (see `deploykit.convert.kernel_choice`) for `CSRLinear`.

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
    """The kernel decision (`deploykit.convert.kernel_choice.decide_layer`) of each pruned Linear that can run
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


def measured_csr(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict) -> tuple[dict, dict]:
    """The csr form's (recipe, summary): each candidate layer's measured kernel choice at the batch
    `options["kernel_batch"]` and this process's threads."""
    batch = options.get("kernel_batch", 1)
    kernels = choose_kernels(stripped, spec.example_inputs(batch, seed=0) if spec is not None else inputs)
    recipe = {"kernels": kernels, "kernel_batch": batch, "threads": torch.get_num_threads()}
    chosen = [name for name, d in kernels.items() if d["choice"] == "csr"]
    noisy = [name for name, d in kernels.items() if d["noisy"]]
    return recipe, {"csr_layers": chosen, "dense_layers": sorted(set(kernels) - set(chosen)),
                    "noisy_kernel_decisions": noisy}


#: modules whose inference fast path reads their children's weights directly (torch's fused
#: transformer encoder kernel), bypassing the children's forward
FUSED_PARENTS = (nn.TransformerEncoderLayer,)
