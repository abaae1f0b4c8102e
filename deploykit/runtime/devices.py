"""Where each runtime runs: the profile's preference, what this machine has, and what the user asked.

A bench grid names device *choices*: `auto` (the hardware profile's preferred torch device or
onnxruntime providers, falling back to the CPU when the preferred one is not installed here), `cpu`,
or `gpu` (any accelerator the runtime can use here: CUDA or MPS for torch; CUDA, TensorRT, ROCm,
CoreML or DirectML providers for onnxruntime). A choice this machine cannot honour is *skipped* with
a note saying why; it is never run on something else under the asked-for name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from deploykit.core.errors import UsageError
from deploykit.core.ort import DEFAULT_GRAPH_OPTIMIZATION, GRAPH_OPTIMIZATIONS
from deploykit.runtime.precisions import DEFAULT_PRECISION, missing
from deploykit.runtime.profiles import Profile
from deploykit.runtime.session import RUNTIMES, Target

DEVICE_CHOICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Placement:
    targets: tuple[Target, ...]
    #: one line per choice that could not be honoured, or was honoured differently than the profile asks
    notes: tuple[str, ...]


def place(runtimes: Sequence[str], choices: Sequence[str], profile: Profile,
          graph_optimizations: Sequence[str] = (DEFAULT_GRAPH_OPTIMIZATION,),
          precisions: Sequence[str] = (DEFAULT_PRECISION,)) -> Placement:
    """The distinct (runtime, device) pairs the choices ask for on this machine, and notes on the rest;
    runtimes with graph optimisation levels get one target per level asked for, and one per precision
    asked for that the runtime offers and this machine computes natively on that device (a precision
    it offers but the device would emulate is skipped with a note; one no runtime of the run offers is
    a usage error)."""
    for choice in choices:
        if choice not in DEVICE_CHOICES:
            raise UsageError(f"unknown device {choice!r}; choose from {', '.join(DEVICE_CHOICES)}")
    for level in graph_optimizations:
        if level not in GRAPH_OPTIMIZATIONS:
            raise UsageError(f"unknown graph optimisation {level!r}; choose from {', '.join(GRAPH_OPTIMIZATIONS)}")
    for precision in precisions:
        if not any(precision in RUNTIMES.get(name).precisions for name in runtimes):
            offered = "; ".join(f"{name}: {', '.join(RUNTIMES.get(name).precisions)}" for name in runtimes)
            raise UsageError(f"--precision {precision}: no runtime of this run offers it ({offered})")
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
            kept = _precisions(name, device, precisions, notes)
            for level, precision in itertools.product(
                    graph_optimizations if runtime.graph_optimizations else (None,), kept):
                if all((t.runtime, t.device, t.graph_optimization, t.precision) != (name, device, level, precision)
                       for t in targets):
                    targets.append(Target(name, device, choice, level, precision=precision))
    return Placement(tuple(targets), tuple(dict.fromkeys(notes)))


def _precisions(name: str, device: str, asked: Sequence[str], notes: list[str]) -> list[str]:
    """The precisions of `asked` that runtime `name` offers and computes natively on `device`, with a
    note for each one it does not offer or would emulate."""
    runtime = RUNTIMES.get(name)
    offered = [p for p in asked if p in runtime.precisions]
    for precision in asked:
        if precision not in offered:
            notes.append(f"{name} at {precision}: not measured: {name} offers {', '.join(runtime.precisions)}")
    if offered == [DEFAULT_PRECISION]:
        return offered  # f32 runs everywhere: no need to ask the machine (and import the runtime) here
    native = runtime.native_precisions(device)
    for precision in offered:
        if precision not in native:
            why = missing(name, device, precision, on_cpu=device == runtime.cpu_device)
            notes.append(f"{name} on {device} at {precision}: skipped: {why} "
                         "(it would be emulated, not measured)")
    return [p for p in offered if p in native]


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
