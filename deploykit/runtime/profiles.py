"""Hardware profiles: what a machine is, what it can run, and how many threads to give it.

A profile is one TOML file (`deploykit/runtime/hardware/*.toml` ships the targets of the pruning studies;
users keep their own in `$DEPLOYKIT_PROFILES`) read into
plain dataclasses; `detect_profile` describes the machine deploykit runs on from py-cpuinfo, psutil,
torch and onnxruntime, and `match_profile` names the known profile it is, if any. Every benchmark
record carries the name of the profile it was measured on.

Published peak figures are given where the vendor publishes them, with the source in the file's
comment; a figure nobody published is left out, never guessed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from deploykit.core.env import available_cores
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.extras import MissingExtraError
from deploykit.core.fsutil import read_text
from deploykit.core.registry import Registry
from deploykit.runtime.accelerators import onnxruntime_providers, openvino_devices
from deploykit.runtime.precisions import INT8_CPU_FLAGS, NATIVE_CPU_FLAGS, PRECISIONS, cpu_flags, cpu_precisions


@dataclass(frozen=True)
class CPU:
    model: str
    architecture: str = ""
    cores: int | None = None
    threads: int | None = None
    performance_cores: int | None = None
    base_ghz: float | None = None
    max_ghz: float | None = None
    vector_extensions: tuple[str, ...] = ()
    #: the precisions it computes natively (f32, bf16 with AVX-512 BF16 or AMX, f16 with AVX-512 FP16
    #: or Arm FP16): what a bench on it measures beside f32
    precisions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Memory:
    gb: float | None = None
    kind: str = ""
    bandwidth_gbs: float | None = None


@dataclass(frozen=True)
class GPU:
    model: str
    memory_gb: float | None = None
    memory_bandwidth_gbs: float | None = None
    fp32_tflops: float | None = None
    fp16_tensor_tflops: float | None = None
    int8_tops: float | None = None
    cuda_cores: int | None = None
    #: the precisions it computes natively (f16 on every CUDA GPU, bf16 from compute capability 8.0)
    precisions: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimePolicy:
    """Which device and execution providers to prefer, and how many threads to run with."""

    torch_device: str = "cpu"
    onnxruntime_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: OpenVINO devices in order of preference (its GPU plugin is Intel's: an NVIDIA machine runs it on the CPU)
    openvino_devices: tuple[str, ...] = ("CPU",)
    thread_policy: str = "available-cores"
    #: an explicit thread count; otherwise the policy decides
    threads: int | None = None


@dataclass(frozen=True)
class Match:
    """Substrings (case-insensitive) of the CPU brand and GPU names that identify the machine."""

    cpu: tuple[str, ...] = ()
    gpu: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    cpu: CPU | None = None
    memory: Memory | None = None
    gpu: GPU | None = None
    runtime: RuntimePolicy = field(default_factory=RuntimePolicy)
    match: Match = field(default_factory=Match)

    def default_threads(self) -> int:
        """Threads to run with by the profile's policy (an explicit `threads` wins)."""
        if self.runtime.threads is not None:
            return self.runtime.threads
        return THREAD_POLICIES.get(self.runtime.thread_policy)(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: thread policy -> threads for a profile
THREAD_POLICIES: Registry[Callable[[Profile], int]] = Registry("thread policy")


def _available(profile: Profile) -> int:
    return available_cores()


THREAD_POLICIES.add("available-cores", _available)
THREAD_POLICIES.add("physical-cores", lambda p: (p.cpu and p.cpu.cores) or _available(p))
THREAD_POLICIES.add("performance-cores", lambda p: (p.cpu and (p.cpu.performance_cores or p.cpu.cores)) or _available(p))
THREAD_POLICIES.add("all-threads", lambda p: (p.cpu and p.cpu.threads) or _available(p))

_TABLES = {"cpu": CPU, "memory": Memory, "gpu": GPU, "runtime": RuntimePolicy, "match": Match}


#: bounds on what a profile says: a count past MAX_COUNT (cores, threads, CUDA cores) or a figure past
#: MAX_FIGURE (GHz, GB, TFLOPS) is a typo or a hostile file, never a machine
MAX_COUNT = 1_000_000
MAX_FIGURE = 1e9
#: a profile's name: what files, resources (`deploykit-profile:NAME`) and reports carry
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: the longest description or other text of a profile
MAX_TEXT = 1000


def _build(cls: type, table: dict[str, Any], where: str):
    """A dataclass from a TOML table: unknown keys and wrongly typed values are errors naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(fields)}")
    values = {}
    for key, value in table.items():
        kind = str(fields[key].type)
        if "tuple" in kind:
            # a match rule of "" would match every machine
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() and len(v) <= MAX_TEXT
                                                      for v in value):
                raise ArtifactError(f"{where}: {key} must be a list of non-empty strings")
            value = tuple(value)
        elif kind.startswith("int") and not (isinstance(value, int) and not isinstance(value, bool)
                                             and 0 < value <= MAX_COUNT):
            raise ArtifactError(f"{where}: {key} must be a positive integer up to {MAX_COUNT:,}, got {value!r}")
        elif kind.startswith("float") and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                               and 0 < value <= MAX_FIGURE):
            raise ArtifactError(f"{where}: {key} must be a positive number up to {MAX_FIGURE:g}, got {value!r}")
        elif kind == "str" and not (isinstance(value, str) and len(value) <= MAX_TEXT):
            raise ArtifactError(f"{where}: {key} must be a string of up to {MAX_TEXT} characters, got {value!r:.60}")
        values[key] = value
    missing = [f.name for f in fields.values()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ArtifactError(f"{where}: missing {missing[0]!r}")
    return cls(**values)


def profile_from_dict(data: dict[str, Any], where: str) -> Profile:
    known = {"name", "description", *_TABLES}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key] or len(data[key]) > MAX_TEXT:
            raise ArtifactError(f"{where}: {key!r} must be a non-empty string of up to {MAX_TEXT} characters")
    if not PROFILE_NAME.match(data["name"]):
        raise ArtifactError(f"{where}: name {data['name'][:60]!r} must be letters, digits, '.', '_' and '-' (up to 128, "
                            "starting with a letter or digit): it names files and a cluster resource")
    tables = {}
    for key, cls in _TABLES.items():
        if key in data:
            if not isinstance(data[key], dict):
                raise ArtifactError(f"{where}: [{key}] must be a table")
            tables[key] = _build(cls, data[key], f"{where} [{key}]")
    profile = Profile(data["name"], data["description"], **tables)
    for part in (profile.cpu, profile.gpu):
        unknown = [p for p in getattr(part, "precisions", ()) if p not in PRECISIONS]
        if unknown:
            raise ArtifactError(f"{where}: unknown precision {unknown[0][:40]!r}; known: {', '.join(PRECISIONS)}")
    if profile.runtime.thread_policy not in THREAD_POLICIES:  # a bad file, named like the other errors here
        raise ArtifactError(f"{where} [runtime]: unknown thread policy {profile.runtime.thread_policy!r}; "
                            f"known: {', '.join(THREAD_POLICIES.names())}")
    return profile


def load_profile(path: str | Path) -> Profile:
    text = read_text(path, "profile", ArtifactError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ArtifactError(f"cannot read profile {str(path)!r}: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise ArtifactError(f"cannot read profile {str(path)!r}: nested too deeply") from None
    return profile_from_dict(data, str(path))


def user_profile_dir() -> Path:
    """Where `deploykit profile detect --save` writes: $DEPLOYKIT_PROFILES, else ~/.config/deploykit/profiles."""
    return Path(os.environ.get("DEPLOYKIT_PROFILES") or Path.home() / ".config" / "deploykit" / "profiles")


def profile_paths() -> list[Path]:
    """The files profiles are read from: the shipped ones, then the user's, each group by name."""
    shipped = resources.files("deploykit.runtime.hardware")
    paths = [Path(str(p)) for p in shipped.iterdir() if p.name.endswith(".toml")]
    if user_profile_dir().is_dir():
        paths += sorted(user_profile_dir().glob("*.toml"))
    return sorted(paths, key=lambda p: (p.parent != Path(str(shipped)), p.name))


def known_profiles() -> dict[str, Profile]:
    """Shipped profiles, then the user's (which may not reuse a shipped name), by name."""
    profiles: dict[str, Profile] = {}
    for path in profile_paths():
        profile = load_profile(path)
        if profile.name in profiles:
            raise ArtifactError(f"{str(path)!r}: profile name {profile.name!r} is already taken")
        profiles[profile.name] = profile
    return profiles


def get_profile(name: str) -> Profile:
    profiles = known_profiles()
    if name not in profiles:
        raise UsageError(f"unknown profile {name!r}; known: {', '.join(profiles)}")
    return profiles[name]


# -- detection ---------------------------------------------------------------------------------------

#: execution providers that run models on this machine (onnxruntime also lists remote ones, like Azure's)
def _cpu_facts() -> dict[str, Any]:
    import cpuinfo
    import psutil

    info = cpuinfo.get_cpu_info()
    flags = cpu_flags()
    extensions = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX"), ("asimd", "NEON"),
                  *INT8_CPU_FLAGS, *(pair for pairs in NATIVE_CPU_FLAGS.values() for pair in pairs))
    vector = list(dict.fromkeys(name for flag, name in extensions if flag in flags))
    hz = info.get("hz_advertised") or [0]
    return {"model": info.get("brand_raw") or platform.processor() or "unknown CPU",
            "architecture": platform.machine(),
            "cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
            "threads": psutil.cpu_count() or 1,
            "base_ghz": round(hz[0] / 1e9, 2) if hz[0] else None,
            "vector_extensions": tuple(vector),
            "precisions": cpu_precisions(flags),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}


def _gpus() -> list[tuple[str, float, tuple[str, ...]]]:
    """(name, memory GB, native precisions) of each CUDA device torch sees; none without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1),
             ("f32", "f16") + (("bf16",) if torch.cuda.get_device_capability(i)[0] >= 8 else ()))
            for i in range(torch.cuda.device_count())]


def _torch_device(gpus) -> str:
    if gpus:
        return "cuda"
    try:
        import torch

        return "mps" if torch.backends.mps.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _providers() -> tuple[str, ...]:
    try:
        return onnxruntime_providers()
    except ImportError:
        return ("CPUExecutionProvider",)


def _openvino_devices() -> tuple[str, ...]:
    try:
        return openvino_devices()
    except MissingExtraError:  # the extra is not installed: its default, the CPU
        return ("CPU",)


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|processor|cpu|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def detect_profile() -> Profile:
    """A profile of the machine this runs on, named after its CPU (and GPU) and the cores available."""

    facts = _cpu_facts()
    gpus = _gpus()
    cores = available_cores()
    name = "-".join(filter(None, ["detected", _slug(facts["model"]), _slug(gpus[0][0]) if gpus else "", f"{cores}c"]))
    gpu = GPU(model=gpus[0][0], memory_gb=gpus[0][1], precisions=gpus[0][2]) if gpus else None
    cpu = CPU(model=facts["model"], architecture=facts["architecture"], cores=facts["cores"],
              threads=facts["threads"], base_ghz=facts["base_ghz"], vector_extensions=facts["vector_extensions"],
              precisions=facts["precisions"])
    description = f"{facts['model']}, {cores} cores available" + (f", {gpu.model}" if gpu else "")
    return Profile(
        name=name,
        description=description,
        cpu=cpu,
        memory=Memory(gb=facts["memory_gb"]),
        gpu=gpu,
        runtime=RuntimePolicy(torch_device=_torch_device(gpus), onnxruntime_providers=_providers(),
                              openvino_devices=_openvino_devices(), thread_policy="available-cores"),
        match=Match(cpu=(facts["model"],), gpu=(gpu.model,) if gpu else ()),
    )


def matches(known: Profile, machine: Profile) -> bool:
    """Whether `machine` (detected) is the `known` profile: every pattern kind it gives must match."""
    if not known.match.cpu and not known.match.gpu:
        return False
    brand = (machine.cpu.model if machine.cpu else "").lower()
    gpu = (machine.gpu.model if machine.gpu else "").lower()
    cpu_ok = not known.match.cpu or any(p.lower() in brand for p in known.match.cpu)
    gpu_ok = not known.match.gpu or any(p.lower() in gpu for p in known.match.gpu)
    return cpu_ok and gpu_ok


def match_profile(machine: Profile, profiles: dict[str, Profile] | None = None) -> Profile | None:
    """The known profile `machine` is, if exactly one matches (most specific wins: CPU and GPU)."""
    profiles = known_profiles() if profiles is None else profiles
    found = [p for p in profiles.values() if matches(p, machine)]
    found.sort(key=lambda p: -(bool(p.match.cpu) + bool(p.match.gpu)))
    return found[0] if found else None


@functools.lru_cache(maxsize=1)
def current_profile() -> Profile:
    """The known profile of this machine if one matches, else the detected description (detected
    once per process: py-cpuinfo takes a second, and the machine does not change under us)."""
    machine = detect_profile()
    return match_profile(machine) or machine


# -- writing -----------------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(profile: Profile) -> str:
    """The profile as TOML that `load_profile` reads back to an equal profile (empty fields left out)."""
    lines = [f"name = {_toml_value(profile.name)}", f"description = {_toml_value(profile.description)}"]
    for key in _TABLES:
        table = getattr(profile, key)
        if table is None:
            continue
        entries = [(f.name, getattr(table, f.name)) for f in dataclasses.fields(table)]
        entries = [(k, v) for k, v in entries if v not in (None, "", ())]
        if entries:
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in entries]
    return "\n".join(lines) + "\n"
