"""The measured answer: every variant against the unpruned baseline in the same rounds, its speedup,
size and quality in every output, the Pareto front, and `report --pick` as a release gate."""

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from deploykit.bench.records import BenchRecord, Versus
from deploykit.core.errors import UsageError
from deploykit.core.measure import Measurement
from deploykit.results.pick import Constraints, pareto_front, pick
from deploykit.results.report import bench_csv, bench_table, records_json, speedup_cell
from deploykit.results.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--warmup", "0.01", "--min-time", "0.05", "--min-iters", "20", "--threads", "1", "--timing-rounds", "4"]


def test_the_speedup_interval_is_the_order_statistics_of_its_rounds():
    # 20 rounds: the 6th smallest and 6th largest cover the median with >= 95% (95.9%); the 7th would not
    ratios = tuple(1 + i / 100 for i in range(20))
    v = Versus("a", "none", "dense", 1.0, 100, {}, ratios)
    assert v.speedup == statistics.median(ratios)
    assert v.speedup_ci95() == (ratios[5], ratios[14])
    # five rounds: no pair reaches 95%, so the widest one (93.75%)
    five = Versus("a", "none", "dense", 1.0, 100, {}, (1.0, 1.2, 1.1, 0.9, 1.3))
    assert five.speedup == 1.1 and five.speedup_ci95() == (0.9, 1.3) and five.noisy
    assert not Versus("a", "none", "dense", 1.0, 100, {}, tuple([2.0] * 5 + [2.01] * 5)).noisy
    assert Versus("a", "none", "dense", 1.0, 100, {}).speedup is None


def test_bench_of_plans_measures_the_unpruned_baseline_with_them(cli):
    r = cli("bench", "--model", "lenet-300-100", "--prune", "magnitude:0.5", "--form", "dense,csr", "--runtime",
            "onnxruntime", *FAST, "--no-store", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == "deploykit.bench/2" and out["run"] is None and out["failures"] == []
    assert any("speedup = the baseline's p50" in note for note in out["notes"])
    rows = out["records"]
    assert [(x["prune"], x["form"], x["baseline"]) for x in rows] == [
        ("none", "dense", True), ("magnitude:0.5", "dense", False), ("magnitude:0.5", "csr", False)]
    for row in rows[1:]:
        versus = row["versus"]
        assert versus["prune"] == "none" and versus["form"] == "dense"
        assert len(versus["round_ratios"]) == 4  # paired round by round, all four rounds
        assert row["speedup"] == statistics.median(versus["round_ratios"])
        assert versus["speedup_ci95"] == [min(versus["round_ratios"]), max(versus["round_ratios"])]
        assert row["size_ratio"] == row["disk_bytes"] / rows[0]["disk_bytes"]
        # quality travels with it: lenet is trained and evaluated
        assert row["quality_change"]["accuracy"] == pytest.approx(row["metrics"]["accuracy"] - versus["metrics"]["accuracy"])
    assert rows[0]["speedup"] == 1.0 and isinstance(rows[0]["pareto"], bool)
    # items/s is the p50's
    assert rows[0]["throughput_items_per_s"] == pytest.approx(1e3 / rows[0]["latency_ms"]["p50"])

    # --no-baseline: nothing more is measured, and nothing claims a ratio
    r = cli("bench", "--model", "lenet-300-100", "--prune", "magnitude:0.5", "--form", "dense", "--runtime",
            "onnxruntime", *FAST, "--no-store", "--json", "-", "-q", "--no-baseline")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["records"]
    assert row["speedup"] is None and row["versus"] is None and not row["baseline"]


def test_a_bench_of_dirs_takes_its_unpruned_dir_as_baseline_and_refuses_another_models(cli, tmp_path):
    for name, model, prune in (("base", "mlp-sst2", "magnitude:0"), ("half", "mlp-sst2", "magnitude:0.5"),
                               ("other", "lenet-300-100", "magnitude:0")):
        r = cli("export", "--model", model, "--prune", prune, "--out", str(tmp_path / name), "-q")
        assert r.returncode == 0, r.stderr
    r = cli("bench", str(tmp_path / "half"), str(tmp_path / "base"), "--runtime", "onnxruntime", *FAST, "--no-store",
            "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    half, base = json.loads(r.stdout)["records"]
    assert base["baseline"] and half["versus"]["artifact"] == str(tmp_path / "base")
    r = cli("bench", str(tmp_path / "half"), "--baseline", str(tmp_path / "other"), "--runtime", "onnxruntime",
            *FAST, "--no-store", "-q")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--baseline other is an artifact of lenet-300-100; half is of mlp-sst2" in r.stderr
    r = cli("bench", "--model", "mlp-sst2", "--baseline", str(tmp_path / "base"), "--no-store")
    assert r.returncode == 2 and "--baseline DIR applies to a bench of DIRs" in r.stderr


def _record(prune, form, p50_us, disk, accuracy=None, ratios=(), baseline=False, wrong=False, runtime="torch"):
    samples = tuple(int(p50_us * 1000) + i % 3 for i in range(60))
    versus = None if baseline or not ratios else Versus("/tmp/base", "none", "dense", 1.0, 1000,
                                                          {"accuracy": 0.9}, tuple(ratios))
    return BenchRecord(
        model="m", prune=prune, sparsity=0.5, overall_sparsity=0.5, form=form, runtime=runtime, profile="p",
        stage="forward", runtime_version="1", device="cpu", batch_size=1, threads=1,
        measurement=Measurement(samples, 10, 1, 1, 0, True), peak_rss_bytes=1, baseline_rss_bytes=1, disk_bytes=disk,
        parameters=10, nonzero_parameters=5, parity_max_abs_error=1.0 if wrong else 0.0, load_s=0.1, timing={},
        artifact=f"/tmp/{prune}-{form}", versions={}, machine={}, parity_tolerance=1e-4,
        metrics={} if accuracy is None else {"accuracy": accuracy}, baseline=baseline, versus=versus)


def _variants():
    return [
        _record("none", "dense", 1000, 1000, 0.90, baseline=True),
        _record("magnitude:0.5", "dense", 700, 1000, 0.89, ratios=[1.40, 1.42, 1.43, 1.41, 1.45]),  # slower, bigger
        _record("magnitude:0.5", "csr", 500, 600, 0.89, ratios=[2.0, 2.01, 2.02, 1.99, 2.03]),
        _record("magnitude:0.9", "csr", 300, 200, 0.70, ratios=[3.3, 3.4, 3.35, 3.31, 3.36]),
        _record("random:0.9", "csr", 200, 200, 0.95, ratios=[5.0] * 5, wrong=True),  # fastest, but wrong
    ]


def test_the_pareto_front_keeps_variants_no_other_beats_at_once():
    assert pareto_front(_variants()) == {0, 2, 3}


def test_pick_takes_the_fastest_that_meets_the_constraints_and_says_why_others_lost():
    (choice,) = pick(_variants(), Constraints(max_quality_drop=0.05))
    assert choice.chosen.prune == "magnitude:0.5" and choice.chosen.form == "csr"
    why = {(r.prune, r.form): text for r, text in choice.rejected}
    assert why["magnitude:0.9", "csr"].startswith("accuracy 0.7000 loses 0.2000")
    assert why["random:0.9", "csr"].startswith("wrong outputs")
    assert why["magnitude:0.5", "dense"].startswith("slower: 1.42x")
    (choice,) = pick(_variants(), Constraints(objective="size"))
    assert choice.chosen.prune == "magnitude:0.9"
    # a relative limit: 25% of the baseline's 0.9 allows 0.225
    (choice,) = pick(_variants(), Constraints(max_quality_drop=0.25, relative_quality_drop=True))
    assert choice.chosen.prune == "magnitude:0.9"
    (choice,) = pick(_variants(), Constraints(min_speedup=10))
    assert choice.chosen is None
    # a speedup whose interval reaches under the limit does not pass a gate
    noisy = [_variants()[0], _record("magnitude:0.5", "csr", 500, 600, 0.9, ratios=[0.9, 2.0, 2.1, 2.2, 2.0])]
    (choice,) = pick(noisy, Constraints(min_speedup=1.5))
    assert choice.chosen is None and "its 95% interval reaches 0.90x" in choice.rejected[-1][1]


def test_variants_tied_within_noise_fall_back_to_the_better_quality():
    records = [_record("none", "dense", 1000, 1000, 0.90, baseline=True),
               _record("magnitude:0.5", "dense", 990, 1000, 0.85, ratios=[0.95, 1.1, 1.0, 1.05, 0.98])]
    (choice,) = pick(records, Constraints())
    assert choice.chosen.baseline
    assert "as fast as the chosen within this run's noise" in choice.rejected[0][1]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_speedup": -1.0}, "--min-speedup must be a finite number >= 0"),
    ({"max_size_mb": 0.0}, "--max-size-mb 0 admits no variant"),
    ({"max_quality_drop": 1.5, "relative_quality_drop": True}, "would allow losing all"),
    ({"objective": "cost"}, "unknown --objective 'cost'"),
])
def test_contradictory_constraints_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Constraints(**kwargs)


def test_every_output_carries_speedup_size_quality_and_the_front():
    records = _variants()
    table = bench_table(records)
    header = table.splitlines()[0].split()
    assert header[:4] == ["model", "plan", "form", "runtime"] and "speedup" in header and "quality" in header
    lines = table.splitlines()
    assert "baseline" in lines[2] and "accuracy 0.9000" in lines[2]
    assert "2.01x [1.99-2.03]" in lines[4] and "0.60x" in lines[4] and "(-0.0100)" in lines[4]
    assert lines[4].rstrip().endswith("*") and not lines[3].rstrip().endswith("*")
    assert "WRONG" in lines[6] and not lines[6].rstrip().endswith("*")
    csv = bench_csv(records).splitlines()
    assert csv[0].endswith("baseline,speedup,speedup_ci95_low,speedup_ci95_high,size_ratio,metrics,quality_change,pareto")
    assert csv[3].endswith(",1")
    data = json.loads(records_json(records, 7))
    assert data["run"] == 7 and [r["pareto"] for r in data["records"]] == [True, False, True, True, False]
    # marks: '~' a wide interval, '!' other work during the rounds
    wide = _record("magnitude:0.5", "csr", 500, 600, ratios=[1.0, 2.0, 2.1, 2.2, 3.0])
    assert speedup_cell(wide).startswith("~2.10x")
    busy = dataclasses.replace(records[2], load={"during": {"others_busy_cores": 1.0, "steal_fraction": 0.0, "runnable": 2,
                                                           "interval_s": 1.0}})
    assert speedup_cell(busy).startswith("!")


def _stored(tmp_path, records):
    store = ResultStore(tmp_path / "r.sqlite")
    store.save_run(records, started_utc="2026-12-07T00:00:00+00:00", status="complete", command="deploykit bench",
                   profile="p", conditions={})
    return str(store.path)


def test_report_pick_is_a_release_gate(cli, tmp_path):
    store = _stored(tmp_path, _variants())
    r = cli("report", "--store", store, "--pick", "--max-quality-drop", "0.05")
    assert r.returncode == 0, r.stderr
    assert "ship magnitude:0.5 csr" in r.stdout and "not magnitude:0.9 csr" in r.stdout
    r = cli("report", "--store", store, "--pick", "--min-speedup", "10")
    assert r.returncode == 1 and "NOTHING satisfies the constraints" in r.stdout
    for args, message in ((["--max-size-mb", "3"], "apply to --pick"),
                          (["--pick", "--max-quality-drop", "lots"], "--max-quality-drop takes a number"),
                          (["--pick", "--format", "json"], "--pick prints its choice as text"),
                          (["--pick", "--out", str(tmp_path / "chosen")], "which is gone")):
        r = cli("report", "--store", store, *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "chosen").exists()


def test_pick_out_copies_the_chosen_artifact_of_a_kept_bench_verified(cli, tmp_path):
    store, kept = str(tmp_path / "s.sqlite"), tmp_path / "kept"
    r = cli("bench", "--model", "mlp-sst2", "--prune", "magnitude:0.9", "--form", "dense,csr", "--runtime",
            "onnxruntime", *FAST, "--store", store, "--keep", str(kept), "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["00-none-dense", "01-magnitude_0.9-dense", "02-magnitude_0.9-csr"]
    r = cli("report", "--store", store, "--pick", "--objective", "size", "--out", str(tmp_path / "ship"))
    assert r.returncode == 0, r.stderr
    assert "ship magnitude:0.9 csr" in r.stdout  # the smallest files under onnxruntime: csr's ONNX at 0.9
    assert (tmp_path / "ship" / "manifest.json").read_bytes() == (kept / "02-magnitude_0.9-csr" / "manifest.json").read_bytes()
    r = cli("bench", "--model", "mlp-sst2", "--prune", "magnitude:0.5", "--keep", str(kept), "--no-store")
    assert r.returncode == 2 and "is not an empty directory" in r.stderr


def test_export_calls_flops_a_count_and_measures_the_variant_against_the_unpruned_model(cli, tmp_path):
    r = cli("export", "--model", "mlp-sst2", "--prune", "magnitude:0.9", "--form", "csr", "--out", str(tmp_path / "a"),
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("measured against the unpruned model")]
    assert "torch " in line and "onnxruntime " in line and "x [" in line
    r = cli("export", "--model", "mlp-sst2", "--prune", "magnitude:0.9", "--form", "csr", "--out", str(tmp_path / "b"),
            "--threads", "1", "--no-measure")
    assert r.returncode == 0 and "measured against" not in r.stdout


def test_dense_shrunk_export_chooses_its_alignment_by_measurement_and_records_it(cli, tmp_path):
    # the command of models/examples/residual_cnn.py: a user's CNN with BatchNorm and a residual
    r = cli("export", "--model", str(ROOT / "models/examples/residual_cnn.py") + ":build", "--prune",
            "l1-structured:0.5", "--form", "dense-shrunk", "--out", str(tmp_path / "a"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    changes = json.loads((tmp_path / "a" / "manifest.json").read_text())["shape_changes"]
    # the residual couples the stem and the block's last convolution: they keep the same channels
    assert changes["stem.0"][1].split(", ")[1] == changes["block.3"][1].split(", ")[1]
    assert "theoretical" not in r.stdout and "x fewer: a count, not a time" in r.stdout
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    chosen = manifest["form_recipe"]["round_to"]
    assert chosen["choice"] in (1, 8, 16, 32) and chosen["runtimes"] == ["torch", "onnxruntime"]
    assert set(chosen["candidates"]) | set(chosen["same_as"]) == {"1", "8", "16", "32"}
    for runtimes in chosen["candidates"].values():
        assert set(runtimes) == {"torch", "onnxruntime"}
        assert all(len(v["round_ratios"]) == 5 and v["ci95"][0] <= v["speedup"] <= v["ci95"][1]
                   for v in runtimes.values())
    assert manifest["plan"]["round_to"] == chosen["choice"]
    assert f"round-to auto: kept {chosen['choice']}" in r.stdout
    # the chosen candidate's rows are the measurement printed: nothing is timed twice
    assert sum(x.startswith("measured against the unpruned model") for x in r.stdout.splitlines()) == 1
    # an explicit N is kept, and --round-to auto where nothing can align is a note, not an error
    r = cli("export", "--model", "lenet-300-100", "--prune", "l1-structured:0.5", "--form", "dense-shrunk",
            "--out", str(tmp_path / "b"), "--threads", "1", "--round-to", "1", "--no-measure")
    assert r.returncode == 0 and "round-to auto" not in r.stdout
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["form_recipe"].get("round_to") is None
    r = cli("export", "--model", "lenet-300-100", "--prune", "magnitude:0.5", "--out", str(tmp_path / "c"),
            "--round-to", "auto", "--no-measure")
    assert r.returncode == 0 and "--round-to auto: magnitude prunes single weights" in r.stderr
    for args, message in ((["bench", "--round-to", "auto", "--no-store"], "--round-to auto is export's"),
                          (["export", "--round-to", "eight", "--out", str(tmp_path / "d")],
                           "expected an integer or 'auto', got 'eight'")):
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _candidate(speedups: dict[str, tuple[float, ...]]):
    return [dataclasses.replace(_record("l1-structured:0.5", "dense-shrunk", 100, 100, ratios=ratios, runtime=rt))
            for rt, ratios in speedups.items()]


def test_the_alignment_kept_is_measurably_faster_else_the_plan_as_asked():
    from deploykit.bench.alignment import _choose

    slow, fast = (0.5, 0.51, 0.52, 0.5, 0.49), (1.2, 1.21, 1.19, 1.2, 1.22)
    chosen = _choose({1: _candidate({"torch": fast, "onnxruntime": slow}),
                      8: _candidate({"torch": fast, "onnxruntime": fast})}, {16: 8}, ("torch", "onnxruntime"), 1, 1)
    assert chosen.choice == 8 and not chosen.noisy and "faster than 1 beyond the rounds' intervals" in chosen.reason
    assert chosen.to_recipe()["same_as"] == {"16": 8} and set(chosen.to_recipe()["candidates"]) == {"1", "8"}
    # faster on one runtime, slower on another: the worst runtime decides
    chosen = _choose({1: _candidate({"torch": fast, "onnxruntime": fast}),
                      8: _candidate({"torch": (2.0,) * 5, "onnxruntime": slow})}, {}, ("torch", "onnxruntime"), 1, 1)
    assert chosen.choice == 1 and not chosen.noisy
    # within wide intervals of each other: 1, NOISY
    wide = (0.8, 1.0, 1.3, 1.1, 0.9)
    chosen = _choose({1: _candidate({"torch": wide}), 8: _candidate({"torch": (1.05, 1.1, 1.2, 0.95, 1.3)})}, {},
                     ("torch",), 1, 1)
    assert chosen.choice == 1 and chosen.noisy and "within this run's noise" in chosen.reason


def test_a_plans_label_names_what_sets_the_variant_apart():
    from deploykit.prune.base import PruningPlan

    assert PruningPlan("magnitude", 0.9).label() == "magnitude:0.9"
    assert PruningPlan("magnitude", 0.9).described() == "magnitude:0.9 (global)"
    plan = PruningPlan("l1-structured", 0.5, scope="layer", round_to=8)
    assert plan.label() == plan.described() == "l1-structured:0.5,layer,round-to 8"
    assert PruningPlan("l1-structured", 0.0, scope="layer").label() == "none"


def test_a_manifest_written_before_parameter_names_existed_still_verifies(artifact, tmp_path):
    import shutil

    from deploykit.model.artifact import MANIFEST_FILE, count_weights, digest_of, read_manifest, verify_artifact

    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    data = json.loads((old / MANIFEST_FILE).read_text())
    del data["parameter_names"]
    data["manifest_sha256"] = digest_of(data)  # sealed as the release before wrote it
    (old / MANIFEST_FILE).write_text(json.dumps(data))
    manifest = read_manifest(old)
    verify_artifact(old, manifest)
    assert manifest.parameter_names == [] and count_weights(old, manifest) == (manifest.parameters,
                                                                               manifest.nonzero_parameters)


@pytest.mark.parametrize("metric, direction", [("accuracy", 1), ("bleu", 1), ("token_accuracy", 1),
                                               ("answer_accuracy", 1), ("perplexity", -1), ("val_loss", -1),
                                               ("error_rate", -1), ("wer", -1)])
def test_a_metrics_direction_is_read_from_its_words(metric, direction):
    from deploykit.results.pick import better_direction

    assert better_direction(metric) == direction


def test_an_alignment_the_model_cannot_take_is_left_out_and_said(monkeypatch):
    from deploykit.bench import alignment
    from deploykit.bench.settings import TimingSettings
    from deploykit.model.sources import resolve_model
    from deploykit.prune.base import PruningPlan

    real = alignment.export_artifact

    def refusing(spec, plan, form, out, **options):
        if plan.round_to == 16:
            raise UsageError("a width of 16 breaks this model")
        return real(spec, plan, form, out, **options)

    monkeypatch.setattr(alignment, "export_artifact", refusing)
    chosen = alignment.choose_round_to(resolve_model("lenet-300-100"), PruningPlan.parse("l1-structured:0.5"), 1,
                                       runtimes=("onnxruntime",),
                                       timing=TimingSettings(warmup_s=0.01, min_time_s=0.05, min_iters=5, rounds=3))
    recipe = chosen.to_recipe()
    assert recipe["left_out"] == {"16": "a width of 16 breaks this model"}
    assert "16" not in recipe["candidates"] and "1" in recipe["candidates"] and chosen.choice != 16
