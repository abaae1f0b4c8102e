"""The sparse forms' torch side: layers run on a sparse weight (`CSRLinear`, `BSRLinear`), and the measured
choice of which pruned layers run so.

A layer that computes y = x W^T + b can run on a sparse W: `nn.Linear`, GPT-2's `Conv1D` (its weight
stored (in, out)), and a 1x1 `Conv1d`/`Conv2d` (stride 1, no padding, one group: a Linear over the
channel axis). The csr form's candidate kernel is CSR; the bsr form's are BSR, where the layer's zeros
fall in square blocks (`block_of`: torch's CPU BSR kernels, MKL's, take square blocks only, so a 1x4
pattern runs as CSR), and CSR: each layer's kernel is the fastest candidate that beats dense by the
measured, noise-guarded rule of `deploykit.convert.kernel_choice`, dense otherwise.

Its own module because it imports torch at import time: the forms registry (`deploykit.convert.forms`)
stays cheap to import, for the command line's choices and for onnxruntime workers.

Why the CSR kernel is `torch.mv` for a single row: at batch 1 it ran 1.7-1.9x faster than `addmm` on the
same CSR matrix (4096 x 4096 at 0.95, 1 thread, torch 2.10: 0.67 ms against 1.12 ms; dense 3.6 ms), and
through `addmm` deploykit's csr layers reached 2.7x of dense where `torch.mv` reaches 5x. BSR stays on
`addmm`: its `mv` was 2x slower than its `addmm` at batch 1.
"""

from __future__ import annotations

import json
import warnings
from typing import Sequence

import torch
from torch import nn

from deploykit.convert import kernel_choice
from deploykit.core.errors import ArtifactError
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.hooks import called_modules, class_path, observe_forward
from deploykit.core.storage import kept_blocks
from deploykit.model.spec import cache_dir
from deploykit.prune.layerwise import CONV1D_PATH, as_matrix

#: square block sides tried for BSR, largest first
BSR_BLOCKS = (32, 16, 8, 4, 2)
#: a block size fits a layer's zeros when the zeros its kept blocks hold are at most this share of them
BLOCK_SLACK = 0.05


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as a torch sparse matrix (inference only), for a Linear, a Conv1D or a
    1x1 Conv (channels on axis 1). W x^T is computed with the sparse operand on the left, the layout
    torch's sparse kernels support."""

    layout = ""

    def __init__(self, layer: nn.Module, blocksize: int | None = None):
        super().__init__()
        matrix = as_matrix(layer, layer.weight.detach())
        self.out_features, self.in_features = matrix.shape
        self.channels_first = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        self.blocksize = blocksize
        with warnings.catch_warnings():  # "sparse CSR/BSR support is in beta": true, and not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight", self.sparse(matrix.contiguous()))
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias.clone())

    def sparse(self, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out)."""
        return torch.addmm(self.bias.unsqueeze(1), self.weight, flat.T).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        out = self.product(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return out.movedim(-1, 1) if self.channels_first else out

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        block = f", block={self.blocksize}x{self.blocksize}" if self.blocksize else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, stored={nnz}{block}"


class CSRLinear(SparseLinear):
    layout = "csr"

    def sparse(self, matrix):
        return matrix.to_sparse_csr()

    def product(self, flat):
        if flat.shape[0] == 1:  # see the module docstring: mv is the faster CSR kernel for one row
            return (torch.mv(self.weight, flat[0]) + self.bias).unsqueeze(0)
        return super().product(flat)


class BSRLinear(SparseLinear):
    layout = "bsr"

    def sparse(self, matrix):
        return matrix.to_sparse_bsr((self.blocksize, self.blocksize))


#: kernel name -> the module that runs a layer with it (given the layer and, for bsr, the block side)
KERNELS = {"csr": CSRLinear, "bsr": BSRLinear}


def runs_as_matrix(module: nn.Module) -> bool:
    """Whether a layer computes y = x W^T + b, so that a sparse kernel can take it."""
    if isinstance(module, nn.Linear) or class_path(type(module)) == CONV1D_PATH:
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
                and module.groups == 1 and module.padding in ((0,), (0, 0), "valid"))
    return False


def block_of(module: nn.Module) -> int | None:
    """The largest square block side (`BSR_BLOCKS`) that divides the layer's (out, in) weight and whose
    kept blocks hold at most `BLOCK_SLACK` zeros; None where no block fits its zeros."""
    nonzero = as_matrix(module, module.weight.detach()) != 0
    rows, cols = nonzero.shape
    kept = int(nonzero.sum())
    if kept == nonzero.numel():
        return None
    for side in BSR_BLOCKS:
        if rows % side or cols % side:
            continue
        blocks = int(kept_blocks(nonzero, (side, side)).sum())
        if blocks * side * side <= (1 + BLOCK_SLACK) * kept:
            return side
    return None


def sparse_candidates(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[str]:
    """Layers with zero weights that can safely run on a sparse kernel.

    Some parents read a layer's `weight` themselves instead of calling it (nn.MultiheadAttention's
    out_proj); swapping those would break the parent, so only layers whose forward runs during a
    pass over `inputs` qualify. Parents with a fused inference path (`FUSED_PARENTS`) call their
    Linears only when hooks are attached, so their children never qualify.
    """
    called = called_modules(model, inputs, nn.Module)
    fused = {f"{parent}.{child}" if parent else child
             for parent, module in model.named_modules() if isinstance(module, FUSED_PARENTS)
             for child, _ in module.named_modules() if child}
    return [name for name, module in model.named_modules()
            if name and name in called and name not in fused and runs_as_matrix(module)
            and bool((module.weight == 0).any())]


def to_sparse_modules(model: nn.Module, inputs: Sequence[torch.Tensor], recipe: dict) -> tuple[nn.Module, list[str]]:
    """Swap the layers chosen for a sparse kernel (see `deploykit.convert.kernel_choice`) for it.

    The recipe's decisions hold for the thread count and batch they were measured at; run at others
    (this process's torch threads, the batch of `inputs`), the layers are decided again, among the
    kernels the recipe offered, and that decision is cached per machine."""
    batch, threads = _batch_of(inputs), torch.get_num_threads()
    offered = recipe.get("offered", ["csr"])
    if not isinstance(offered, list) or not offered or not set(offered) <= set(KERNELS):
        raise ArtifactError(f"the manifest's form recipe offers unknown kernels {offered!r}; known: {', '.join(KERNELS)}")
    if (recipe.get("threads"), recipe.get("kernel_batch")) != (threads, batch):
        # decided here, on this model's own candidates: nothing read from the manifest to check
        kernels = choose_kernels(model, inputs, cache=True, offered=tuple(offered))
        return swap_kernels(model, {name: d for name, d in kernels.items() if d["choice"] in KERNELS})
    return swap_kernels(model, _checked(model, inputs, recipe.get("kernels", {})))


def _checked(model: nn.Module, inputs: Sequence[torch.Tensor], kernels) -> dict[str, dict]:
    """The recipe's sparse decisions, each checked against the model (a manifest may be damaged or
    hostile): a layer a sparse kernel can run, a known kernel, a block side that divides its weight."""
    if not isinstance(kernels, dict) or not all(isinstance(d, dict) for d in kernels.values()):
        raise ArtifactError("the manifest's form recipe: kernels must map layer names to decisions")
    chosen = {name: d for name, d in kernels.items() if d.get("choice") != "dense"}
    candidates = set(sparse_candidates(model, inputs)) if chosen else set()
    for name, decision in chosen.items():
        if name not in candidates or decision.get("choice") not in KERNELS:
            raise ArtifactError(f"the manifest's form recipe runs {name!r} on {decision.get('choice')!r}: not a pruned "
                                f"layer of this model that a sparse kernel ({', '.join(KERNELS)}) can run")
        if decision["choice"] == "bsr":
            layer = model.get_submodule(name)
            block, shape = decision.get("block"), as_matrix(layer, layer.weight).shape
            if block not in BSR_BLOCKS or isinstance(block, bool) or shape[0] % block or shape[1] % block:
                raise ArtifactError(f"the manifest's form recipe gives {name!r} the block {block!r}, which does not "
                                    f"divide its {shape[0]}x{shape[1]} weight")
    return chosen


def swap_kernels(model: nn.Module, decisions: dict[str, dict]) -> tuple[nn.Module, list[str]]:
    """`model` with each named layer replaced (in place) by its decision's kernel, and those names."""
    for name, decision in decisions.items():
        layer = model.get_submodule(name)
        model.set_submodule(name, KERNELS[decision["choice"]](layer, decision.get("block")))
    return model, list(decisions)


def swap_to_csr(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """`model` with the named layers replaced by `CSRLinear` (in place), and those names."""
    return swap_kernels(model, {name: {"choice": "csr"} for name in names})


def _batch_of(inputs: Sequence[torch.Tensor]) -> int:
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1


def choose_kernels(model: nn.Module, inputs: Sequence[torch.Tensor], cache: bool = False,
                   offered: Sequence[str] = ("csr",)) -> dict[str, dict]:
    """The kernel decision (`deploykit.convert.kernel_choice.decide_layer`) of each pruned layer that can run
    on a sparse kernel, among the `offered` ones (bsr where the layer's zeros fall in square blocks),
    measured on the input it really receives from `inputs` (whose batch the decision is for), at this
    process's thread count. With `cache`, decisions are read from and written to the per-machine cache;
    noisy ones are never cached."""
    candidates = sparse_candidates(model, inputs)
    captured: dict[str, torch.Tensor] = {}
    observe_forward(model, inputs, {model.get_submodule(name): lambda args, _o, name=name: captured.setdefault(
        name, args[0].detach()) for name in candidates})
    batch, threads = _batch_of(inputs), torch.get_num_threads()
    folder = cache_dir() / "kernels"
    decisions = {}
    for name in candidates:
        dense = model.get_submodule(name)
        block = block_of(dense) if "bsr" in offered else None
        sparse = {kernel: KERNELS[kernel](dense, block) for kernel in offered if kernel != "bsr" or block}
        key = kernel_choice.cache_key(name, dense.weight, threads, batch, tuple(sparse)) if cache else ""
        decision = kernel_choice.cached_decision(folder, key) if cache else None
        if decision is None:
            weight = as_matrix(dense, dense.weight.detach())
            decision = kernel_choice.decide_layer(dense, sparse, captured[name], batch, weight=weight)
            if "bsr" in offered:
                decision["block"] = block
                if block is None:
                    decision["reason"] += "; no bsr: its zeros fall in no square block (torch's CPU BSR takes those only)"
            if cache and not decision["noisy"]:
                folder.mkdir(parents=True, exist_ok=True)
                write_text_atomic(folder / f"{key}.json", json.dumps(decision))
        decisions[name] = decision
    return decisions


def measured_kernels(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict,
                     offered: Sequence[str]) -> tuple[dict, dict]:
    """A sparse form's (recipe, summary): each candidate layer's measured kernel choice among `offered`
    at the batch `options["kernel_batch"]` and this process's threads."""
    batch = options.get("kernel_batch", 1)
    kernels = choose_kernels(stripped, spec.example_inputs(batch, seed=0) if spec is not None else inputs,
                             offered=offered)
    recipe = {"kernels": kernels, "kernel_batch": batch, "threads": torch.get_num_threads(), "offered": list(offered)}
    summary = {f"{kernel}_layers": [name for name, d in kernels.items() if d["choice"] == kernel] for kernel in offered}
    chosen = {name for name, d in kernels.items() if d["choice"] in KERNELS}
    summary.update({"dense_layers": sorted(set(kernels) - chosen),
                    "noisy_kernel_decisions": [name for name, d in kernels.items() if d["noisy"]]})
    if "bsr" in offered:
        summary["blocks"] = {name: d.get("block") for name, d in kernels.items() if d.get("block")}
    return recipe, summary


def measured_csr(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict) -> tuple[dict, dict]:
    return measured_kernels(stripped, spec, inputs, options, ("csr",))


def measured_bsr(stripped: nn.Module, spec, inputs: Sequence[torch.Tensor], options: dict) -> tuple[dict, dict]:
    return measured_kernels(stripped, spec, inputs, options, ("bsr", "csr"))


#: modules whose inference fast path reads their children's weights directly (torch's fused
#: transformer encoder kernel), bypassing the children's forward
FUSED_PARENTS = (nn.TransformerEncoderLayer,)
