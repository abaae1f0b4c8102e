"""What a benchmark is asked to do: how each configuration is timed, and the runtime-side axes it sweeps.

Plain settings with their validation, cheap to import: the command line reads its defaults from here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from deploykit.core.contention import check_threads
from deploykit.core.errors import UsageError
from deploykit.core.ort import DEFAULT_GRAPH_OPTIMIZATION
from deploykit.model.spec import InputSpec, check_input_memory
from deploykit.runtime.devices import Placement, place
from deploykit.runtime.precisions import DEFAULT_PRECISION
from deploykit.runtime.profiles import current_profile
from deploykit.runtime.session import RUNTIMES

DEFAULT_SPARSITIES = (0.0, 0.5, 0.9)
DEFAULT_RUNTIMES = ("torch", "onnxruntime")


#: longest warm-up or minimum timing a configuration may ask for (a value past it is a typo, and an
#: infinite one would never end)
MAX_TIMING_S = 3600.0
#: most timed calls a configuration may ask for
MAX_ITERS = 10_000_000
#: most interleaved rounds a configuration's timing may be split into
MAX_ROUNDS = 100
#: most worker processes one configuration may be measured in
MAX_PROCESSES = 16
#: the longest --max-time (a day)
MAX_CONFIGURATION_S = 86400.0


def _finite_seconds(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_TIMING_S):
        raise UsageError(f"{name} must be a finite number of seconds in [0, {MAX_TIMING_S:g}], got {value!r}")


@dataclass(frozen=True)
class TimingSettings:
    """How each configuration is timed; recorded with the results."""

    warmup_s: float = 0.2
    min_time_s: float = 1.0
    min_iters: int = 100
    max_iters: int = 100_000
    #: interleaved rounds the timing is split into (see `deploykit.bench.interleave`)
    rounds: int = 5
    #: worker processes each configuration is measured in, samples pooled (see `deploykit.bench.interleave`)
    processes: int = 1
    #: the most seconds one configuration's worker may work in all (loading, warm-up, its rounds): past it
    #: the worker is stopped and the configuration is a failed row saying so (a graph that loops for ever)
    max_time_s: float = 1800.0

    def __post_init__(self) -> None:
        _finite_seconds("--warmup", self.warmup_s)
        _finite_seconds("--min-time", self.min_time_s)
        if not 1 <= self.min_iters <= self.max_iters <= MAX_ITERS:
            raise UsageError(f"need 1 <= --min-iters <= max iterations <= {MAX_ITERS:,}")
        if not isinstance(self.rounds, int) or not 1 <= self.rounds <= MAX_ROUNDS:
            raise UsageError(f"--timing-rounds must be an integer in [1, {MAX_ROUNDS}], got {self.rounds!r}")
        if not isinstance(self.processes, int) or not 1 <= self.processes <= MAX_PROCESSES:
            raise UsageError(f"--processes must be an integer in [1, {MAX_PROCESSES}], got {self.processes!r}")
        if not (isinstance(self.max_time_s, (int, float)) and 0 < self.max_time_s <= MAX_CONFIGURATION_S):
            raise UsageError(f"--max-time must be a number of seconds in (0, {MAX_CONFIGURATION_S:g}], got "
                             f"{self.max_time_s!r}")


@dataclass(frozen=True)
class Grid:
    """The runtime-side axes of a benchmark."""

    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (1,)
    #: device choices (see `deploykit.runtime.devices`): auto follows the hardware profile
    devices: tuple[str, ...] = ("auto",)
    #: sequence lengths set on every named non-batch input axis; None keeps the model's own inputs
    lengths: tuple[int | None, ...] = (None,)
    #: onnxruntime graph optimisation levels (runtimes without levels are measured once)
    graph_optimizations: tuple[str, ...] = (DEFAULT_GRAPH_OPTIMIZATION,)
    #: numeric precisions (`deploykit.runtime.precisions`): each runtime is measured in those it offers
    #: and this machine computes natively
    precisions: tuple[str, ...] = (DEFAULT_PRECISION,)

    def __post_init__(self) -> None:
        for name in self.runtimes:
            RUNTIMES.get(name)
        if not self.batches or min(self.batches) < 1:
            raise UsageError("batch sizes must be >= 1")
        if not self.threads:
            raise UsageError("no thread counts")
        for threads in self.threads:
            check_threads(threads)
        if not self.lengths or any(length is not None and length < 1 for length in self.lengths):
            raise UsageError(f"--seq-len takes lengths >= 1, got {', '.join(map(str, self.lengths))}")

    def placement(self) -> Placement:
        """The (runtime, device) pairs this machine runs, and notes on choices it cannot honour."""
        return place(self.runtimes, self.devices, current_profile(), self.graph_optimizations, self.precisions)

    def configurations(self, placement: Placement) -> int:
        """Measured configurations per artifact."""
        return len(placement.targets) * len(self.batches) * len(self.threads) * len(self.lengths)

    def check_input_memory(self, inputs: Sequence[InputSpec], what: str) -> None:
        """Refuse every batch size and length of the grid whose inputs would not fit (`check_input_memory`)."""
        for batch, length in itertools.product(self.batches, self.lengths):
            check_input_memory(inputs, batch, length, what)
