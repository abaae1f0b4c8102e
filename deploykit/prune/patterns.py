"""Sparsity patterns: which weights a pruner removes together, as plans spell them.

- ``N:M`` (NVIDIA's 2:4): at most N nonzero weights in every M consecutive ones along a layer's input;
  the sparsity is then 1 - N/M.
- ``RxC`` (also written ``block:RxC``): blocks of R rows (outputs) by C columns (inputs) of the layer's
  (out, in) weight matrix, removed whole: what block-sparse CPU kernels reward (``8x8`` for torch's BSR,
  ``1x4`` as Intel's and Neural Magic's sparse CPU models). The sparsity stays the plan's, counted in
  weights.

This module is the grammar only (no torch), so that plans stay cheap to read; the selection of weights
by a pattern is `deploykit.prune.tiles`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deploykit.core.errors import UsageError

#: the largest block side and group a pattern may name (beyond it, a "block" is a structured channel)
MAX_SIDE = 1024
MAX_GROUP = 64
_NM = re.compile(r"^(?P<n>-?\d+):(?P<m>-?\d+)$")
_BLOCK = re.compile(r"^(?:block:)?(?P<r>-?\d+)x(?P<c>-?\d+)$")
EXAMPLES = "2:4 (N of every M along the input), or 8x8 / 1x4 / block:16x16 (blocks of R outputs x C inputs)"


@dataclass(frozen=True)
class Pattern:
    """An N:M group (`kind` "n:m": `first` N kept of `second` M) or a block (`kind` "block": `first` rows
    by `second` columns)."""

    kind: str
    first: int
    second: int

    @property
    def text(self) -> str:
        return f"{self.first}:{self.second}" if self.kind == "n:m" else f"{self.first}x{self.second}"

    @property
    def is_block(self) -> bool:
        return self.kind == "block"

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity an N:M pattern sets (None for a block: the plan's sparsity applies)."""
        return 1 - self.first / self.second if self.kind == "n:m" else None

    @property
    def shape(self) -> tuple[int, int]:
        """A block's (rows, columns)."""
        return self.first, self.second


def parse_pattern(text: str) -> Pattern | None:
    """The pattern `text` names ("" or "none": None, unstructured); a bad one is a `UsageError`."""
    if not isinstance(text, str):
        raise UsageError(f"bad pattern {text!r}; expected {EXAMPLES}")
    text = text.strip().lower()
    if text in ("", "none"):
        return None
    nm, block = _NM.match(text), _BLOCK.match(text)
    if nm:
        kept, every = int(nm["n"]), int(nm["m"])
        if not (1 <= kept and 2 <= every <= MAX_GROUP):
            raise UsageError(f"bad pattern {text!r}: N:M needs 1 <= N and 2 <= M <= {MAX_GROUP}, e.g. 2:4 or 4:8")
        if kept >= every:
            raise UsageError(f"pattern {text} keeps every weight: N must be below M (2:4 keeps 2 of every 4)")
        return Pattern("n:m", kept, every)
    if block:
        rows, cols = int(block["r"]), int(block["c"])
        if not (1 <= rows <= MAX_SIDE and 1 <= cols <= MAX_SIDE):
            raise UsageError(f"bad block {text!r}: both sides must be positive and at most {MAX_SIDE}, e.g. 8x8 or 1x4")
        if rows == cols == 1:
            raise UsageError("a 1x1 block is unstructured pruning: leave --pattern out")
        return Pattern("block", rows, cols)
    raise UsageError(f"bad pattern {text!r}; expected {EXAMPLES}")


def normalised(text: str) -> str:
    """The canonical spelling of a pattern ("block:8X8" -> "8x8"; "none" -> "")."""
    pattern = parse_pattern(text)
    return pattern.text if pattern is not None else ""
