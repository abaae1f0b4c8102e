"""Numeric precisions: which each runtime offers, and which this machine computes natively.

A precision is asked for on the bench's precision axis (`--precision f32,bf16,f16`). A runtime that
does not offer it is not measured in it; a runtime that offers it on a device this machine cannot run
it natively on is skipped with a note saying what is missing: emulated bf16 (a CPU without AVX-512
BF16 or AMX converting every value) measures the emulation, not the precision, and never reaches a
table under the precision's name.

What counts as native comes from the machine facts: the CPU's feature flags (py-cpuinfo, the names
/proc/cpuinfo uses), CUDA's compute capability, and OpenVINO's own statement of its devices'
capabilities (`OPTIMIZATION_CAPABILITIES`).
"""

from __future__ import annotations

import functools

from deploykit.core.extras import require

#: the precisions deploykit measures, in order; f32 is every runtime's default
PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_PRECISION = "f32"

#: reduced precision -> (CPU feature flag, what it is called), any one of which computes it natively
NATIVE_CPU_FLAGS = {
    "bf16": (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX"), ("bf16", "Arm BF16")),
    "f16": (("avx512_fp16", "AVX-512 FP16"), ("amx_fp16", "AMX-FP16"), ("asimdhp", "Arm FP16")),
}
#: CPU feature flags shown in a profile's vector extensions, beside the precision ones
INT8_CPU_FLAGS = (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX-INT8"))
#: OpenVINO's capability names -> deploykit's precision names
OPENVINO_CAPABILITIES = {"FP32": "f32", "BF16": "bf16", "FP16": "f16"}


@functools.lru_cache(maxsize=1)  # py-cpuinfo takes a second or more per call
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (lower case, as /proc/cpuinfo names them); empty where unreadable."""
    try:
        import cpuinfo

        return frozenset(flag.lower() for flag in cpuinfo.get_cpu_info().get("flags", []))
    except Exception:  # noqa: BLE001 - py-cpuinfo shells out on some systems; no flags means f32 only
        return frozenset()


def cpu_precisions(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The precisions a CPU with `flags` (this one's by default) computes natively."""
    flags = cpu_flags() if flags is None else flags
    return tuple(p for p in PRECISIONS
                 if p == DEFAULT_PRECISION or any(flag in flags for flag, _ in NATIVE_CPU_FLAGS[p]))


def cpu_requirement(precision: str) -> str:
    """What a CPU needs to compute `precision` natively, for a skip note."""
    return " or ".join(name for _, name in NATIVE_CPU_FLAGS[precision])


def cuda_precisions() -> tuple[str, ...]:
    """Precisions torch's first CUDA device computes natively: f16 on every GPU torch supports,
    bf16 from compute capability 8.0 (Ampere; a T4 or an RTX 2060 emulates it)."""
    import torch

    major, _ = torch.cuda.get_device_capability(0)
    return ("f32", "f16") + (("bf16",) if major >= 8 else ())


def torch_precisions(device: str) -> tuple[str, ...]:
    if device == "cpu":
        return cpu_precisions()
    if device == "cuda":
        return cuda_precisions()
    return ("f32", "f16")  # mps: Apple GPUs compute f16 natively


#: onnxruntime providers that run float16 graphs with float16 kernels
ORT_FLOAT16_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                         "DmlExecutionProvider", "CoreMLExecutionProvider")


def onnxruntime_precisions(provider: str) -> tuple[str, ...]:
    """f32 everywhere; f16 on the GPU providers, whose kernels compute it. The CPU provider's float16
    kernels cover few operators, and onnxruntime inserts no casts for the rest, so a converted graph
    there runs converted back or not at all: f16 on the CPU provider is not offered as native."""
    return ("f32", "f16") if provider in ORT_FLOAT16_PROVIDERS else ("f32",)


def openvino_precisions(device: str) -> tuple[str, ...]:
    """The precisions OpenVINO says `device` computes (its `OPTIMIZATION_CAPABILITIES`)."""
    core = require("openvino", "the openvino runtime").Core()
    capabilities = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    return tuple(p for p in PRECISIONS if p == DEFAULT_PRECISION
                 or any(OPENVINO_CAPABILITIES.get(c) == p for c in capabilities))


def missing(runtime: str, device: str, precision: str, on_cpu: bool) -> str:
    """Why `runtime` on `device` (the CPU where `on_cpu`) does not compute `precision` natively here, for a
    skip note."""
    if on_cpu:
        return f"this CPU computes {precision} natively only with {cpu_requirement(precision)}, which it lacks"
    return f"{runtime} on {device} does not compute {precision} natively here"
