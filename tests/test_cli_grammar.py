"""One grammar for the command line: parse-level checks of every subcommand.

The same option means the same thing wherever it appears, defaults and choices are the library's,
and every option a help text names exists where it is named.
"""

import argparse
import json
import re

import pytest

from deploykit.bench.settings import DEFAULT_RUNTIMES, TimingSettings
from deploykit.cli.app import build_parser, main
from deploykit.convert.forms import DEFAULT_FORM, DEFAULT_KERNEL_BATCH, FORMS
from deploykit.convert.onnx_settings import DEFAULT_OPSET, ONNX_TOLERANCE
from deploykit.convert.quantize import QUANTIZERS
from deploykit.core.ort import GRAPH_OPTIMIZATIONS
from deploykit.prune.base import PRUNERS
from deploykit.runtime.devices import DEVICE_CHOICES
from deploykit.runtime.session import RUNTIMES


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(_subparsers(sub, f"{prefix}{name} "))
    return found


PARSERS = _subparsers(build_parser())
#: options of the shared groups: same flag, same help, same kind of value, in every command that has them
SHARED = ("--weights", "--trust-pickle", "--input-shape", "--plan", "--scope", "--rule", "--exclude",
          "--prune-output", "--layer-types", "--seed", "--rounds", "--at-init", "--allow-layer-collapse",
          "--no-verify", "--trust-code", "--store", "-q")


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("flag", SHARED)
def test_a_shared_option_is_the_same_option_everywhere(flag):
    actions = {name: action for name, p in PARSERS.items() if (action := _option(p, flag)) is not None}
    assert actions, flag
    first = next(iter(actions.values()))
    for name, action in actions.items():
        assert (action.help, action.nargs, action.type, action.default, action.const, action.choices) == (
            first.help, first.nargs, first.type, first.default, first.const, first.choices), (flag, name)


def test_json_means_print_instead_or_write_to_path_in_every_command():
    commands = [name for name, p in PARSERS.items() if _option(p, "--json")]
    assert set(commands) >= {"models", "export", "bench", "audit", "profile list", "profile show", "profile detect"}
    for name in commands:
        action = _option(PARSERS[name], "--json")
        assert (action.nargs, action.const, action.metavar) == ("?", "-", "PATH"), name
        assert "printed instead of the human output, or written to PATH" in action.help, name


def test_a_model_is_always_given_with_model_and_artifacts_are_positional():
    for name in ("export", "bench", "audit"):
        assert _option(PARSERS[name], "--model") is not None, name
    assert _parse("audit", "some/dir").artifacts == ["some/dir"]
    assert _parse("audit", "--model", "mlp-sst2").model == "mlp-sst2"
    assert _parse("bench", "a", "b.onnx").artifacts == ["a", "b.onnx"]
    with pytest.raises(SystemExit):
        _parse("export", "mlp-sst2", "--out", "x")  # export builds a model: no positional


def test_defaults_are_the_librarys():
    export = _parse("export", "--out", "x")
    assert (export.opset, export.tolerance, export.form, export.kernel_batch) == (
        DEFAULT_OPSET, ONNX_TOLERANCE, DEFAULT_FORM, DEFAULT_KERNEL_BATCH)
    assert _parse("audit", "--model", "m").form == DEFAULT_FORM
    bench = _parse("bench")
    timing = TimingSettings()
    assert (bench.warmup, bench.min_time, bench.min_iters, bench.timing_rounds, bench.processes) == (
        timing.warmup_s, timing.min_time_s, timing.min_iters, timing.rounds, timing.processes)
    assert f"default {','.join(DEFAULT_RUNTIMES)}" in _option(PARSERS["bench"], "--runtime").help


def test_choices_come_from_the_registries():
    export = PARSERS["export"]
    assert list(_option(export, "--form").choices) == FORMS.names()
    assert list(_option(export, "--quantize").choices) == QUANTIZERS.names()
    assert tuple(_option(export, "--save-optimized").choices) == GRAPH_OPTIMIZATIONS
    help_text = {name: p.format_help() for name, p in PARSERS.items()}
    for name in PRUNERS.names():
        assert name in help_text["export"] and name in help_text["bench"] and name in help_text["audit"]
    for names, commands in ((FORMS.names(), ("export", "bench", "audit")), (RUNTIMES.names(), ("bench",)),
                            (DEVICE_CHOICES, ("bench",)), (GRAPH_OPTIMIZATIONS, ("bench", "export"))):
        for command in commands:
            assert all(n in help_text[command] for n in names), (command, names)


@pytest.mark.parametrize("argv, message", [
    (["bench", "--form", "dense,coo"], "argument --form: unknown form 'coo'; known: bsr, csr, dense, dense-shrunk"),
    (["bench", "--device", "tpu"], "argument --device: unknown device 'tpu'; known: auto, cpu, gpu"),
    (["bench", "--graph-opt", "max"], "unknown graph optimisation 'max'; known: disabled, basic, extended, all"),
    (["export", "--quantize", "int4", "--out", "x"], "argument --quantize: invalid choice: 'int4'"),
    (["export", "--save-optimized", "max", "--out", "x"], "argument --save-optimized: invalid choice: 'max'"),
    (["audit", "--form", "coo", "--model", "m"], "argument --form: invalid choice: 'coo'"),
])
def test_a_bad_choice_is_one_line_naming_the_valid_ones(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(*argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_every_option_a_help_text_names_exists_in_that_command():
    for name, parser in PARSERS.items():
        # a command's text may name its own options and its actions' (profile: detect --save)
        own = [parser, *(p for sub, p in PARSERS.items() if sub.startswith(name + " "))]
        flags = {flag for p in own for action in p._actions for flag in action.option_strings}
        texts = [parser.description or ""] + [a.help or "" for a in parser._actions]
        for group in parser._action_groups:
            texts.append(group.description or "")
        named = {flag for text in texts for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)}
        assert named <= flags, (name, sorted(named - flags))


def test_input_spec_help_names_batch_and_seq_len_only_where_they_exist():
    for name in ("export", "audit", "bench"):
        text = _option(PARSERS[name], "--input-spec").help
        has_sizes = _option(PARSERS[name], "--batch") is not None
        assert ("--batch" in text) == has_sizes and ("--seq-len" in text) == has_sizes, name


def test_export_of_several_sparsities_and_bench_json_to_a_directory_are_one_line_errors(tmp_path, capsys):
    # the two crashes of the trust issue, at the command line's level
    assert main(["export", "--prune", "magnitude:0.1,0.2", "--out", str(tmp_path / "o")]) == 2
    assert "export writes one artifact: give one sparsity, not 2" in capsys.readouterr().err
    assert main(["bench", f"--json={tmp_path}"]) == 2
    assert "--json" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_report_list_refuses_formats_it_cannot_render(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    assert main(["report", "--store", str(store), "--list", "--format", "html"]) == 2
    assert "--list renders as table, markdown or json, not html" in capsys.readouterr().err  # before the store is read


def test_json_without_path_prints_json_and_with_path_writes_it_beside_the_table(tmp_path, capsys):
    assert main(["profile", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in listed} >= {"apple-m1-pro", "intel-i7-11800h"}
    path = tmp_path / "profiles.json"
    assert main(["profile", "list", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(path.read_text()) == listed and "intel-i7-11800h" in out and not out.lstrip().startswith("[")
    assert main(["profile", "list", f"--json={tmp_path}"]) == 2  # a directory is not a PATH to write
    capsys.readouterr()
    # a next word is a PATH only where it ends in .json: otherwise it stays what it is (here, a stray argument)
    with pytest.raises(SystemExit) as stopped:
        main(["profile", "list", "--json", str(tmp_path / "profiles")])
    assert stopped.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err and not (tmp_path / "profiles").exists()
