"""Where each runtime runs: the profile's preference, what this machine has, and what the user asked.

A bench grid names device *choices*: `auto` (the hardware profile's preferred torch device or
onnxruntime providers, falling back to the CPU when the preferred one is not installed here), `cpu`,
or `gpu` (any accelerator the runtime can use here: CUDA or MPS for torch; CUDA, TensorRT, ROCm,
CoreML or DirectML providers for onnxruntime). A choice this machine cannot honour is *skipped* with
a note saying why; it is never run on something else under the asked-for name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deploykit.core.errors import UsageError
from deploykit.core.ort import DEFAULT_GRAPH_OPTIMIZATION, GRAPH_OPTIMIZATIONS
from deploykit.runtime.profiles import Profile
from deploykit.runtime.session import RUNTIMES, Target

DEVICE_CHOICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Placement:
    targets: tuple[Target, ...]
    #: one line per choice that could not be honoured, or was honoured differently than the profile asks
    notes: tuple[str, ...]


def place(runtimes: Sequence[str], choices: Sequence[str], profile: Profile,
          graph_optimizations: Sequence[str] = (DEFAULT_GRAPH_OPTIMIZATION,)) -> Placement:
    """The distinct (runtime, device) pairs the choices ask for on this machine, and notes on the rest;
    runtimes with graph optimisation levels get one target per level asked for."""
    for choice in choices:
        if choice not in DEVICE_CHOICES:
            raise UsageError(f"unknown device {choice!r}; choose from {', '.join(DEVICE_CHOICES)}")
    for level in graph_optimizations:
        if level not in GRAPH_OPTIMIZATIONS:
            raise UsageError(f"unknown graph optimisation {level!r}; choose from {', '.join(GRAPH_OPTIMIZATIONS)}")
    targets: list[Target] = []
    notes: list[str] = []
    for name in runtimes:
        runtime = RUNTIMES.get(name)
        available = runtime.available_devices()
        preferred = runtime.preferred_devices(profile)
        for choice in choices:
            device, note = _resolve(choice, available, preferred, runtime.cpu_device, profile.name)
            if device is None:
                notes.append(f"{name} on {choice}: skipped: {runtime.no_accelerator}")
                continue
            if note:
                notes.append(f"{name} on {choice}: {note}")
            for level in graph_optimizations if runtime.graph_optimizations else (None,):
                if all((t.runtime, t.device, t.graph_optimization) != (name, device, level) for t in targets):
                    targets.append(Target(name, device, choice, level))
    return Placement(tuple(targets), tuple(notes))


def _resolve(choice: str, available: tuple[str, ...], preferred: tuple[str, ...], cpu: str,
             profile: str) -> tuple[str | None, str]:
    """(device or None when skipped, a note or "")."""
    if choice == "cpu":
        return cpu, ""
    accelerators = [d for d in available if d != cpu]
    if choice == "gpu":
        if not accelerators:
            return None, ""
        ranked = [d for d in preferred if d in accelerators] + accelerators
        return ranked[0], ""
    for device in preferred:
        if device in available:
            missing = preferred[:preferred.index(device)]
            note = f"profile {profile} prefers {', '.join(missing)}, not available here: running on {device}" if missing else ""
            return device, note
    return cpu, f"none of profile {profile}'s devices ({', '.join(preferred)}) is available here: running on {cpu}"
