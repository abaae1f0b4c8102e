"""Facts about the software and machine a result came from, recorded beside every figure."""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata

#: distributions whose versions change what deploykit measures
TRACKED = ("deploykit", "torch", "onnx", "onnxruntime", "numpy", "safetensors", "torch-pruning")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_info() -> dict[str, object]:
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "processor": _cpu_brand(),
        "logical_cores": os.cpu_count(),
        "available_cores": available_cores(),
        "python": sys.version.split()[0],
    }


@functools.lru_cache(maxsize=1)  # py-cpuinfo takes a second or more per call
def _cpu_brand() -> str:
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info().get("brand_raw", "") or platform.processor()
    except Exception:  # py-cpuinfo shells out on some systems; a missing brand is not worth failing for
        return platform.processor()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    On Linux this is VmHWM: `getrusage().ru_maxrss` is carried over fork and exec, so a worker
    started by a large parent would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, others KiB


def available_memory_bytes() -> int:
    """Memory the system can give a new allocation now without swapping (psutil's "available")."""
    import psutil

    return int(psutil.virtual_memory().available)
