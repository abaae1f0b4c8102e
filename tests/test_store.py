"""The results store (SQLite) and `deploykit report`: round trips, atomic runs, interruption, renderings."""

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from deploykit.bench.records import BenchRecord
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.measure import Measurement
from deploykit.results.report import bench_csv, bench_table, compare_table
from deploykit.results.store import ResultStore


def _record(runtime="torch", p50_us=100, form="dense", profile="test-profile"):
    samples = tuple(p50_us * 1000 + 10 * (i % 7) for i in range(600))
    return BenchRecord(
        model="mlp-sst2", prune="magnitude:0.9", sparsity=0.9, overall_sparsity=0.89, form=form, runtime=runtime,
        profile=profile, stage="forward", runtime_version="1", device="cpu", batch_size=1, threads=2,
        measurement=Measurement(samples, 10, 1, 1, 150, True), peak_rss_bytes=10**8, baseline_rss_bytes=10**7,
        disk_bytes=5_650_104, parameters=1_412_354, nonzero_parameters=142_389, parity_max_abs_error=0.0,
        load_s=0.1, timing={"min_time_s": 1.0}, artifact="/tmp/a", versions={"torch": "x"}, machine={"cores": 2})


def _save(store, records, status="complete", profile="test-profile"):
    return store.save_run(records, started_utc="2026-11-23T00:00:00+00:00", status=status, command="deploykit bench",
                          profile=profile, conditions={"timing": {}})


def test_runs_round_trip_with_raw_samples(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    records = [_record("torch"), _record("onnxruntime", 80)]
    run_id = _save(store, records)
    run = store.run("last")
    assert run.id == run_id and run.status == "complete" and run.profile == "test-profile"
    assert [r.to_dict() for r in run.records] == [r.to_dict() for r in records]
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT runtime, p50_ms FROM records ORDER BY id").fetchall() == [
            ("torch", records[0].measurement.median_ms), ("onnxruntime", records[1].measurement.median_ms)]


def test_a_run_that_fails_while_written_leaves_no_trace(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    _save(store, [_record()])

    class Broken:  # a record that cannot be serialised, second in the run
        def __getattr__(self, name):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _save(store, [_record(), Broken()])
    assert [r.id for r in store.runs()] == [1]
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1


def test_run_selection_and_its_errors(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    with pytest.raises(UsageError, match="no results store"):
        store.runs()
    _save(store, [_record(profile="a")], profile="a")
    _save(store, [_record(profile="b")], profile="b")
    _save(store, [_record(profile="a", p50_us=50)], profile="a")
    assert store.run("profile:b").id == 2 and store.run("profile:a").id == 3 and store.run("1").id == 1
    with pytest.raises(UsageError, match=r"no run on profile 'c' in this store \(profiles in it: a, b\): bench on that machine"):
        store.run("profile:c")
    with pytest.raises(UsageError, match="no run '9' in the store; runs: 1, 2, 3"):
        store.run("9")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ArtifactError, match="cannot open results store"):
        ResultStore(tmp_path / "junk.sqlite").runs()


def test_renderings_agree_with_the_records():
    records = [_record("torch", 100), _record("onnxruntime", 80, form="csr")]
    text = bench_table(records)
    assert "note: harness overhead 0.15 us per sample" in text and "0.1000" in text
    markdown = bench_table(records, "github")
    assert markdown.splitlines()[0].startswith("| model") and "onnxruntime and openvino densify sparse initializers" in markdown
    rows = list(csv.DictReader(io.StringIO(bench_csv(records))))
    assert [float(r["p50_ms"]) for r in rows] == [r.measurement.median_ms for r in records]
    assert float(rows[0]["p50_ci95_low_ms"]) <= float(rows[0]["p50_ms"]) <= float(rows[0]["p50_ci95_high_ms"])
    assert rows[0]["p99_ms"]  # 600 samples: enough for p99


def test_comparison_divides_matching_configurations():
    base = [_record("torch", 100), _record("onnxruntime", 80)]
    other = [_record("torch", 50), _record("onnxruntime", 80, form="csr")]
    third = [_record("torch", 200)]
    text = compare_table(base, [("run 2", other), ("run 3", third)], "run 1")
    torch_row = next(line for line in text.splitlines() if " torch " in line)
    assert "0.50x" in torch_row and "2.00x" in torch_row  # a column per other run
    assert "1 configurations of run 1 measured in none of the others" in text
    assert "1 configurations of run 2 not measured in run 1" in text
    with pytest.raises(UsageError, match="share no configuration"):
        compare_table(base[1:], [("b", other[1:])], "a")


def test_the_comparison_names_the_fastest_runtime_of_each_profile():
    import dataclasses

    laptop = [_record("onnxruntime", 80, profile="laptop"), _record("openvino", 100, profile="laptop"),
              dataclasses.replace(_record("openvino", 40, profile="laptop"), precision="bf16",
                                  metrics={"accuracy": 0.89})]
    server = [_record("onnxruntime", 60, profile="server"), _record("openvino", 90, profile="server")]
    laptop[0] = dataclasses.replace(laptop[0], metrics={"accuracy": 0.9})
    text = compare_table(laptop, [("server", server)], "laptop")
    assert ("fastest on laptop: mlp-sst2 magnitude:0.9 dense batch 1 2 threads: openvino bf16 (p50 0.0400 ms, 2.00x "
            "faster than onnxruntime f32); accuracy 0.8900") in text
    assert "fastest on server: mlp-sst2 magnitude:0.9 dense batch 1 2 threads: onnxruntime f32 (p50 0.0600 ms, 1.50x" in text
    assert " bf16 " in next(line for line in text.splitlines() if "openvino" in line and "bf16" in line)


def test_bench_keeps_runs_and_report_renders_them(cli, tmp_path):
    store = tmp_path / "results.sqlite"
    common = ("--form", "dense", "--runtime", "onnxruntime", "--min-time", "0", "--min-iters", "5", "--warmup", "0",
              "--store", str(store), "-q")
    assert cli("bench", "--prune", "magnitude:0", *common).returncode == 0
    assert cli("bench", "--prune", "magnitude:0,0.9", *common).returncode == 0
    listed = cli("report", "--store", str(store), "--list", "--format", "json")
    runs = json.loads(listed.stdout)
    assert [r["status"] for r in runs] == ["complete", "complete"] and runs[1]["command"].startswith("deploykit bench")
    compared = cli("report", "--store", str(store), "--run", "1", "--compare", "2")
    assert compared.returncode == 0 and "1 configurations of run 2 (" in compared.stdout
    out = tmp_path / "report.md"
    assert cli("report", "--store", str(store), "--format", "markdown", "--out", str(out)).returncode == 0
    assert out.read_text().startswith("# run 2 (complete)")
    records = json.loads(cli("report", "--store", str(store), "--format", "json").stdout)["records"]
    assert len(records) == 2 and all(len(r["measurement"]["samples_ns"]) >= 5 for r in records)
    both = cli("bench", "--store", str(store), "--no-store")
    assert both.returncode == 2 and "contradict" in both.stderr


def test_stores_from_other_machines_merge_once_and_compare_side_by_side(cli, tmp_path):
    here, m1, i7 = (ResultStore(tmp_path / f"{name}.sqlite") for name in ("here", "m1", "i7"))
    _save(here, [_record("torch", 100, profile="here")], profile="here")
    _save(m1, [_record("torch", 50, profile="apple-m1-pro")], profile="apple-m1-pro")
    _save(i7, [_record("torch", 200, profile="intel-i7-11800h")], profile="intel-i7-11800h")
    with sqlite3.connect(i7.path) as db:  # a store written before runs had unique ids
        db.execute("UPDATE runs SET uid = NULL")
    for _ in range(2):  # the second import adds nothing
        for other in (m1, i7):
            result = cli("report", "--store", str(here.path), "--import", str(other.path))
            assert result.returncode == 0, result.stderr
    assert "is already in" in result.stdout
    runs = here.runs()
    assert [r.profile for r in runs] == ["here", "apple-m1-pro", "intel-i7-11800h"]
    assert runs[1].uid == m1.runs()[0].uid  # traceable: the same unique id, and where it came from
    assert runs[1].conditions["imported_from"] == {"store": str(m1.path.resolve()), "run": 1}
    assert runs[2].uid.startswith("sha256:")
    compared = cli("report", "--store", str(here.path), "--run", "profile:here", "--compare", "profile:apple-m1-pro",
                   "--compare", "profile:intel-i7-11800h")
    assert compared.returncode == 0, compared.stderr
    row = next(line for line in compared.stdout.splitlines() if " torch " in line)
    assert "0.50x" in row and "2.00x" in row
    assert "run 2 (apple-m1-pro) / run 1 (here)" in compared.stdout
    itself = cli("report", "--store", str(here.path), "--import", str(here.path))
    assert itself.returncode == 2 and "it is the results store itself" in itself.stderr
    (tmp_path / "damaged.sqlite").write_bytes(m1.path.read_bytes()[:4096] + b"\0" * 4096)
    damaged = cli("report", "--store", str(here.path), "--import", str(tmp_path / "damaged.sqlite"))
    assert damaged.returncode == 2 and damaged.stderr.count("\n") == 1 and len(here.runs()) == 3
    os.mkfifo(tmp_path / "fifo")  # neither a store nor a runs file; reading it would never end
    fifo = cli("report", "--store", str(here.path), "--import", str(tmp_path / "fifo"))
    assert fifo.returncode == 2 and "is not a regular file" in fifo.stderr and len(here.runs()) == 3


@pytest.mark.parametrize("signum, code, says", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "stopped by SIGTERM"),  # what timeout, CI cancellation, docker stop and systemd send
    (signal.SIGHUP, 129, "stopped by SIGHUP"),  # a closed terminal
])
def test_a_stopped_bench_keeps_what_it_measured_and_removes_its_scratch(tmp_path, signum, code, says):
    store = tmp_path / "results.sqlite"
    sparsities = "0,0.2,0.4,0.6,0.8,0.9"  # each configuration takes >= 1 s: the signal lands mid-run
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploykit", "bench", "--prune", f"magnitude:{sparsities}", "--form", "dense",
         "--runtime", "onnxruntime", "--min-time", "1", "--min-iters", "5", "--store", str(store)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        # as from a terminal: a test run started as a background job inherits SIGINT ignored, and a Python
        # started with it ignored never raises KeyboardInterrupt; one started under nohup inherits SIGHUP
        # ignored, which deploykit keeps (as nohup asks)
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)])
    watchdog = threading.Timer(240, proc.kill)  # a bench that hangs fails the test instead of the suite
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:  # stop it once the first configuration is measured
            seen.append(line)
            if "p50" in line:
                proc.send_signal(signum)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    assert proc.returncode == code and f"deploykit: {says}" in err, ("".join(seen), err)
    assert "(interrupted) in" in err and "kept as run 1" in err and "Traceback" not in err, err
    run = ResultStore(store).run("last")
    assert run.status == "interrupted" and 1 <= len(run.records) < len(sparsities.split(","))
    leftovers = [p.name for p in Path(tempfile.gettempdir()).glob(f"deploykit-*-{proc.pid}-*")]
    assert leftovers == [], leftovers
