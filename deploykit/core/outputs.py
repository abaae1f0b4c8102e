"""Model outputs of every common shape, flattened to named tensors.

Models return a tensor, a tuple or list, a dict, a Hugging Face `ModelOutput` (an ordered mapping of
its fields that are set), a dataclass or a named tuple, nested at will. Parity checks, ONNX export,
pruning's loss and benchmarks all need the same flat list of tensors, with names that stay the same
from one call to the next: a path of keys and positions ("last_hidden_state",
"past_key_values.0.1"), "output" for a lone tensor and "output_0", "output_1", ... for a top-level
sequence. A transformers `Cache` object is its legacy tuple of (key, value) per layer. Outputs that are None (optional outputs a model leaves out) are skipped.

Written here because none of the libraries in the stack fits: torch's pytree flattens without names
and does not know `ModelOutput`, and torch-pruning's `flatten_as_list` drops the names too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from deploykit.core.errors import UsageError


def flatten_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `output`, in order."""
    found: list[tuple[str, torch.Tensor]] = []
    _walk(output, "", found)
    if not found:
        raise UsageError(f"the model returned no tensor (it returned {type(output).__name__})")
    return found


def flat_tensors(output: Any) -> list[torch.Tensor]:
    return [tensor for _, tensor in flatten_outputs(output)]


def flat_arrays(output: Any) -> list:
    """The flat tensors as numpy arrays on the host: what parity checks and sessions compare."""
    return [host_array(tensor) for tensor in flat_tensors(output)]


def host_array(tensor: "torch.Tensor | np.ndarray") -> np.ndarray:
    """`tensor` as a numpy array on the host; bfloat16 (what autocast computes in, which numpy has no
    type for) as float32, every value exact. An array is returned as it is."""
    if not isinstance(tensor, torch.Tensor):
        return np.asarray(tensor)
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _children(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):  # dict, ModelOutput
        return ((str(key), item) for key, item in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return zip(value._fields, value)
    if isinstance(value, (tuple, list)):
        return ((str(i) if path else f"output_{i}", item) for i, item in enumerate(value))
    if callable(getattr(value, "to_legacy_cache", None)):  # transformers' Cache objects: (key, value) per layer
        return ((str(i), item) for i, item in enumerate(value.to_legacy_cache()))
    raise UsageError(f"output {path or 'of the model'} is a {type(value).__name__}; deploykit handles tensors and "
                     "dicts, ModelOutputs, dataclasses, tuples and lists of them")


def _walk(value: Any, path: str, found: list) -> None:
    if isinstance(value, torch.Tensor):
        found.append((path or "output", value))
        return
    if value is None:
        return
    for key, item in _children(value, path):
        _walk(item, f"{path}.{key}" if path else key, found)


@contextlib.contextmanager
def flat_forward(model: nn.Module) -> Iterator[nn.Module]:
    """`model` returning its flattened outputs as a tuple while the block runs: what tracers (torch.onnx,
    torch-pruning) can follow. The forward is replaced on the instance only, so parameter names and
    the model's class stay as they are, and it is restored even when the block fails."""
    if isinstance(model, torch.jit.ScriptModule):
        # compiled: its forward cannot be replaced, and the TorchScript exporter reads its tensors and
        # tuples of tensors as they are
        yield model
        return
    had_own = "forward" in vars(model)
    original = model.forward

    def forward(*args, **kwargs):
        return tuple(flat_tensors(original(*args, **kwargs)))

    model.forward = forward
    try:
        yield model
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward
