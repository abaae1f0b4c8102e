"""How deploykit runs a model once to watch it: the traced forward pass, and forward hooks on it.

Most models are one call, `model(*inputs)`. Some are not (an ESPnet speech-translation model's
`forward` wants speech, text and their lengths and returns a loss): their integration registers a
*trace forward* for the model's class in `TRACE_FORWARDS`, and every place that runs a model to learn
about it (dependency graphs, parity, FLOP counts, kernel choices, execution order) goes through
`run_forward`, so structured pruning and conversion work on them unchanged.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from deploykit.core.registry import Registry

Observer = Callable[[tuple, object], None]  # (positional inputs, output) -> nothing
TraceForward = Callable[[nn.Module, Sequence[torch.Tensor]], object]

#: model class path ("package.module.Class") -> trace forward, looked up along the model's class
#: hierarchy; the module that builds such models registers its trace forward when imported
TRACE_FORWARDS: Registry[TraceForward] = Registry("trace forward")


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def trace_forward_of(model: nn.Module) -> TraceForward | None:
    for cls in type(model).__mro__:
        if class_path(cls) in TRACE_FORWARDS:
            return TRACE_FORWARDS.get(class_path(cls))
    return None


def run_forward(model: nn.Module, inputs: Sequence[torch.Tensor]):
    """One forward pass of `model` on `inputs`: its registered trace forward, else `model(*inputs)`."""
    forward = trace_forward_of(model)
    return forward(model, inputs) if forward is not None else model(*inputs)


def called_modules(model: nn.Module, inputs: Sequence[torch.Tensor], kind: type,
                   after: Callable[[nn.Module], None] | None = None) -> set[str]:
    """Names of the `kind` modules whose forward runs in one pass over `inputs`: a layer whose weight a
    parent reads itself (torchvision's shifted-window attention, nn.MultiheadAttention's out_proj) is
    not called, and must not be swapped for a module without that weight. `after(module)` runs each
    time such a module has run."""
    called: set[str] = set()

    def seen(name: str, module: nn.Module) -> Observer:
        def observe(_args, _output) -> None:
            called.add(name)
            if after is not None:
                after(module)
        return observe

    observe_forward(model, inputs, {m: seen(name, m) for name, m in model.named_modules() if isinstance(m, kind)})
    return called


def observe_forward(model: nn.Module, inputs: Sequence[torch.Tensor], observers: Mapping[nn.Module, Observer],
                    inference: bool = True) -> None:
    """Run the model once (`run_forward`) with `observers[module](args, output)` called after each module's forward.

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
            run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
