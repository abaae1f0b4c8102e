"""onnxruntime's transformer optimiser on an exported speech encoder, kept only where it holds parity at
every length it is checked at and is faster than the plain graph.

The optimiser (`onnxruntime.transformers.optimizer`, model type "conformer") fuses each relative-position
self-attention into one Attention node, the position term as its attention bias, and residual adds
with their layer norms into SkipLayerNormalization. It reasons about shapes symbolically, where a wrong
guess breaks the graph at some lengths only, so the fused encoder is checked against PyTorch at each of
PARITY_FRAMES (1 to 10 s of 10 ms frames), then timed against the plain encoder in interleaved rounds
under onnxruntime; `deploykit.convert.kernel_choice.decide` keeps it only when it is faster in every
round, with no round preempted. Otherwise the plain graph stays, which holds the same parity, and the
artifact says why.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from deploykit.convert.kernel_choice import decide, time_interleaved
from deploykit.core.errors import ArtifactError
from deploykit.core.fsutil import atomic_path, scratch_directory
from deploykit.core.ort import ort_session
from deploykit.model.espnet import quiet_espnet

#: feature lengths the fused encoder must match PyTorch at (frames of 10 ms)
PARITY_FRAMES = (100, 300, 500, 1000)
#: the length the two encoders are timed at (the benchmark's 5 s utterance)
TIMING_FRAMES = 500


@dataclass(frozen=True)
class EncoderFusion:
    """What the optimiser fused, how the fused encoder compared, and which graph the artifact keeps."""

    #: fused operator -> how many
    fused: dict[str, int]
    #: frames -> max abs error of the fused encoder against PyTorch (the lengths checked before a failure)
    errors: dict[int, float]
    #: "fused" or "plain"
    choice: str
    noisy: bool
    reason: str
    #: the fused encoder's time over the plain one's, median of the interleaved rounds (None: not timed)
    fused_over_plain: float | None = None

    def record(self) -> dict:
        record = asdict(self)
        record["errors"] = {str(frames): error for frames, error in self.errors.items()}
        return record

    def note(self) -> str:
        kept = "kept" if self.choice == "fused" else "not kept"
        fused = ", ".join(f"{count} {op}" for op, count in self.fused.items()) or "nothing"
        return f"onnxruntime transformer optimiser on the encoder ({fused} fused): {kept}; {self.reason}"


def fuse_encoder(path: Path, reference: Callable[[np.ndarray], np.ndarray], feats_dim: int,
                 tolerance: float, threads: int = 1) -> EncoderFusion:
    """Optimise the encoder at `path` and replace it with the fused graph if that holds parity with
    `reference` (features (1, frames, feats_dim) -> PyTorch's encoder output) within `tolerance` at every
    PARITY_FRAMES and is faster under onnxruntime with `threads` threads."""
    generator = np.random.default_rng(0)
    with scratch_directory("fusion") as scratch:
        candidate = scratch / path.name
        with quiet_espnet():  # the optimiser logs its symbolic-shape doubts and missing parameters
            from onnxruntime.transformers.optimizer import optimize_model

            try:
                # num_heads / hidden_size 0: read per attention from its reshapes (pruned heads differ by layer)
                optimized = optimize_model(str(path), model_type="conformer", num_heads=0, hidden_size=0)
                optimized.save_model_to_file(str(candidate))
            except Exception as exc:  # noqa: BLE001 - the optimiser fails deep inside on graphs it misreads
                return EncoderFusion({}, {}, "plain", False, f"the optimiser fails on this encoder ({_first_line(exc)})")
        fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
        if not fused:
            return EncoderFusion({}, {}, "plain", False, "nothing to fuse")
        errors: dict[int, float] = {}
        try:
            session = ort_session(candidate, threads, probe=True)
        except ArtifactError as exc:
            return EncoderFusion(fused, errors, "plain", False, f"the fused encoder does not load ({exc})")
        for frames in PARITY_FRAMES:
            feats = generator.standard_normal((1, frames, feats_dim), dtype=np.float32)
            try:
                (out,) = session.run(["encoder_out"], {"feats": feats})
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the first line says why
                return EncoderFusion(fused, errors, "plain", False,
                                     f"the fused encoder fails at {frames} frames ({_first_line(exc)})")
            errors[frames] = float(np.abs(out - reference(feats)).max())
            if not errors[frames] <= tolerance:
                return EncoderFusion(fused, errors, "plain", False,
                                     f"the fused encoder is off by {errors[frames]:.2e} at {frames} frames "
                                     f"(tolerance {tolerance:g})")
        plain = ort_session(path, threads)
        feeds = {"feats": generator.standard_normal((1, TIMING_FRAMES, feats_dim), dtype=np.float32)}
        timings = time_interleaved(lambda: plain.run(["encoder_out"], feeds),
                                   lambda: session.run(["encoder_out"], feeds))
        choice, noisy, reason = decide(timings, candidate="fused", baseline="plain")
        if choice == "fused":
            with atomic_path(path) as tmp:
                shutil.copyfile(candidate, tmp)
        frames = ", ".join(map(str, PARITY_FRAMES))
        return EncoderFusion(fused, errors, choice, noisy,
                             f"parity held at {frames} frames; at {TIMING_FRAMES} frames, {threads} thread(s): {reason}",
                             statistics.median(timings.ratios) if timings.ratios else None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
