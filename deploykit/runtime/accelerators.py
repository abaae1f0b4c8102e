"""What this machine can run on: torch's devices, onnxruntime's local execution providers, OpenVINO's devices.

The facts both the hardware profiles (detecting a machine) and the runtimes (placing a benchmark)
read; torch and onnxruntime are imported when asked, so that importing this module stays cheap.
"""

from __future__ import annotations

from deploykit.core.extras import require

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


def openvino_devices() -> tuple[str, ...]:
    """OpenVINO's devices on this machine (the extra's `openvino`), accelerators first, "CPU" last."""
    devices = require("openvino", "the openvino runtime").Core().available_devices
    return (*(d for d in devices if d != "CPU"), "CPU")
