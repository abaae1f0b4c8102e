"""A user's weights file, loaded without running its code unless the user says so.

`torch.load` of a pickle executes whatever the pickle says: a checkpoint from the internet can run
code on load. So: safetensors files are read as tensors; `.pt`/`.pth`/`.bin` files go through
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; a file that needs
more (a pickled nn.Module, custom classes) is refused unless `trust_pickle` is given, and then loads
with a warning.

What a checkpoint may hold: a state dict, a dict with one of the usual keys around it
("state_dict", "model_state_dict", "model"), or (trusted pickles only) a whole nn.Module.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.storage import FORMAT, load_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

#: keys training scripts wrap a state dict in
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class PickleWarning(UserWarning):
    """A full pickle was loaded: it could have run code."""


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> "dict[str, torch.Tensor]":
    """The state dict stored in `path` (safetensors, or a torch checkpoint loaded as safely as asked)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _state_dict_of(_torch_load(path, trust_pickle), path)


def _load_safetensors(path: Path) -> "dict[str, torch.Tensor]":
    from safetensors import SafetensorError, safe_open


    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") == FORMAT:  # an artifact's own (encoded) weights file
                return load_weights(path)
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read weights file {str(path)!r}: {exc}") from None


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            first = str(exc).strip().splitlines()[0]
            raise UsageError(f"{str(path)!r} holds more than tensors (a full pickle: loading it can run code; "
                             f"weights-only loading said: {first}); re-save it as safetensors, or pass "
                             "--trust-pickle if you trust where it came from") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ArtifactError(f"cannot read weights file {str(path)!r}: {str(exc).strip().splitlines()[0]}") from None
    warnings.warn(f"loading {str(path)!r} as a full pickle (--trust-pickle): it can run code", PickleWarning,
                  stacklevel=3)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a pickle can raise anything; the user needs its first line
        raise ArtifactError(f"cannot unpickle {str(path)!r}: {type(exc).__name__}: {exc}") from None


def _state_dict_of(obj: Any, path: Path) -> "dict[str, torch.Tensor]":
    import torch
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj and not isinstance(obj[key], torch.Tensor):
                return _state_dict_of(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise ArtifactError(f"{str(path)!r} holds no state dict (found {type(obj).__name__}; expected tensors by "
                        f"parameter name, possibly under one of {', '.join(WRAPPER_KEYS)})")


def with_module_versions(model: "nn.Module", state: "dict[str, torch.Tensor]") -> "dict[str, torch.Tensor]":
    """`state` carrying the version record of `model`'s own modules, as `model.state_dict()` would.

    A state dict read from safetensors (or any tensors-only file) has lost torch's `_metadata`, and some
    modules check its version when they load (torchvision's MNASNet refuses "version should be set to
    1 or 2"): given the versions of the code that built `model`, they load through their own path."""
    import collections

    metadata = getattr(model.state_dict(), "_metadata", None)
    if metadata is None or getattr(state, "_metadata", None) is not None:
        return state
    versioned = collections.OrderedDict(state)
    versioned._metadata = metadata
    return versioned


def apply_checkpoint(model: "nn.Module", state: "dict[str, torch.Tensor]", path: str | Path) -> "nn.Module":
    """Load `state` into `model` strictly: a checkpoint that does not fit is an error naming what differs."""
    try:
        result = model.load_state_dict(with_module_versions(model, state), strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[1:3])
        raise ArtifactError(f"weights {str(path)!r} do not fit the model: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_listed(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_listed(result.unexpected_keys)}")
    if problems:
        raise ArtifactError(f"weights {str(path)!r} do not fit the model: {'; '.join(problems)}")
    return model


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
