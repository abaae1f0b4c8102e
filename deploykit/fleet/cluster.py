"""The machines of a fleet: Ray nodes that say which hardware profile they are.

A fleet is a Ray cluster (Ray is an optional extra, `deploykit[fleet]`). `start_worker` is a thin
wrapper over `ray start`: the node advertises its deploykit hardware profile as a custom resource
(`deploykit-profile:NAME`, one unit per machine, so that one configuration at a time runs on it and
measurements never compete), its cores, and its GPUs where torch sees them. `machines` lists the
cluster's live nodes by profile with the software each runs (a one-off task pinned to each node asks),
and `version_warnings` names the nodes whose deploykit, torch or onnxruntime differ from the driver's:
their figures would compare software as well as hardware.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from deploykit.core.env import library_versions, machine_info
from deploykit.core.errors import UsageError
from deploykit.core.extras import require
from deploykit.core.signals import reinstall as reinstall_stop_signals

#: the custom resource by which a node says its profile (one unit: one configuration at a time)
PROFILE_RESOURCE = "deploykit-profile:"
#: the versions a node must share with the driver for its figures to compare hardware alone
COMPARED_VERSIONS = ("deploykit", "torch", "onnxruntime")
#: how long connecting to a cluster may take before `connect` gives up (`--connect-timeout`)
CONNECT_TIMEOUT_S = 15.0


def need_ray():
    """The `ray` module, or a one-line refusal saying how to install it."""
    return require("ray", "the fleet")


def profile_resource(profile: str) -> str:
    return f"{PROFILE_RESOURCE}{profile}"


def start_command(address: str | None, profile: str, cores: int | None = None, gpus: int = 0) -> list[str]:
    """The `ray start` command line of a node of `profile` joining `address` (None: start the head)."""
    command = ["ray", "start", *(["--address", address] if address else ["--head"]),
               "--resources", json.dumps({profile_resource(profile): 1})]
    if cores is not None:
        command += ["--num-cpus", str(cores)]
    if gpus:
        command += ["--num-gpus", str(gpus)]
    return command


def local_gpus() -> int:
    """CUDA devices torch sees here (a GPU machine advertises them; 0 without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_worker(address: str | None, profile: str, cores: int | None = None) -> int:
    """Run `ray start` for this machine as a node of `profile`; its exit status."""
    need_ray()
    executable = shutil.which("ray")
    if executable is None:
        raise UsageError("the `ray` command is not on PATH (install deploykit[fleet] into this environment)")
    command = start_command(address, profile, cores, local_gpus())
    return subprocess.run([executable, *command[1:]], check=False).returncode


@dataclass(frozen=True)
class Machine:
    """A live node of the cluster, as `worker list` shows it."""

    node_id: str
    address: str
    profiles: tuple[str, ...]
    cores: float
    memory_bytes: float
    gpus: float
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


def node_profiles(resources: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(name[len(PROFILE_RESOURCE):] for name in resources if name.startswith(PROFILE_RESOURCE)))


def live_nodes(ray) -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def profiles_available(ray) -> dict[str, int]:
    """Profile -> live nodes advertising it."""
    counts: dict[str, int] = {}
    for node in live_nodes(ray):
        for profile in node_profiles(node.get("Resources", {})):
            counts[profile] = counts.get(profile, 0) + 1
    return counts


def _software() -> dict:
    return {"versions": library_versions(), "machine": machine_info()}


def machines(ray, timeout_s: float = 120.0) -> list[Machine]:
    """Every live node, with the software it runs (asked by a task pinned to it; a node that does not
    answer within `timeout_s` is listed without)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = live_nodes(ray)
    ask = ray.remote(num_cpus=0, max_retries=0)(_software)
    refs = [ask.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            for node in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers = {}
    for ref, node in zip(refs, nodes):
        if ref in ready:
            try:
                answers[node["NodeID"]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - a node that cannot answer is listed without its software
                pass
    out = []
    for node in nodes:
        resources = node.get("Resources", {})
        software = answers.get(node["NodeID"], {})
        out.append(Machine(node["NodeID"], node.get("NodeManagerAddress", ""), node_profiles(resources),
                           resources.get("CPU", 0.0), resources.get("memory", 0.0), resources.get("GPU", 0.0),
                           software.get("versions", {}), software.get("machine", {})))
    return out


def version_warnings(found: Sequence[Machine], driver: dict[str, str] | None = None) -> list[str]:
    """One line per node whose compared versions differ from the driver's (or that did not say)."""
    driver = library_versions() if driver is None else driver
    lines = []
    for m in found:
        if not m.versions:
            lines.append(f"node {m.node_id[:12]} ({m.address}) did not report its versions")
            continue
        differ = [f"{name} {m.versions.get(name)} (driver {driver.get(name)})" for name in COMPARED_VERSIONS
                  if m.versions.get(name) != driver.get(name)]
        if differ:
            lines.append(f"node {m.node_id[:12]} ({m.address}, {', '.join(m.profiles) or 'no profile'}) runs "
                         + ", ".join(differ) + ": its figures compare software as well as hardware")
    return lines


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address (`host:port`, `ray://host:port`, `[::1]:port`); None for
    addresses Ray resolves itself ("auto")."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        if address == "auto":
            return None
        raise UsageError(f"cluster address {address!r} is not HOST:PORT (as `ray start` printed it)")
    return host.strip("[]"), int(port)


#: what the probe process runs: a driver that connects and leaves (Ray prints its retries to stderr)
_PROBE = ("import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR', "
          "configure_logging=False); ray.shutdown()")


def _probe_cluster(address: str, timeout_s: float) -> None:
    """Connect once from a throwaway process, bounded by `timeout_s`: Ray's driver retries inside its
    C++ client for minutes, where no signal or timer of this process can stop it; a process can be
    killed. Its output (Ray's retry logs) is kept out of the user's terminal."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                               timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"no Ray cluster answered at {address!r} within {timeout_s:g} s (--connect-timeout); "
                         "something listens there, but not a Ray head") from None
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {(lines or ['the probe failed'])[-1][:200]}")


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """The ray module, connected to the cluster at `address`, or a refusal in one line: at once when
    nothing listens there, after `timeout_s` when something does but no cluster answers (Ray itself
    retries for minutes: `_probe_cluster`). Ray's driver takes SIGTERM for itself; deploykit's handler is put back, so
    that a stopped fleet bench keeps what landed (`deploykit.core.signals`)."""
    ray = need_ray()
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise UsageError(f"--connect-timeout must be a positive number of seconds, got {timeout_s}")
    where = _host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=timeout_s).close()
        except OSError as exc:
            raise UsageError(f"cannot reach the Ray cluster at {address!r}: nothing answers there "
                             f"({exc.strerror or type(exc).__name__}); is its head running (`deploykit worker "
                             "start`)?") from None
    _probe_cluster(address, timeout_s)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {(str(exc).splitlines() or [''])[0][:200]}") \
            from None
    reinstall_stop_signals()
    return ray
