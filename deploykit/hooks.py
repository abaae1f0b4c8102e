"""One forward pass with temporary forward hooks: how deploykit watches a model run."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

Observer = Callable[[tuple, object], None]  # (positional inputs, output) -> nothing


def observe_forward(model: nn.Module, inputs: Sequence[torch.Tensor], observers: Mapping[nn.Module, Observer],
                    inference: bool = True) -> None:
    """Run `model(*inputs)` once with `observers[module](args, output)` called after each module's forward.

    Observers cannot change outputs (a forward hook's return value would replace the module's
    output; these are discarded), and the hooks are removed even when the forward pass fails.
    `inference` runs under `torch.inference_mode` (where fused fast paths kick in), else `no_grad`.
    """
    def hook(observer: Observer):
        def call(_module, args, output) -> None:
            observer(args, output)
        return call

    handles = [module.register_forward_hook(hook(observer)) for module, observer in observers.items()]
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
