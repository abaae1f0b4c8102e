"""The fleet on one machine: a local Ray cluster whose nodes advertise different profiles
(`ray.cluster_utils.Cluster`), a small fan-out through the CLI, a machine killed mid-run, and the
store checked: every configuration accounted for, none twice."""

import json
import re
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from deploykit.bench.settings import Grid, TimingSettings  # noqa: E402
from deploykit.core.errors import UsageError  # noqa: E402
from deploykit.fleet.cluster import machines, need_ray, profile_resource, version_warnings  # noqa: E402
from deploykit.fleet.fanout import pack_artifact, run_fleet, unpack_artifact  # noqa: E402
from deploykit.model.sources import resolve_model  # noqa: E402
from deploykit.prune.base import PruningPlan  # noqa: E402
from deploykit.results.store import ResultStore  # noqa: E402

FAST = ("--min-time", "0", "--min-iters", "5", "--warmup", "0", "--timing-rounds", "1")


@pytest.fixture(scope="module")
def cluster():
    """A head of profile alpha and two machines of profile beta."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {profile_resource("alpha"): 1}})
    betas = [c.add_node(num_cpus=1, resources={profile_resource("beta"): 1}) for _ in range(2)]
    c.wait_for_nodes()
    yield c, betas
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def test_a_fan_out_runs_every_configuration_on_every_profile_and_keeps_a_run_per_profile(cluster, cli, tmp_path):
    c, _ = cluster
    store = tmp_path / "fleet.sqlite"
    result = cli("bench", "--cluster", c.address, "--profiles", "alpha,beta", "--prune", "magnitude:0,0.5",
                 "--form", "dense", "--runtime", "onnxruntime,torch", *FAST, "--store", str(store), "--fresh-ray-workers")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[8/8\] (alpha|beta) on node \w+: ", result.stderr)
    assert "alpha: 4 done, 0 running, 0 queued" in result.stderr
    runs = ResultStore(store).runs()
    assert sorted(r.profile for r in runs) == ["alpha", "beta"]
    assert len({r.conditions["fleet"]["run"] for r in runs}) == 1
    for summary in runs:
        run = ResultStore(store).run(str(summary.id))
        keys = [(r.sparsity, r.runtime) for r in run.records]
        assert sorted(keys) == sorted((s, rt) for s in (0.0, 0.5) for rt in ("onnxruntime", "torch"))
        assert all(r.profile == summary.profile and r.machine["logical_cores"] for r in run.records)
        assert all(r.parity_max_abs_error is not None for r in run.records)
    compared = cli("report", "--store", str(store), "--run", "profile:alpha", "--compare", "profile:beta")
    assert compared.returncode == 0 and "/ run" in compared.stdout


def test_sigterm_mid_fan_out_keeps_what_landed(cluster, tmp_path):
    """SIGTERM (what timeout, CI cancellation and docker stop send) is handled as Ctrl-C: the rows that
    landed are kept, the rest accounted for, Ray's own SIGTERM handler (which exits on the spot) kept
    out of the way."""
    import os
    import signal
    import subprocess
    import threading

    c, _ = cluster
    store = tmp_path / "fleet.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploykit", "bench", "--cluster", c.address, "--profiles", "alpha", "--prune",
         "magnitude:0,0.2,0.4,0.6,0.8", "--form", "dense", "--runtime", "onnxruntime", "--min-time", "1",
         "--min-iters", "5", "--warmup", "0", "--timing-rounds", "1", "--store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            if line.startswith("deploykit: [1/"):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    assert proc.returncode == 143 and "deploykit: stopped by SIGTERM" in err, err
    assert "Traceback" not in err and "(interrupted) in" in err, err
    (summary,) = ResultStore(store).runs()
    run = ResultStore(store).run(str(summary.id))
    assert run.status == "interrupted" and 1 <= len(run.records) < 5
    assert len(run.records) + len(run.failures) == 5  # every configuration accounted for
    assert all(f.error == "not run: the bench was interrupted" for f in run.failures)


def test_a_profile_no_machine_advertises_is_refused_before_anything_runs(cluster, cli, tmp_path):
    c, _ = cluster
    result = cli("bench", "--cluster", c.address, "--profiles", "alpha,gamma", *FAST, "--store", str(tmp_path / "s"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no machine of profile gamma" in result.stderr and "alpha (1)" in result.stderr
    assert not (tmp_path / "s").exists()


def test_worker_list_shows_profiles_and_versions(cluster, cli):
    c, _ = cluster
    result = cli("worker", "list", "--address", c.address, "--json", "-")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert sorted(p for m in found for p in m["profiles"]) == ["alpha", "beta", "beta"]
    assert all(m["versions"]["deploykit"] and m["cores"] == 1 for m in found)
    assert "warning" not in result.stderr  # the same software everywhere


def test_version_warnings_name_the_node_and_the_library():
    from deploykit.fleet.cluster import Machine

    node = Machine("abcdef0123456789", "10.0.0.2", ("t4",), 4, 2**34, 1, {"deploykit": "0.1.0", "torch": "2.9.0",
                                                                            "onnxruntime": "1.32.0"})
    lines = version_warnings([node], {"deploykit": "0.1.0", "torch": "2.10.0", "onnxruntime": "1.32.0"})
    assert lines == ["node abcdef012345 (10.0.0.2, t4) runs torch 2.9.0 (driver 2.10.0): its figures compare "
                     "software as well as hardware"]


def test_a_machine_killed_mid_run_leaves_a_failed_row_and_the_rest_runs_on_its_twin(cluster, tmp_path):
    """Both beta machines busy; the second of them to land a configuration is killed shortly after it
    lands, mid-way through its next one: a freed machine took the next queued configuration 12-20 ms
    after finishing one in 4 traced runs, each takes about 2 s, and six keep one queued for it. Killing
    a machine the moment its result lands raced with that hand-over (in 5 of 13 runs it was killed
    before it had taken anything, and nothing died).
    That configuration is a failed row naming the dead worker, the queued ones run on the survivor, and
    every configuration is accounted for once."""
    c, betas = cluster
    ray.init(address=c.address, log_to_driver=False)
    try:
        landed_on: list[str] = []
        killed: list[str] = []

        def progress(message: str) -> None:
            landed = re.search(r"\] beta on node (\w+):", message)
            if not landed or killed:
                return
            if landed_on and landed.group(1) != landed_on[0]:
                victim = next(n for n in betas if n.node_id.startswith(landed.group(1)))
                time.sleep(0.7)  # let it take its next configuration (see above)
                killed.append(victim.node_id)
                c.remove_node(victim)
            landed_on.append(landed.group(1))

        done = {}
        plans = [PruningPlan("magnitude", s) for s in (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)]
        timing = TimingSettings(warmup_s=0.0, min_time_s=1.0, min_iters=5, rounds=1)
        tallies = run_fleet(ray, ["beta"], resolve_model("lenet-300-100"), plans, ["dense"],
                            Grid(runtimes=("onnxruntime",)), timing, progress,
                            lambda profile, tally, status: done.setdefault(profile, status))
    finally:
        ray.shutdown()
    beta = tallies["beta"]
    assert killed and beta.done == 6 and beta.pending == 0
    measured = {r.prune for r in beta.records}
    failed = {f.prune: f.error for f in beta.failures}
    assert len(measured) + len(failed) == 6 and not measured & set(failed)  # each once
    assert any("died" in error for error in failed.values()), failed
    assert done == {"beta": "failed"}


def test_ctrl_c_keeps_what_landed_and_accounts_for_the_rest(cluster):
    c, _ = cluster
    ray.init(address=c.address, log_to_driver=False)
    kept = {}
    try:
        def progress(message: str) -> None:
            if message.startswith("[1/"):
                raise KeyboardInterrupt

        plans = [PruningPlan("magnitude", s) for s in (0.0, 0.5, 0.9)]
        with pytest.raises(KeyboardInterrupt):
            run_fleet(ray, ["alpha"], resolve_model("lenet-300-100"), plans, ["dense"], Grid(runtimes=("onnxruntime",)),
                      TimingSettings(warmup_s=0.0, min_time_s=0.0, min_iters=5, rounds=1), progress,
                      lambda profile, tally, status: kept.setdefault(profile, (tally, status)))
    finally:
        ray.shutdown()
    tally, status = kept["alpha"]
    assert status == "interrupted" and len(tally.records) == 1
    assert [f.error for f in tally.failures] == ["not run: the bench was interrupted"] * 2


def test_artifacts_travel_checked():
    import tempfile
    from pathlib import Path

    from deploykit.core.errors import IntegrityError

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "a"
        source.mkdir()
        (source / "manifest.json").write_text("{}")
        blob, digest = pack_artifact(source)
        for name in ("ok", "bad"):
            (Path(tmp) / name).mkdir()
        assert (unpack_artifact(blob, digest, Path(tmp) / "ok") / "manifest.json").read_text() == "{}"
        with pytest.raises(IntegrityError, match="arrived damaged"):
            unpack_artifact(blob[:-1] + b"x", digest, Path(tmp) / "bad")
        import hashlib
        import io
        import tarfile

        from deploykit.core.errors import ArtifactError

        hostile = io.BytesIO()  # a member that climbs out of the folder it is unpacked in
        with tarfile.open(fileobj=hostile, mode="w") as tar:
            member = tarfile.TarInfo("../escaped")
            member.size = 2
            tar.addfile(member, io.BytesIO(b"hi"))
        (Path(tmp) / "hostile").mkdir()
        blob = hostile.getvalue()
        with pytest.raises(ArtifactError, match="cannot unpack"):
            unpack_artifact(blob, hashlib.sha256(blob).hexdigest(), Path(tmp) / "hostile")
        assert not (Path(tmp) / "hostile" / "escaped").exists()


def test_without_ray_the_fleet_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=re.escape("the fleet needs the 'fleet' extra (ray is not installed): "
                                                   "pip install 'deploykit[fleet]'")):
        need_ray()


def test_machines_lists_the_live_nodes(cluster):
    c, _ = cluster
    ray.init(address=c.address, log_to_driver=False)
    try:
        found = machines(ray)
    finally:
        ray.shutdown()
    assert "alpha" in {p for m in found for p in m.profiles}


def test_worker_start_is_ray_start_with_the_profile_as_a_resource():
    from deploykit.fleet.cluster import start_command

    assert start_command("10.0.0.1:6379", "nvidia-t4", cores=4, gpus=1) == [
        "ray", "start", "--address", "10.0.0.1:6379", "--resources", '{"deploykit-profile:nvidia-t4": 1}',
        "--num-cpus", "4", "--num-gpus", "1"]
    assert start_command(None, "apple-m1-pro")[:3] == ["ray", "start", "--head"]


@pytest.mark.parametrize("argv, message", [
    (("worker", "start", "--profile", "no-such-machine"), "unknown profile 'no-such-machine'"),
    (("bench", "--cluster", "127.0.0.1:1"), "--cluster and --profiles go together"),
    (("bench", "--profiles", "alpha"), "--cluster and --profiles go together"),
    (("bench", "--fresh-ray-workers"), "--fresh-ray-workers applies to --cluster"),
])
def test_fleet_commands_refuse_bad_input_in_one_line(cli, argv, message):
    result = cli(*argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_a_profile_whose_machines_all_die_is_accounted_for_while_another_runs_on(cluster):
    """Every beta machine killed when alpha lands its first result: beta's running configuration is a
    failed row, its queued ones "not run" (found while alpha keeps landing), alpha finishes."""
    c, _ = cluster
    ray.init(address=c.address, log_to_driver=False)
    try:
        def progress(message: str) -> None:
            if re.search(r"\] alpha on node", message):
                for node in list(c.worker_nodes):  # the head is alpha; every other node is a beta
                    c.remove_node(node)

        plans = [PruningPlan("magnitude", s) for s in (0.0, 0.3, 0.6, 0.9)]
        tallies = run_fleet(ray, ["alpha", "beta"], resolve_model("lenet-300-100"), plans, ["dense"],
                            Grid(runtimes=("onnxruntime",)), TimingSettings(warmup_s=0.0, min_time_s=0.5, min_iters=5,
                                                                           rounds=1),
                            progress, lambda *_: None)
    finally:
        ray.shutdown()
    alpha, beta = tallies["alpha"], tallies["beta"]
    assert len(alpha.records) == 4 and not alpha.failures
    accounted = [r.prune for r in beta.records] + [f.prune for f in beta.failures]
    assert sorted(accounted) == sorted(p.label() for p in plans)  # each once
    assert any(f.error.startswith("not run: no machine of profile beta") or "died" in f.error for f in beta.failures)
