"""Per-parameter sparsity, as the SST-2 study tabulated it after a global pruning round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ParameterSparsity:
    """One parameter tensor: its size, how many entries are nonzero, whether pruning targeted it."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    pruned: bool

    @property
    def zeros(self) -> int:
        return self.numel - self.nonzero

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityTable:
    rows: tuple[ParameterSparsity, ...]

    @property
    def parameters(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def nonzero(self) -> int:
        return sum(r.nonzero for r in self.rows)

    @property
    def overall(self) -> float:
        """Zeros over all parameters of the model ("overall model")."""
        return _ratio(self.rows)

    @property
    def pruned_overall(self) -> float:
        """Zeros over the parameters pruning targeted ("all pruned parameters")."""
        return _ratio([r for r in self.rows if r.pruned])


def _ratio(rows) -> float:
    numel = sum(r.numel for r in rows)
    return sum(r.zeros for r in rows) / numel if numel else 0.0


def sparsity_table(model: "nn.Module", pruned: Collection[str] = ()) -> SparsityTable:
    """Count zeros of every parameter of a stripped (or masked) model.

    On a model still carrying masks, `weight_orig` is reported under its plain name with the masked
    values, so the table means the same before and after stripping.
    """
    import torch

    pruned = set(pruned)
    rows = []
    with torch.no_grad():
        for name, tensor in _effective_parameters(model):
            rows.append(
                ParameterSparsity(
                    name=name,
                    shape=tuple(tensor.shape),
                    numel=tensor.numel(),
                    nonzero=int(torch.count_nonzero(tensor)),
                    pruned=name in pruned,
                )
            )
    return SparsityTable(tuple(rows))


def _effective_parameters(model: "nn.Module"):
    """(name, tensor) per distinct parameter; a tied weight is reported once, under its first name."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name.endswith("_orig"):
                name = name[: -len("_orig")]
                # orig * mask, not the `weight` attribute: torch.nn.utils.prune recomputes that only in the
                # next forward pass, so after an optimizer step (training with masks) it is stale
                param = param * getattr(module, f"{name}_mask")
            yield (f"{module_name}.{name}" if module_name else name), param
