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

from deploykit.core.outputs import flatten_outputs
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


def is_scripted(model: nn.Module) -> bool:
    """A TorchScript module (`torch.jit.script` / `torch.jit.load`): compiled code, no forward hooks,
    no module surgery; it runs, and exports through the TorchScript ONNX exporter, as it is."""
    return isinstance(model, torch.jit.ScriptModule)


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


def output_producers(model: nn.Module, inputs: Sequence[torch.Tensor], layers: Mapping[str, nn.Module]) -> dict[str, list[str]] | None:
    """For each flattened output of one forward pass (by its name), the layers of `layers` that produce it.

    Found on the autograd graph the pass records, not by module order: walking back from an output,
    a path ends at the first layer it reaches, so a classifier and a box regressor beside it are both
    found, and so is an output layer that runs before another module. A layer that only feeds another
    layer found for the same output (the residual stream's earlier blocks) is not its producer. None
    when no output carries autograd history (a scripted or integer-only model): the caller then
    falls back to the order modules ran in.
    """
    made_by: dict[object, list[str]] = {}

    def record(name: str) -> Observer:
        def observe(_args, output) -> None:
            for _, tensor in _tensors_in(output):
                if tensor.grad_fn is not None:
                    made_by.setdefault(tensor.grad_fn, []).append(name)
        return observe

    saved = {p: p.requires_grad for p in model.parameters()}
    handles = [module.register_forward_hook(lambda _m, _a, out, obs=record(name): obs((), out))
               for name, module in layers.items()]
    try:
        for parameter in saved:  # frozen weights leave no history: let them, for this pass only
            if parameter.is_floating_point():
                parameter.requires_grad_(True)
        with torch.enable_grad():
            outputs = flatten_outputs(run_forward(model, inputs))
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in saved.items():
            parameter.requires_grad_(flag)
    if not any(tensor.grad_fn is not None for _, tensor in outputs):
        return None
    found = {}
    for name, tensor in outputs:
        frontier = _first_producers(tensor.grad_fn, made_by) if tensor.grad_fn is not None else []
        # a producer whose output reaches another producer of the same output only feeds it
        feeding = {below for node in frontier for below in _producers_below(node, made_by)}
        found[name] = sorted({layer for node in frontier if node not in feeding for layer in made_by[node]})
    return found


def _tensors_in(output) -> list[tuple[str, torch.Tensor]]:
    try:
        return flatten_outputs(output)
    except Exception:  # noqa: BLE001 - a module returning something unflattenable produces no layer output
        return []


def _first_producers(start, made_by: Mapping[object, list[str]]) -> list:
    """Autograd nodes of `made_by` reached from `start` with no other such node on the way."""
    return _reached([start], made_by, past=False)


def _producers_below(node, made_by: Mapping[object, list[str]]) -> list:
    """Nodes of `made_by` that feed `node`, at any depth."""
    return _reached([child for child, _ in node.next_functions], made_by, past=True)


def _reached(starts: list, made_by: Mapping[object, list[str]], past: bool) -> list:
    """Nodes of `made_by` reached walking the autograd graph down from `starts`; `past`: walk on below
    them too, else each path ends at the first."""
    found, seen, stack = [], set(), list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made_by:
            found.append(node)
            if not past:
                continue
        stack.extend(child for child, _ in node.next_functions)
    return found
