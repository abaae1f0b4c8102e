"""A model's quality measured in the precision a benchmark row ran in.

An artifact's manifest holds the metrics measured when it was exported, in f32. A row measured in
bf16 or f16 computes other numbers, so its quality is measured again in the same runtime, device
and precision on the same held-out data (`ModelSpec.evaluate`): a reduced-precision row that changes
answers says so beside its speed. Where that cannot be done (the model has no evaluator; a pipeline
whose graphs the evaluation cannot call; a GPU, which the evaluations do not feed), the row carries no
metrics and a note says why: never the f32 figure under another precision's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from deploykit.core.errors import DeployKitError
from deploykit.model.artifact import Manifest
from deploykit.model.sources import spec_for_artifact
from deploykit.pipelines.base import PIPELINES
from deploykit.runtime.graphs import GraphOpener
from deploykit.runtime.session import RUNTIMES, Target


def metrics_in_precision(directory: Path, manifest: Manifest, consent: Sequence[str],
                         target: Target) -> tuple[dict[str, float], str | None]:
    """(the model's metrics computed by `target`'s runtime in its precision, None), or ({}, why not)."""
    what = f"{target.runtime} at {target.precision}"
    try:
        spec = spec_for_artifact(directory, manifest, consent)
    except DeployKitError as exc:
        return {}, f"quality at {what} not measured: {exc}"
    if spec.evaluate is None:
        return {}, None  # nothing to measure, in any precision
    if target.device != RUNTIMES.get(target.runtime).cpu_device:
        return {}, f"quality at {what} not measured: the evaluations feed the model on the CPU, not {target.device}"
    if target.runtime == "torch":
        return _torch_metrics(spec, directory, consent, target), None
    scoring = PIPELINES.get(manifest.pipeline).scoring_model
    if scoring is None:
        return {}, f"quality at {what} not measured: the {manifest.pipeline} pipeline's graphs cannot be scored"
    return spec.evaluate(scoring(directory, spec.input_names, GraphOpener.of(target, threads=1))), None


def _torch_metrics(spec, directory: Path, consent: Sequence[str], target: Target) -> dict[str, float]:
    import torch  # torch side

    from deploykit.runtime.loading import load_torch_model  # torch side
    from deploykit.runtime.torch_session import AUTOCAST_DTYPES  # torch side

    model = load_torch_model(directory, consent=consent)[0]
    with torch.autocast("cpu", dtype=AUTOCAST_DTYPES[target.precision]):
        return spec.evaluate(model)
