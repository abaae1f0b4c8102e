"""Which pruned layers run on a sparse kernel (CSR, BSR) under PyTorch: a decision measured robustly, or not taken.

A sparse kernel wins only for large layers at high sparsity, and by how much depends on the batch,
the thread count and the machine. Measured on this project's 2-core machine (torch 2.10, CSR time
over dense time; below 1 CSR is faster; `benchmarks/kernels.py` reproduces the table):

| weight        | batch | 0.5  | 0.8  | 0.9  | 0.95 | 0.98 |
| ------------- | ----- | ---- | ---- | ---- | ---- | ---- |
| 64 x 64       | 1, 32 | 3-4x | 2-3x | 3-8x | 2-3x | 2-3x |
| 256 x 256     | 32    | 1.7  | 1.7  | 1.2  | 1.0  | 0.93 |
| 1024 x 1024   | 1     | 5.6  | 2.5  | 1.7  | 0.90 | 0.66 |
| 1024 x 1024   | 32    | 2.2  | 0.75 | 0.47 | 0.21 | 0.16 |
| 4096 x 4096   | 1     | 10.9 | 1.65 | 1.0  | 0.44 | 0.16 |
| 4096 x 4096   | 32    | 2.9  | 0.81 | 0.45 | 0.24 | 0.10 |

So the rule has two parts. **Candidates**: a layer is timed only if its shape class can win at its
sparsity (`SHAPE_CLASSES`); small layers never are, whatever a noisy clock says. **Decision**: a
candidate runs as CSR only when CSR takes at most 1 - `MARGIN` of dense's time in every one of
`ROUNDS` interleaved rounds and no round was preempted (a median over `PREEMPTED` times the fastest
call: the scheduler took the core, or a timer tick quantised the samples); otherwise it stays dense,
and a decision noise was involved in is marked `noisy`. The raw rounds are kept.

Decisions hold for one (thread count, batch): the export records its own; a PyTorch load at other
settings decides again, on the layers' real inputs, and caches the decision per machine, threads,
batch and weights (`cache_dir()/kernels`), unless it was noisy.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from deploykit.core.env import machine_info
from deploykit.core.measure import measure

#: interleaved dense/CSR measurement rounds per candidate layer
ROUNDS = 7
#: CSR must take at most 1 - MARGIN of dense's time, in every round, to be chosen
MARGIN = 0.10
#: round medians of a kernel spreading more than this (IQR over median) mark a measurement noisy
MAX_NOISE = 0.10
#: a round whose median exceeds its fastest sample this many times was preempted (the scheduler
#: took the core, or a timer tick quantised the samples)
PREEMPTED = 2.0
#: how far below a candidate threshold a layer's sparsity may fall and still be timed (float rounding)
SPARSITY_TOLERANCE = 1e-6
#: warm-up of each kernel before the rounds, and each round's warm-up and minimum timed duration, s
WARMUP_S = 0.05
ROUND_WARMUP_S = 0.002
ROUND_MIN_TIME_S = 0.01


@dataclass(frozen=True)
class ShapeClass:
    """Layers with at most `max_elements` weights: the lowest sparsity at which CSR can win at batch 1
    and at larger batches; None: never."""

    max_elements: float
    min_sparsity_batch1: float | None
    min_sparsity_batched: float | None

    def min_sparsity(self, batch: int) -> float | None:
        return self.min_sparsity_batch1 if batch == 1 else self.min_sparsity_batched


#: from the table above, with room below each measured crossover
SHAPE_CLASSES = (
    ShapeClass(2**18, None, None),  # up to 512 x 512: CSR never won by a clear margin
    ShapeClass(math.inf, 0.9, 0.75),
)
#: BSR with 8x8 blocks (torch 2.10, 1 thread, BSR time over dense): 256 x 256 at 0.9, batch 32: 0.73;
#: 1024 x 1024 at 0.9: 0.85 (batch 1), 0.36 (32), at 0.7 1.2-2x; 4096 x 4096 at 0.8: 0.42 (batch 1),
#: 0.51 (32), at 0.9: 0.19 and 0.26. Candidates from 0.7, with room below the crossovers.
BSR_SHAPE_CLASSES = (
    ShapeClass(2**15, None, None),
    ShapeClass(math.inf, 0.7, 0.7),
)
#: kernel -> its candidate shape classes
KERNEL_SHAPE_CLASSES = {"csr": SHAPE_CLASSES, "bsr": BSR_SHAPE_CLASSES}


def candidate_threshold(weight: torch.Tensor, batch: int, kernel: str = "csr") -> float | None:
    """The sparsity above which a weight of this shape may run faster on `kernel` at `batch` (None: never)."""
    for shape_class in KERNEL_SHAPE_CLASSES[kernel]:
        if weight.numel() <= shape_class.max_elements:
            return shape_class.min_sparsity(batch)
    return None


@dataclass(frozen=True)
class Round:
    """One kernel's measurement in one round: its median and fastest sample, ms."""

    median_ms: float
    min_ms: float

    @property
    def preempted(self) -> bool:
        return self.median_ms > PREEMPTED * self.min_ms


@dataclass(frozen=True)
class KernelTimings:
    """Each kernel's rounds, taken in alternation."""

    dense: tuple[Round, ...]
    csr: tuple[Round, ...]

    @property
    def ratios(self) -> list[float]:
        """CSR time over dense time, round by round."""
        return [c.median_ms / d.median_ms for c, d in zip(self.csr, self.dense) if d.median_ms > 0]

    @property
    def noise(self) -> float:
        """The larger kernel's spread of round medians: IQR / median."""
        return max(_spread([r.median_ms for r in self.dense]), _spread([r.median_ms for r in self.csr]))

    @property
    def preempted(self) -> int:
        """Rounds of either kernel whose median the scheduler inflated."""
        return sum(r.preempted for r in (*self.dense, *self.csr))


def _spread(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    median = statistics.median(values)
    return (q3 - q1) / median if median > 0 else math.inf


def decide(timings: KernelTimings, candidate: str = "csr", baseline: str = "dense") -> tuple[str, bool, str]:
    """(choice, noisy, reason) from interleaved rounds (`timings.csr` the candidate's, `timings.dense`
    the baseline's): the rule, apart from the measuring.

    The candidate only when it is faster by MARGIN in every round and no round was preempted: then no
    burst of load can have made the choice (it would have to slow every baseline round and no candidate
    round). Any other outcome keeps the baseline, the safe choice, and says whether noise was involved."""
    ratios = timings.ratios
    kept = f"kept {baseline}"
    if not ratios:
        return baseline, True, f"noisy: no usable timings; {kept}"
    median_ratio = statistics.median(ratios)
    clear = sum(r <= 1 - MARGIN for r in ratios)
    preempted = timings.preempted
    if clear == len(ratios) and not preempted:
        return candidate, False, (f"{candidate} {median_ratio:.2f}x {baseline} time, under {1 - MARGIN:.2f}x in all "
                                  f"{len(ratios)} rounds")
    if preempted:
        return baseline, True, (f"noisy: {preempted} of {2 * len(ratios)} rounds preempted (median over "
                                f"{PREEMPTED:g}x the fastest call); {kept}")
    if clear:
        return baseline, True, (f"noisy: {candidate} under {1 - MARGIN:.2f}x {baseline} time in {clear} of "
                                f"{len(ratios)} rounds only (median {median_ratio:.2f}x); {kept}")
    noisy = timings.noise > MAX_NOISE
    return baseline, noisy, (f"{candidate} {median_ratio:.2f}x {baseline} time (needs <= {1 - MARGIN:.2f}x in every "
                             "round)" + (f"; rounds spread {100 * timings.noise:.0f}%" if noisy else ""))


Timer = Callable[[Callable[[], object]], Round]


def _timed_round(call: Callable[[], object]) -> Round:
    m = measure(call, warmup_s=ROUND_WARMUP_S, min_time_s=ROUND_MIN_TIME_S, min_iters=5)
    return Round(m.median_ms, m.percentile_ms(0))


def time_rotation(calls: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                  timer: Timer | None = None) -> dict[str, tuple[Round, ...]]:
    """Each call's rounds, the calls taken in turn `rounds` times, each round starting one call later (two
    calls: first then second, then second then first), so that a burst of other load falls on all of them
    rather than on one. `timer` (a call -> its `Round`) is deploykit's timing loop unless given."""
    if timer is None:
        timer = _timed_round
        for call in calls.values():
            measure(call, warmup_s=WARMUP_S, min_time_s=0, min_iters=1)
    names = list(calls)
    out: dict[str, list[Round]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out[name].append(timer(calls[name]))
    return {name: tuple(taken) for name, taken in out.items()}


def time_interleaved(dense: Callable[[], object], csr: Callable[[], object], rounds: int = ROUNDS,
                     timer: Timer | None = None) -> KernelTimings:
    """Two calls in alternation (`time_rotation`): dense first, then CSR first, and so on."""
    taken = time_rotation({"dense": dense, "csr": csr}, rounds, timer)
    return KernelTimings(taken["dense"], taken["csr"])


def decide_layer(dense: nn.Module, sparse: "nn.Module | dict[str, nn.Module]", x: torch.Tensor, batch: int,
                 timer: Timer | None = None, weight: torch.Tensor | None = None) -> dict:
    """The decision record for one layer (what the manifest keeps): sparsity, each kernel's candidate
    threshold, the choice, whether noise decided it, why, and the raw rounds of each kernel timed.

    `sparse` is the layer on each candidate kernel ({"csr": CSRLinear, "bsr": BSRLinear}; a single module
    is CSR). Every kernel whose shape class can win at this sparsity is timed with dense in the same
    rotation; the choice is the fastest that `decide` would take over dense, else dense."""
    sparse = sparse if isinstance(sparse, dict) else {"csr": sparse}
    weight = dense.weight if weight is None else weight
    sparsity = float((weight == 0).float().mean())
    thresholds = {kernel: candidate_threshold(weight, batch, kernel) for kernel in sparse}
    # a plan's 0.9 leaves round(0.9 * n) zeros, whose share can fall a rounding below 0.9
    timed = [k for k, t in thresholds.items() if t is not None and sparsity >= t - SPARSITY_TOLERANCE]
    record = {"sparsity": sparsity, "candidate_threshold": thresholds.get("csr") if len(sparse) == 1 else thresholds}
    if not timed:
        shape = "x".join(map(str, weight.shape))
        why = "; ".join(f"{k} never a candidate" if t is None else f"{k} a candidate from {t:g} sparsity"
                        for k, t in thresholds.items())
        return {**record, "choice": "dense", "noisy": False, "reason": f"not timed: a {shape} weight at batch {batch}: {why}"}
    with torch.inference_mode():
        taken = time_rotation({"dense": lambda: dense(x), **{k: (lambda m=sparse[k]: m(x)) for k in timed}}, timer=timer)
    verdicts = {k: decide(KernelTimings(taken["dense"], taken[k]), k) for k in timed}
    ratios = {k: statistics.median(KernelTimings(taken["dense"], taken[k]).ratios or [math.inf]) for k in timed}
    winners = sorted((k for k in timed if verdicts[k][0] == k), key=lambda k: ratios[k])
    choice = winners[0] if winners else "dense"
    noisy = verdicts[choice][1] if winners else any(v[1] for v in verdicts.values())
    reason = "; ".join(verdicts[k][2] for k in timed) + (f"; chose {choice}" if len(timed) > 1 else "")
    out = {**record, "choice": choice, "noisy": noisy, "reason": reason}
    for kernel, rounds in taken.items():
        out.update({f"{kernel}_ms": statistics.median(r.median_ms for r in rounds),
                    f"{kernel}_rounds_ms": [r.median_ms for r in rounds],
                    f"{kernel}_rounds_min_ms": [r.min_ms for r in rounds]})
    return out


def cache_key(layer: str, weight: torch.Tensor, threads: int, batch: int, kernels: Sequence[str] = ("csr",)) -> str:
    """What a decision depends on: the machine, torch, threads, batch, the kernels offered, and the weights
    themselves."""
    facts = {"machine": machine_info(), "torch": torch.__version__, "threads": threads, "batch": batch,
             "layer": layer, **({"kernels": list(kernels)} if tuple(kernels) != ("csr",) else {})}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    digest.update(weight.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def cached_decision(directory: Path, key: str) -> dict | None:
    """A decision cached under `key`, if one is there and readable (a damaged entry is ignored)."""
    try:
        data = json.loads((directory / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("choice") not in ("csr", "bsr", "dense"):
        return None
    block = data.get("block")
    if data["choice"] == "bsr" and not (isinstance(block, int) and not isinstance(block, bool) and block > 0):
        return None  # a bsr decision names its block side
    return data
