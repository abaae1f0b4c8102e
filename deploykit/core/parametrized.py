"""Reparametrized weights folded into plain ones: weight norm (old-style hooks and
`torch.nn.utils.parametrizations.weight_norm`), spectral norm and any other `torch.nn.utils.parametrize`
parametrization.

At inference a parametrized weight is a function of other tensors (weight norm: g * v / |v|), computed
on every call. Pruning masks that weight, dense-shrunk cuts its rows, and both need it to be a plain
parameter: masking `weight` of a weight-normed convolution fails inside torch ("cannot assign ... to
parameter 'weight_orig'"), and pruning `v` alone would not zero the weight's entries. Folded, the
model computes the same outputs (the weight is evaluated once), and every other step sees an
ordinary layer. torch has the two removal functions; this module only finds what to fold.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def fold_parametrizations(model: nn.Module) -> list[str]:
    """Fold every parametrized weight of `model` into a plain parameter, in place; "module.weight
    (weight norm)" for each one folded."""
    folded = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if type(hook).__name__ == "WeightNorm" and type(hook).__module__ == "torch.nn.utils.weight_norm":
                nn.utils.remove_weight_norm(module, hook.name)
                folded.append(f"{_joined(name, hook.name)} (weight norm)")
            elif type(hook).__name__ == "SpectralNorm" and type(hook).__module__ == "torch.nn.utils.spectral_norm":
                nn.utils.remove_spectral_norm(module, hook.name)
                folded.append(f"{_joined(name, hook.name)} (spectral norm)")
        if parametrize.is_parametrized(module):
            for tensor in list(module.parametrizations):
                kinds = ", ".join(type(p).__name__.lstrip("_") for p in module.parametrizations[tensor])
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                folded.append(f"{_joined(name, tensor)} ({kinds})")
    return folded


def _joined(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor
