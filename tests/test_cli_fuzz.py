"""Property: whatever arguments and plan values a user (or a script gone wrong) passes, the CLI ends in
exit 0, 1 or 2 without a traceback, and leaves nothing but its declared output in the output's folder."""

import contextlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from deploykit.cli.app import build_parser, main
from deploykit.prune.base import PLAN_KEYS

#: values chosen to break things: non-numbers, non-finite and huge numbers, paths out of their place,
#: special files, lists where one value is expected
HOSTILE = ["nan", "inf", "-inf", "-1", "0", "1e309", "99999999999999999999", "", " ", "../x", "/", "/dev/full",
           "/etc/passwd", "magnitude:0.5,0.9", "magnitude:1.5", "nope:0.1", "x:batch,3", "x:0,0", "csr", "coo",
           "dense-shrunk", "-", "a,b,,c", "1,2,3", "cpu", "gpu", "all", "zlib", "int8", "17", "1e-4", "last",
           "profile:x", "0.5", "l1-structured:0.3"]


def _options(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--")
                  and o not in ("--help", "--debug", "--trust-code"))


def _argv(command: str, extra=()):
    option = st.sampled_from(_options(command))
    value = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))
    pair = st.tuples(option, st.one_of(st.none(), value))
    return st.lists(pair, max_size=4).map(
        lambda pairs: [command, *extra, *[item for o, v in pairs for item in ((o,) if v is None else (o, v))]])


def _check(argv, folder: Path, allowed: set[str], capsys) -> None:
    """Run `argv` in `folder` (relative outputs land there) and check the property."""
    before = {p.name for p in folder.iterdir()}
    # the outputs the arguments ask for are the command's to write
    allowed = allowed | {Path(argv[i + 1]).name for i, a in enumerate(argv[:-1]) if a in ("--json", "--out")}
    try:
        with contextlib.chdir(folder):
            code = main(argv)
    except SystemExit as exc:  # argparse: --help, --version, a usage error
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    event(f"exit {code}")
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    if code != 0:
        assert len([line for line in err.splitlines() if "error" in line]) <= 1, (argv, err)
    left = {p.name for p in folder.iterdir()} - before - allowed
    assert not left, (argv, left)


FAST = ["--warmup", "0", "--min-time", "0", "--min-iters", "2", "--threads", "1", "--runtime", "onnxruntime"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bench_of_an_artifact_survives_any_arguments(data, artifact, capsys, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    argv = data.draw(_argv("bench"))
    # a bench always ends on a bounded configuration: the artifact, fast timing, its own store
    argv = argv[:1] + [str(artifact)] + argv[1:] + [*FAST, "--store", str(work / "s.sqlite")]
    _check(argv, work, {"s.sqlite", "s.sqlite-wal", "s.sqlite-shm"}, capsys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_report_and_audit_survive_any_arguments(data, artifact, capsys, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    command = data.draw(st.sampled_from(["report", "audit", "profile"]))
    if command == "audit":
        argv = data.draw(_argv("audit", [str(artifact)]))
    elif command == "report":
        argv = data.draw(_argv("report")) + ["--store", str(work / "none.sqlite")]
    else:
        argv = ["profile", data.draw(st.sampled_from(["list", "show", "detect"]))] + data.draw(
            st.lists(st.sampled_from(["--json", "x", "apple-m1-pro", "--save"]), max_size=2))
        argv = [a if a != "--save" else "--save=" + str(work / "p.toml") for a in argv]
    _check(argv, work, {"p.toml"}, capsys)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["magnitude", "random", "l1-structured", "global", "layer", "no", "linear", "x"]),
                    st.text(max_size=8))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.dictionaries(st.sampled_from(sorted(set(PLAN_KEYS) - {"rules"})), VALUES, max_size=4),
       rules=st.one_of(st.none(), st.dictionaries(st.sampled_from(["mlp.0", "mlp.*", "x"]), SCALARS, max_size=2)))
def test_plan_files_with_any_values_end_cleanly(plan, rules, capsys, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    if plan.get("method") not in (None, "magnitude", "random") or plan.get("at_init") is True:
        plan["method"] = "magnitude"  # training methods would make an example minutes long
    plan.pop("at_init", None) if plan.get("at_init") is True else None
    text = "".join(f"{key} = {_toml_value(value)}\n" for key, value in plan.items())
    if rules is not None:
        text += "[rules]\n" + "".join(f'"{k}" = {_toml_value(v)}\n' for k, v in rules.items())
    (work / "plan.toml").write_text(text)
    out = work / "art"
    _check(["export", "--model", "mlp-sst2", "--plan", str(work / "plan.toml"), "--out", str(out), "-q"], work,
           {"art"}, capsys)
    shutil.rmtree(work)


# -- the surfaces of issue 32: what is read from files someone else wrote ------------------------------
# Each property is stronger than the ones above: hostile input is bad input (exit 0 or 2, one line),
# never "internal error".

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)


def _clean_failure(argv, capsys, folder: Path | None = None) -> int:
    try:
        if folder is None:
            code = main(argv)
        else:
            with contextlib.chdir(folder):
                code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code:  # deploykit's own line, or argparse's ("deploykit bench: error: ...")
        assert len([line for line in err.splitlines() if "error: " in line]) == 1, (argv, err)
    event(f"exit {code}")
    return code


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory):
    pytest.importorskip("optimum")
    import torch
    import transformers as T

    root = tmp_path_factory.mktemp("hf-fuzz") / "bert"
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32)).save_pretrained(root)
    return root


#: keys a hostile config would change: its sizes, its kind, and what transformers reads beside them
CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "type_vocab_size", "model_type", "architectures", "pruned_heads",
               "quantization_config", "hidden_act", "layer_norm_eps", "torch_dtype", "x"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3))
def test_hugging_face_configs_with_any_values_are_bad_input_or_work(changes, hf_config, capsys, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copytree(hf_config, work / "m")
    config = json.loads((work / "m" / "config.json").read_text())
    (work / "m" / "config.json").write_text(json.dumps({**config, **changes}))
    _clean_failure(["audit", "--model", str(work / "m"), "-q"], capsys, work)
    shutil.rmtree(work)


@pytest.fixture(scope="module")
def runs_file(artifact, tmp_path_factory):
    store = tmp_path_factory.mktemp("runs") / "s.sqlite"
    assert main(["bench", str(artifact), *FAST, "--store", str(store), "-q"]) == 0
    from deploykit.results.store import NewRun, ResultStore

    run = ResultStore(store).run("last")
    return NewRun(run.records, run.started_utc, run.status, run.command, run.profile, run.conditions,
                  run.failures, uid="fuzzed").to_dict()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_runs_files_with_any_values_are_bad_input_or_import(data, runs_file, capsys, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    run = json.loads(json.dumps(runs_file))
    record = run["records"][0]
    target = data.draw(st.sampled_from([run, record, record["measurement"]]))
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(JSON_VALUES)
    (work / "runs.json").write_text(json.dumps({"format": "deploykit.runs", "runs": [run]}))
    store = work / "s.sqlite"
    code = _clean_failure(["report", "--store", str(store), "--import", str(work / "runs.json")], capsys)
    if code == 0:  # what went in renders
        for fmt in ("table", "html", "csv"):
            _clean_failure(["report", "--store", str(store), "--format", fmt], capsys)
    else:
        assert not store.exists()
    shutil.rmtree(work)


SPEC_PARTS = st.one_of(st.sampled_from(["x", "y", "batch", "seq", "4", "0", "-1", "1e3", str(10**23), "float32",
                                        "int64", "int32", "float16", "complex", "", " "]), st.text(max_size=5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.lists(SPEC_PARTS, min_size=1, max_size=5).map(":".join), min_size=1, max_size=2))
def test_input_specs_of_any_text_are_bad_input_or_run(specs, matmul_onnx, capsys):
    argv = ["bench", str(matmul_onnx), *FAST, "--no-store", "-q"]
    argv += [f"--input-spec={spec}" for spec in specs]  # "=": a spec may start with "-"
    _clean_failure(argv, capsys)


PROFILE_TABLES = {"cpu": ["model", "cores", "threads", "base_ghz", "vector_extensions"], "memory": ["gb", "kind"],
                  "gpu": ["model", "memory_gb", "cuda_cores"], "runtime": ["threads", "thread_policy", "torch_device"],
                  "match": ["cpu", "gpu"]}
TOML_VALUES = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
                        st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.sampled_from(["box", "a-b.c_1"]), st.text(max_size=10)),
       table=st.sampled_from(sorted(PROFILE_TABLES)), data=st.data())
def test_profiles_with_any_values_are_bad_input_or_load(name, table, data, capsys, tmp_path, monkeypatch):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    values = data.draw(st.dictionaries(st.sampled_from(PROFILE_TABLES[table]), TOML_VALUES, max_size=3))
    text = f"name = {json.dumps(name)}\ndescription = \"d\"\n[{table}]\n" + "".join(
        f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    (folder / "p.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
    monkeypatch.setenv("DEPLOYKIT_PROFILES", str(folder))
    for argv in (["profile", "list"], ["profile", "show", name or "x"]):
        _clean_failure(argv, capsys)
