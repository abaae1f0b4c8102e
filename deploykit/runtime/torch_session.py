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


#: torch device type -> (torch -> the call that waits for its queued work); CPU calls are synchronous
_TORCH_SYNC = {
    "cuda": lambda torch: torch.cuda.synchronize,
    "mps": lambda torch: torch.mps.synchronize,
}


