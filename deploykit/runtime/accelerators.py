"""What this machine can run on: torch's devices and onnxruntime's local execution providers.

The facts both the hardware profiles (detecting a machine) and the runtimes (placing a benchmark)
read; torch and onnxruntime are imported when asked, so that importing this module stays cheap.
"""

from __future__ import annotations

LOCAL_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                   "CoreMLExecutionProvider", "DmlExecutionProvider", "CPUExecutionProvider")


def torch_devices() -> tuple[str, ...]:
    import torch

    found = [name for name, available in (("cuda", torch.cuda.is_available), ("mps", torch.backends.mps.is_available))
             if available()]
    return (*found, "cpu")


def onnxruntime_providers() -> tuple[str, ...]:
    """This build's execution providers that run on this machine (remote ones, like Azure's, are not)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return tuple(p for p in LOCAL_PROVIDERS if p in available)
