"""A one-graph artifact under PyTorch eager: the model rebuilt from the artifact, called on torch tensors.

Its own module because it imports torch and the model-rebuilding code: the session module stays
cheap for onnxruntime workers, which must not pay for torch in their memory figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deploykit.core.outputs import flat_arrays
from deploykit.model.artifact import WEIGHTS_FILE
from deploykit.runtime.loading import load_torch_model
from deploykit.runtime.precisions import DEFAULT_PRECISION
from deploykit.runtime.session import FORWARD_STAGE, RuntimeInfo, Target


class TorchSession:
    def __init__(self, artifact_dir: Path, threads: int, target: Target):
        torch.set_num_threads(threads)
        device = target.device
        self.device = torch.device(device)
        model, self.manifest = load_torch_model(artifact_dir, consent=target.code_consent, batch=target.batch)
        self.model = model.to(self.device)
        self.input_names = [spec["name"] for spec in self.manifest.inputs]
        self.info = RuntimeInfo("torch", torch.__version__, threads, device)
        self.files = (WEIGHTS_FILE,)
        self.synchronize = _TORCH_SYNC.get(self.device.type, lambda torch: None)(torch)

    def _tensors(self, feeds):
        return [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in self.input_names]

    def run(self, feeds):
        with torch.inference_mode():
            outputs = self.model(*self._tensors(feeds))
        return flat_arrays(outputs)

    def stages(self, feeds):
        tensors = self._tensors(feeds)
        model, inference_mode = self.model, torch.inference_mode  # bound once: the timed call stays lean

        def call():
            with inference_mode():
                return model(*tensors)

        return {FORWARD_STAGE: call}


#: deploykit precision -> the dtype torch's autocast computes in
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


class AutocastSession:
    """A torch session of any pipeline whose calls run under `torch.autocast` in the target's reduced
    precision (bf16 on a CPU with AVX-512 BF16 or AMX; f16 or bf16 on a GPU): matrix products and
    convolutions in that precision, reductions and losses in f32, as autocast decides per operator.
    Outputs come back as float32 arrays (exact: every bf16 value is one), so parity measures what the
    precision changed."""

    def __init__(self, session, target: Target):
        self.session, self.info, self.files = session, session.info, session.files
        self.synchronize = session.synchronize
        self.device_type, self.dtype = torch.device(target.device).type, AUTOCAST_DTYPES[target.precision]

    def run(self, feeds):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return [np.asarray(out, dtype=np.float32) if out.dtype.kind == "f" else out
                    for out in self.session.run(feeds)]

    def stages(self, feeds):
        autocast, device_type, dtype = torch.autocast, self.device_type, self.dtype

        def in_precision(call):
            def timed():
                with autocast(device_type, dtype=dtype):
                    return call()
            return timed

        return {name: in_precision(call) for name, call in self.session.stages(feeds).items()}

    def next_token_agreement(self, feeds, tokens):
        agreement = getattr(self.session, "next_token_agreement", None)
        if agreement is None:
            return None
        with torch.autocast(self.device_type, dtype=self.dtype):
            return agreement(feeds, tokens)


def in_precision(session, target: Target):
    """`session` computing in `target`'s precision: itself in f32, else under autocast. Every torch
    loader returns its session through it."""
    return session if target.precision == DEFAULT_PRECISION else AutocastSession(session, target)


#: torch device type -> (torch -> the call that waits for its queued work); CPU calls are synchronous
_TORCH_SYNC = {
    "cuda": lambda torch: torch.cuda.synchronize,
    "mps": lambda torch: torch.mps.synchronize,
}


