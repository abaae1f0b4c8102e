"""Benchmarking across a fleet: the configurations of a local bench, run on every named profile's machines.

The driver exports each (model, plan, form) artifact once and puts it, packed, into Ray's object store
(no shared file system); a machine unpacks it into a scratch folder after checking its SHA-256. Each
configuration (artifact x runtime x batch x threads x length) is one Ray task that needs one unit of its
profile's resource (every machine has one: one configuration at a time per machine, so measurements
never compete). Inside, it is the local bench (`bench_artifact`) with that one grid point, which
measures in a fresh process of its own, so peak memory is per configuration whichever Ray worker runs
the task. The Ray worker process (which unpacks, builds the reference outputs and starts the measuring
process, as the local bench's own process does) is reused by default: a fresh one per configuration
(`max_calls=1`, `bench --fresh-ray-workers`) imports deploykit and torch again each time: the gap
between two configurations on a machine was 3.3 s that way against 0.008 s reused, on a 2-core
machine (`benchmarks/fleet_overhead.py`).

Results come back as each task ends; the driver alone writes them, a run per profile as soon as that
profile's last configuration has landed (`on_profile_done`), each record saying the profile and the
machine it was measured on. Nothing is lost to a fault: a task whose worker or node dies is a failed row
with the reason; configurations still queued for a profile whose machines are all gone become "not run"
rows; Ctrl-C cancels what is queued or running and keeps what landed (the run is "interrupted").
Ray's own retries are off (`max_retries=0`) so that a configuration is never measured twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from deploykit.bench.records import BenchRecord, FailedConfiguration
from deploykit.bench.runner import FailureSink, bench_artifact
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.errors import ArtifactError, DeployKitError, IntegrityError, UsageError
from deploykit.core.fsutil import scratch_directory
from deploykit.export.build import export_artifact
from deploykit.fleet.cluster import profile_resource, profiles_available
from deploykit.model.sources import consent_of
from deploykit.model.spec import ModelSpec
from deploykit.prune.base import PruningPlan
from deploykit.runtime.session import RUNTIMES

Progress = Callable[[str], None]
#: how often the driver looks for profiles whose machines are all gone
POLL_S = 2.0


def pack_artifact(directory: Path) -> tuple[bytes, str]:
    """The artifact directory as an uncompressed tar (weights do not compress) and its SHA-256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    blob = buffer.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def unpack_artifact(blob: bytes, digest: str, into: Path) -> Path:
    """Check a shipped artifact's SHA-256, then unpack it under `into` (tarfile's `data` filter: no
    path leaves `into`, no links out, no devices); the artifact's own manifest checksums are verified
    when it is opened."""
    got = hashlib.sha256(blob).hexdigest()
    if got != digest:
        raise IntegrityError(f"the artifact arrived damaged (SHA-256 {got[:16]}..., sent {digest[:16]}...)")
    target = into / "artifact"
    target.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactError(f"cannot unpack the shipped artifact: {exc}") from None
    return target


@dataclass(frozen=True)
class Shipped:
    """An artifact exported on the driver and put into the object store."""

    model: str
    plan: str
    form: str
    ref: object
    digest: str
    consent: tuple[str, ...]


@dataclass(frozen=True)
class Configuration:
    """One task: an artifact at one grid point, on one profile."""

    shipped: Shipped
    profile: str
    runtime: str
    batch: int
    threads: int
    length: int | None

    def grid(self, base: Grid) -> Grid:
        # the precisions of the run this runtime offers (a configuration exists only where it offers one);
        # which of them the profile's machine computes natively is decided there
        return dataclasses.replace(base, runtimes=(self.runtime,), batches=(self.batch,), threads=(self.threads,),
                                   lengths=(self.length,), precisions=offered_precisions(self.runtime, base))

    def failed(self, error: str) -> FailedConfiguration:
        return FailedConfiguration(self.shipped.model, self.shipped.plan, self.shipped.form, stage="measure",
                                   error=error, runtime=self.runtime, batch_size=self.batch, threads=self.threads,
                                   sequence_length=self.length, profile=self.profile)


def measure(blob: bytes, digest: str, grid: Grid, timing: TimingSettings, consent: Sequence[str],
            profile: str) -> tuple[list[BenchRecord], list[FailedConfiguration], dict]:
    """The body of one task, on the machine: unpack, bench the one grid point, name the profile.
    Returns (records, failures, where: the node, the task's own seconds and its span by wall clock)."""
    import ray

    began = time.time()  # wall clock: comparable across the machine's tasks (the driver orders them by it)
    started = time.perf_counter()
    failures = FailureSink()
    with scratch_directory("fleet") as tmp:
        try:
            directory = unpack_artifact(blob, digest, tmp)
            records = bench_artifact(directory, grid, timing, consent=consent, failures=failures)
        except DeployKitError as exc:
            records = []
            failures.failures.append(FailedConfiguration("", "", "", stage="measure", error=str(exc)))
    where = {"node": ray.get_runtime_context().get_node_id(), "task_s": time.perf_counter() - started,
             "began": began, "ended": time.time()}
    return ([dataclasses.replace(r, profile=profile) for r in records],
            [dataclasses.replace(f, profile=profile) for f in failures.failures], where)


@dataclass
class ProfileTally:
    """What a profile's configurations have become, for progress and for its run."""

    nodes: int
    pending: int = 0
    done: int = 0
    records: list[BenchRecord] = dataclasses.field(default_factory=list)
    failures: list[FailedConfiguration] = dataclasses.field(default_factory=list)
    #: seconds per landed task, as measured inside it
    task_s: list[float] = dataclasses.field(default_factory=list)
    #: (node, began, ended) of each landed task, by the machine's wall clock: the gaps between one
    #: machine's tasks are what the fleet costs per configuration
    spans: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)

    def line(self, profile: str) -> str:
        running = min(self.pending, self.nodes)
        return f"{profile}: {self.done} done, {running} running, {self.pending - running} queued"


def check_profiles(ray, profiles: Sequence[str]) -> dict[str, int]:
    """Profile -> live machines; refuses, before anything starts, profiles no machine advertises."""
    available = profiles_available(ray)
    missing = [p for p in profiles if p not in available]
    if missing:
        raise UsageError(f"no machine of profile {', '.join(missing)} in the cluster; its machines advertise: "
                         f"{', '.join(f'{p} ({n})' for p, n in sorted(available.items())) or 'no profile'} "
                         "(`deploykit worker list`)")
    return {p: available[p] for p in profiles}


def ship(ray, spec: ModelSpec, plans: Sequence[PruningPlan], forms: Sequence[str], progress: Progress,
         export_failures: list[FailedConfiguration]) -> list[Shipped]:
    """Export every (plan, form) once here and put each artifact into the object store."""
    shipped = []
    with scratch_directory("fleet-export") as tmp:
        for p, plan in enumerate(plans):
            for form in forms:
                progress(f"exporting {spec.name} {plan.label()} form={form}")
                try:
                    result = export_artifact(spec, plan, form, Path(tmp) / f"artifact-{p}-{form}")
                except DeployKitError as exc:
                    export_failures.append(FailedConfiguration(spec.name, plan.label(), form, stage="export",
                                                               error=str(exc)))
                    continue
                blob, digest = pack_artifact(result.directory)
                shipped.append(Shipped(spec.name, plan.label(), form, ray.put(blob), digest,
                                       tuple(consent_of(result.manifest.source))))
    return shipped


def offered_precisions(runtime: str, grid: Grid) -> tuple[str, ...]:
    return tuple(p for p in grid.precisions if p in RUNTIMES.get(runtime).precisions)


def configurations(shipped: Sequence[Shipped], profiles: Sequence[str], grid: Grid) -> list[Configuration]:
    return [Configuration(s, profile, runtime, batch, threads, length)
            for profile in profiles for s in shipped
            for runtime, batch, threads, length in itertools.product(grid.runtimes, grid.batches, grid.threads,
                                                                     grid.lengths)
            if offered_precisions(runtime, grid)]


def run_fleet(
    ray, profiles: Sequence[str], spec: ModelSpec, plans: Sequence[PruningPlan], forms: Sequence[str], grid: Grid,
    timing: TimingSettings, progress: Progress, on_profile_done: Callable[[str, ProfileTally, str], None],
    max_calls: int = 0,
) -> dict[str, ProfileTally]:
    """Run every configuration on every profile; `on_profile_done(profile, tally, status)` is called
    once per profile as its last configuration lands (or for all left, "interrupted", on Ctrl-C).
    `max_calls`: configurations a Ray worker process runs before it is replaced (1: a fresh one for
    each; 0: reused; either way the measuring itself is in a fresh process of its own)."""
    nodes = check_profiles(ray, profiles)
    export_failures: list[FailedConfiguration] = []
    shipped = ship(ray, spec, plans, forms, progress, export_failures)
    tallies = {p: ProfileTally(nodes[p]) for p in profiles}
    for p in profiles:
        tallies[p].failures += [dataclasses.replace(f, profile=p) for f in export_failures]
    task = ray.remote(max_calls=max_calls, max_retries=0)(measure)
    pending: dict = {}  # ObjectRef -> its configuration
    for c in configurations(shipped, profiles, grid):
        ref = task.options(resources={profile_resource(c.profile): 1}, name=f"deploykit-bench {c.profile}").remote(
            c.shipped.ref, c.shipped.digest, c.grid(grid), timing, c.shipped.consent, c.profile)
        pending[ref] = c
        tallies[c.profile].pending += 1
    total = len(pending)
    progress(f"{total} configurations on {len(profiles)} profiles ({', '.join(t.line(p) for p, t in tallies.items())})")
    finished: set[str] = set()

    def land(c: Configuration, records, failures, where=None) -> None:
        tally = tallies[c.profile]
        tally.pending -= 1
        tally.done += 1
        tally.records += records
        tally.failures += [f if f.model else c.failed(f.error) for f in failures]
        node = where["node"] if where else ""
        if where:
            tally.task_s.append(where["task_s"])
            tally.spans.append((node, where["began"], where["ended"]))
        landed = sum(t.done for t in tallies.values())
        what = f"{len(records)} rows" + (f", failed: {failures[0].error}" if failures else "")
        on = f" on node {node[:12]}" if node else ""
        progress(f"[{landed}/{total}] {c.profile}{on}: {c.shipped.model} {c.shipped.plan} {c.shipped.form} {c.runtime} "
                 f"batch={c.batch} threads={c.threads}: {what} | {tally.line(c.profile)}")
        if tally.pending == 0 and c.profile not in finished:
            finished.add(c.profile)
            on_profile_done(c.profile, tally, "failed" if tally.failures else "complete")

    try:
        for p in [p for p, t in tallies.items() if t.pending == 0]:  # nothing to run (every export failed)
            finished.add(p)
            on_profile_done(p, tallies[p], "failed" if tallies[p].failures else "complete")
        checked = time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                c = pending.pop(ref)
                try:
                    records, failures, where = ray.get(ref)
                    land(c, records, failures, where)
                except ray.exceptions.RayTaskError as exc:  # deploykit itself failed inside the task
                    land(c, [], [c.failed(_first_line(exc.cause if exc.cause is not None else exc))])
                except ray.exceptions.RayError as exc:  # the worker or its machine died mid-configuration
                    land(c, [], [c.failed(f"the machine's worker died mid-configuration ({type(exc).__name__}: "
                                          f"{_first_line(exc)})")])
            if time.perf_counter() - checked >= POLL_S:  # also while other profiles keep landing results
                _give_up_on_lost_profiles(ray, pending, tallies, land)
                checked = time.perf_counter()
    except KeyboardInterrupt:
        for ref, c in list(pending.items()):
            ray.cancel(ref, force=True)
            pending.pop(ref)
            tally = tallies[c.profile]
            tally.pending -= 1
            tally.failures.append(c.failed("not run: the bench was interrupted"))
        for p, tally in tallies.items():
            if p not in finished:
                finished.add(p)
                on_profile_done(p, tally, "interrupted")
        raise
    return tallies


def _give_up_on_lost_profiles(ray, pending: dict, tallies: dict[str, ProfileTally], land) -> None:
    """Configurations queued for a profile none of whose machines is alive any more cannot run: each
    becomes a "not run" row (Ray would keep them queued for ever)."""
    alive = profiles_available(ray)
    for p, tally in tallies.items():
        tally.nodes = alive.get(p, 0)
    for ref, c in list(pending.items()):
        if alive.get(c.profile, 0) == 0:
            ray.cancel(ref, force=True)
            pending.pop(ref)
            land(c, [], [c.failed(f"not run: no machine of profile {c.profile} is left in the cluster")])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
