"""What pruning cost the outputs, and a short recovery: distillation from the unpruned model.

`output_agreement` compares the pruned model's outputs with the unpruned one's on held-out calibration
items: the cosine of each output vector (along the last axis: a class distribution, a token's logits, a
feature) and, where the last axis has several entries, how often their argmax agrees (the predicted
class, the next token). For a model without an evaluator that is the quality figure beside its speed.

`distil` (`--recover STEPS`) trains the pruned model to give the unpruned model's outputs on the
calibration data with its pruning masks in force (so a structured plan's channels stay dead and
dense-shrunk still removes them): Adam, the model in eval mode (dropout off, batch-norm statistics
kept), one calibration batch a step. The loss is the KL divergence at temperature `TEMPERATURE` for
outputs named as logits, and the mean squared error over the unpruned output's variance for the
others. Written here because it is twenty lines of torch; a training framework would bring more than it
saves.
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

import torch
from torch.nn import functional as F

from deploykit.core.hooks import run_forward
from deploykit.core.outputs import flatten_outputs

#: distillation temperature on logits (Hinton et al.'s soft targets)
TEMPERATURE = 2.0
#: Adam's learning rate for recovery
LEARNING_RATE = 3e-4


def _float_outputs(model, inputs) -> list[tuple[str, torch.Tensor]]:
    return [(name, t) for name, t in flatten_outputs(run_forward(model, inputs)) if t.is_floating_point()]


def output_agreement(reference, pruned, batches: Sequence[Sequence[torch.Tensor]]) -> dict[str, float]:
    """Agreement of `pruned`'s float outputs with `reference`'s over `batches`: the lowest over outputs of
    the mean cosine along the last axis ("agreement_cosine"), and of the argmax agreement where the last
    axis has several entries ("agreement_argmax")."""
    cosines: dict[str, list[float]] = {}
    argmax: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch in batches:
            for (name, want), (_, got) in zip(_float_outputs(reference, batch), _float_outputs(pruned, batch)):
                want, got = want.double().reshape(-1, want.shape[-1]), got.double().reshape(-1, got.shape[-1])
                cosines.setdefault(name, []).extend(F.cosine_similarity(want, got, dim=1, eps=1e-12).tolist())
                if want.shape[-1] > 1:
                    argmax.setdefault(name, []).extend((want.argmax(-1) == got.argmax(-1)).double().tolist())
    found = {}
    if cosines:
        found["agreement_cosine"] = min(sum(v) / len(v) for v in cosines.values())
    if argmax:
        found["agreement_argmax"] = min(sum(v) / len(v) for v in argmax.values())
    return found


def distillation_loss(student_outputs, teacher_outputs) -> torch.Tensor:
    total = 0.0
    for (name, s), (_, t) in zip(student_outputs, teacher_outputs):
        if "logit" in name.lower() and s.shape[-1] > 1:
            total = total + F.kl_div(F.log_softmax(s / TEMPERATURE, -1).reshape(-1, s.shape[-1]),
                                     F.log_softmax(t / TEMPERATURE, -1).reshape(-1, t.shape[-1]),
                                     log_target=True, reduction="batchmean") * TEMPERATURE ** 2
        else:
            total = total + F.mse_loss(s, t) / t.var().clamp_min(1e-12)
    return total if isinstance(total, torch.Tensor) else torch.zeros(())


def _mean_loss(student, teacher, batches) -> float:
    with torch.no_grad():
        losses = [float(distillation_loss(_float_outputs(student, b), _float_outputs(teacher, b))) for b in batches]
    return sum(losses) / max(len(losses), 1)


def apply_masks(model) -> None:
    """Recompute every masked weight from its `_orig` now: a layer whose parent reads its weight itself
    (nn.MultiheadAttention's out_proj) never runs the pruning hook that would, and its weight would stay the
    tensor of the step before (and its graph, freed by that step's backward)."""
    from torch.nn.utils import prune

    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


def distil(student, teacher, batches: Sequence[Sequence[torch.Tensor]], steps: int,
           measured_on: Sequence[Sequence[torch.Tensor]]) -> dict:
    """Train `student` (masks in force) towards `teacher`'s outputs for `steps` steps over `batches`;
    the record of it: steps, seconds, loss before and after on `measured_on`."""
    started = time.perf_counter()
    before = _mean_loss(student, teacher, measured_on)
    parameters = [p for p in student.parameters() if p.requires_grad and p.is_floating_point()]
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    student.eval()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        with torch.no_grad():
            target = _float_outputs(teacher, batch)
        with torch.enable_grad():
            apply_masks(student)
            loss = distillation_loss(_float_outputs(student, batch), target)
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        apply_masks(student)
    after = _mean_loss(student, teacher, measured_on)
    return {"steps": steps, "loss_before": before, "loss_after": after, "learning_rate": LEARNING_RATE,
            "seconds": round(time.perf_counter() - started, 3)}
