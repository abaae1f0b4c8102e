"""`deploykit` command line: parses options and calls the library; nothing else.

Heavy libraries (torch, onnxruntime) are imported inside the command functions, so `deploykit --help`
answers at once. No traceback reaches the user: expected failures (`DeployKitError`) print one line and
exit non-zero (2 for bad input, 1 for a failed check); anything else is deploykit's own fault and prints
one line too, exit 1, with the traceback behind `--debug`. Nothing half-written is left behind (the
library writes atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import traceback
from typing import Callable, Sequence

from deploykit import __version__
from deploykit.bench.settings import DEFAULT_RUNTIMES, Grid
from deploykit.cli import options
from deploykit.cli.options import DEFAULT_BENCH_PRUNE
from deploykit.convert.forms import DEFAULT_FORMS
from deploykit.core.errors import DeployKitError, MeasurementError, UsageError
from deploykit.core.extras import missing_extra
from deploykit.core.ort import DEFAULT_GRAPH_OPTIMIZATION
from deploykit.core.signals import Terminated, as_terminated, stop_signals_interrupt
from deploykit.model.spec import DEFAULT_MODEL
from deploykit.runtime.precisions import DEFAULT_PRECISION

REPORT_FORMATS = ("table", "markdown", "csv", "json", "html")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _progress(args):
    """Where the library's progress messages go: stderr; with -q only its warnings."""
    quiet = getattr(args, "quiet", False)

    def report(message: str) -> None:
        if not quiet or message.startswith("warning:"):
            print(f"deploykit: {message}", file=sys.stderr, flush=True)

    return report


def _trust_warnings(args, progress) -> tuple[str, ...]:
    """The code consent of --trust-code (else of the code `deploykit trust` recorded), with the warnings
    --trust-code and --no-verify owe the user."""
    from deploykit.model.sources import TRUST_ALL_CODE
    from deploykit.model.trust import trusted_consent

    if getattr(args, "no_verify", False):
        progress("warning: --no-verify: artifact files are used without checking their checksums")
    if getattr(args, "trust_code", False):
        progress("warning: --trust-code: code named by artifacts will be imported and run")
        return (TRUST_ALL_CODE,)
    # the trust file is read where an artifact given on the command line may need it (an artifact this run
    # exports carries its own consent), so a damaged one fails only what it could decide
    reads_artifacts = getattr(args, "artifacts", None) or getattr(args, "baseline", None)
    return trusted_consent() if hasattr(args, "trust_code") and reads_artifacts else ()


def _check_output(path: str, option: str) -> None:
    """Refuse an output path before any work: a directory, device, FIFO or socket, or a missing directory."""
    from pathlib import Path

    from deploykit.core.fsutil import check_output_file

    if Path(path).is_dir():
        raise UsageError(f"{option} {path!r} is a directory; give a file path")
    check_output_file(path)


def _check_json(args) -> None:
    """Refuse a bad --json PATH before any work."""
    if getattr(args, "json", None) not in (None, "-"):
        _check_output(args.json, "--json")


#: options that name a file or directory the command reads, what to call it, and whether a directory
#: is read whole (an artifact: any file added inside it breaks its manifest's account of it)
_READ_OPTIONS = (("artifacts", "the artifact or ONNX file", True), ("baseline", "the baseline artifact", True),
                 ("weights", "the weights file", False),
                 ("plan", "the plan file", False), ("budget", "the budget file", False),
                 ("imports", "the file to import", False))


def _paths_read(args) -> list[tuple[str, str, bool]]:
    """Every path the command `args` reads: the options above, a --model that is a file or directory
    (an entry point's file before its ':'), and the results store where the command uses one."""
    from pathlib import Path

    from deploykit.results.store import default_store_path

    found = []
    for option, what, whole in _READ_OPTIONS:
        values = getattr(args, option, None)
        for value in [values] if isinstance(values, str) else values or ():
            found.append((what, value, whole))
    model = getattr(args, "model", None)
    if model:
        path = model if Path(model).exists() else model.rpartition(":")[0]
        if path and Path(path).exists():
            found.append(("the model", path, False))
    if hasattr(args, "store") and not getattr(args, "no_store", False):
        found.append(("the results store", args.store or str(default_store_path()), False))
    return found


def _check_outputs_apart(args) -> None:
    """No output of the command replaces or changes what the same command reads (checked before any work)."""
    from deploykit.core.fsutil import check_outputs_apart

    outputs = [(option, getattr(args, attr, None)) for option, attr in (("--json", "json"), ("--out", "out"),
                                                                         ("--save", "save"), ("--keep", "keep"))]
    check_outputs_apart(outputs, _paths_read(args))


def _emit(args, text: str, human: Callable[[], None]) -> None:
    """The one meaning of --json: without PATH, `text` (JSON) instead of the human output; with PATH,
    `text` written there atomically and the human output printed as usual."""
    from deploykit.core.fsutil import write_text_atomic

    text = text if text.endswith("\n") else text + "\n"
    if args.json == "-":
        print(text, end="")
        return
    if args.json:
        replaced = write_text_atomic(args.json, text)
        _progress(args)(f"wrote {args.json}" + (f" (replacing a file of {replaced:,} bytes)" if replaced is not None
                                                 else ""))
    human()


def _with_checked_values(spec, args):
    """`spec`, refused in one line where `--input-value` was given for a model whose pipeline makes its own
    inputs (text generation's prompts, speech translation's utterances): the values would not be used."""
    from deploykit.pipelines.catalog import PIPELINES

    if args.input_value and not PIPELINES.get(spec.pipeline).single_graph:
        raise UsageError(f"--input-value sets the inputs of a model called as one graph; {spec.name} runs as "
                         f"{spec.pipeline}, whose inputs the pipeline makes itself (prompts, utterances)")
    return spec


def _model_options(args):
    from deploykit.model.sources import ModelOptions
    from deploykit.model.spec import InputSpec, parse_input_values

    inputs = [InputSpec.parse(text) for text in args.input_spec]
    named = [spec.name for spec in inputs]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise UsageError(f"--input-spec describes input {repeated[0]!r} more than once; give each input once")
    if args.input_shape:
        if inputs:
            raise UsageError("give --input-shape or --input-spec, not both")
        # unnamed: it takes the name of the model's one input
        inputs = [InputSpec("", InputSpec.parse(f"_:{args.input_shape}").shape)]
    return ModelOptions(weights=args.weights, trust_pickle=args.trust_pickle, inputs=tuple(inputs), task=args.task,
                        values=parse_input_values(args.input_value), bundle_code=getattr(args, "bundle_code", True))


def _plan_options(args) -> dict:
    """PruningPlan fields from --plan FILE, overridden by the command-line options given."""
    from deploykit.prune.base import load_plan_file, parse_pattern_rule, parse_rule

    options = load_plan_file(args.plan) if args.plan else {}
    if args.scope is not None:
        options["scope"] = args.scope
    if args.seed is not None:
        options["seed"] = args.seed
    if args.rounds is not None:
        options["rounds"] = args.rounds
    if args.round_to == "auto":
        if args.command != "export":
            raise UsageError("--round-to auto is export's (it measures the candidates there); bench measures the "
                             "plans it is given: sweep --round-to values with separate benches or DIRs")
    elif args.round_to is not None:
        options["round_to"] = args.round_to
    if args.graph_timeout is not None:
        options["graph_timeout_s"] = args.graph_timeout
    if args.rule:
        options["rules"] = tuple(parse_rule(text) for text in args.rule)
    options["exclude"] = tuple(options.get("exclude", ())) + tuple(args.exclude)
    if args.prune_output:
        options["exclude_output"] = False
    if args.layer_types:
        options["layer_types"] = tuple(args.layer_types)
    if args.at_init:
        options["at_init"] = True
    if args.allow_layer_collapse:
        options["allow_layer_collapse"] = True
    if args.block is not None:
        if args.pattern is not None and args.pattern != args.block:
            raise UsageError(f"--block {args.block} and --pattern {args.pattern} name two patterns: give one")
        if "x" not in args.block.lower():
            raise UsageError(f"--block takes a block RxC (8x8, 1x4), got {args.block!r}; N:M goes to --pattern")
        args.pattern = args.block
    if args.pattern_rule:
        options["pattern_rules"] = tuple(parse_pattern_rule(text) for text in args.pattern_rule)
    for option in ("pattern", "calibration", "calibration_samples", "reconstruct", "recover"):
        if getattr(args, option) is not None:
            options["recover_steps" if option == "recover" else option] = getattr(args, option)
    return options


def _plans(texts: list[str], options: dict) -> list:
    """Plans for each METHOD:S[,S...] in `texts`; a plan file's method and sparsity are the default."""
    from deploykit.prune.base import PruningPlan, parse_prune_spec

    if not texts:
        return [PruningPlan(**options)]
    fields = {k: v for k, v in options.items() if k not in ("method", "amount", "compression")}
    return [PruningPlan(**fields, **parsed) for text in texts for parsed in _expand_prune(text, parse_prune_spec)]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deploykit",
        description="Prune a PyTorch model, strip the masks, convert it to a deployable form, export it "
        "to ONNX with a parity check, and benchmark it under PyTorch and ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"deploykit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("models", help="list the registered models",
                       description="List the models deploykit can build by name.")
    options.add_json(p, "the models")
    options.add_quiet(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "export", help="prune, convert and export one model to an artifact directory",
        description="Build MODEL, prune it, strip the masks, convert it to FORM, export its ONNX graph(s), check "
        "onnxruntime against PyTorch (max abs error <= --tolerance) and write DIR atomically with "
        "weights.safetensors, the graph(s) and manifest.json.",
    )
    options.add_model(p, default=DEFAULT_MODEL, artifacts=None, sizes=False)
    options.add_plan(p, sweep=False)
    options.add_conversion(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="artifact directory to create")
    g.add_argument("--overwrite", action="store_true", help="replace DIR if it is a deploykit artifact")
    options.add_json(g, "the manifest")
    g.add_argument("--threads", type=int, metavar="N",
                   help="threads for the export's own work (tracing, csr kernel timing, parity, the measurement "
                   "against the unpruned model): the csr kernel choice is made for this count (default: the cores "
                   "idle now)")
    g.add_argument("--no-measure", action="store_true",
                   help="skip timing a dense-shrunk or csr variant against the unpruned model on this machine (a "
                   "few seconds of interleaved rounds per runtime, at --kernel-batch)")
    g.add_argument("--bundle-code", action=argparse.BooleanOptionalAction, default=True,
                   help="for a file entry point (file.py:factory): copy the file, and the modules it imports from its "
                   "folder, into the artifact's code/ with their SHA-256, so the artifact rebuilds its PyTorch model "
                   "wherever it is copied (default on; bundled code still runs only with the user's consent: bench's "
                   "trust option, or `deploykit trust DIR`). --no-bundle-code records the file's absolute path instead")
    options.add_layers(g, "off")
    options.add_quiet(g)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench", help="benchmark pruned variants (or exported DIRs) under PyTorch and ONNX Runtime",
        description=f"Without arguments: the default model ({DEFAULT_MODEL}) at sparsities 0, 0.5, 0.9, forms "
        f"{', '.join(DEFAULT_FORMS)}, runtimes {', '.join(DEFAULT_RUNTIMES)}. Each configuration is exported, then "
        "timed in a fresh process (warm-up, then iterations until --min-time and --min-iters), so peak memory is "
        "its own.",
    )
    options.add_model(p, default=None, sizes=True, artifacts=(
        "exported artifact directories, or ONNX files (run as they are by onnxruntime, compared with onnxruntime "
        "on the CPU with graph optimisations off), to benchmark instead of --model"))
    options.add_plan(p, sweep=True)
    options.add_grid(p)
    g = p.add_argument_group("baseline", "what each variant is measured against, in the same interleaved rounds: "
                             "its rows carry the speedup (baseline p50 / its p50, median over rounds with a 95%% "
                             "interval), size and quality change")
    g.add_argument("--baseline", metavar="DIR",
                   help="with DIRs: the unpruned artifact of the same model (default: the DIR given without pruning "
                   "or quantization, form dense, if any); with --model the unpruned model exported as it is is "
                   "always the baseline")
    g.add_argument("--no-baseline", action="store_true", help="measure no baseline (no speedup, size or quality "
                   "change columns)")
    g = p.add_argument_group("fleet", "run the same configurations on the machines of a Ray cluster (deploykit[fleet]; "
                             "`deploykit worker start` joins a machine)")
    g.add_argument("--cluster", metavar="ADDRESS", help="the cluster's head (host:port, as `ray start` printed it)")
    g.add_argument("--profiles", type=options.csv_of(what="profile"), metavar="A,B,...",
                   help="the hardware profiles to run on (each needs a machine that advertises it)")
    options.add_connect_timeout(g)
    g.add_argument("--fresh-ray-workers", action="store_true",
                   help="a fresh Ray worker process for every configuration (it imports torch again each time; "
                   "the measuring is in a fresh process of its own either way)")
    g = p.add_argument_group("output")
    g.add_argument("--keep", metavar="DIR", help="with --model: export the variants into DIR (new or empty), one "
                   "directory each, and keep them (so that `deploykit report`'s pick can copy the chosen one)")
    options.add_json(g, "the records")
    options.add_store(g, timeout=True)
    options.add_quiet(g)
    options.add_trust(p, code=True)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("worker", help="join this machine to a benchmarking fleet (a Ray cluster), or list the fleet",
                       description="A fleet is a Ray cluster whose machines advertise their deploykit hardware "
                       "profile; `deploykit bench` runs on them with its fleet options. Needs deploykit[fleet].")
    worker_sub = p.add_subparsers(dest="worker_command", metavar="ACTION", parser_class=_Parser, required=True)
    q = worker_sub.add_parser("start", help="`ray start` for this machine, advertising its profile (and GPUs)")
    q.add_argument("--address", metavar="HEAD", help="the head to join (host:port); without it, start the head here")
    q.add_argument("--profile", metavar="NAME", help="the profile to advertise (default: the known profile this "
                   "machine matches, as `deploykit profile detect` says)")
    q.add_argument("--num-cpus", type=int, metavar="N", help="cores to offer (default: Ray's count)")
    q.set_defaults(func=cmd_worker_start)
    q = worker_sub.add_parser("list", help="the fleet's machines: profile, cores, memory, GPUs and software")
    q.add_argument("--address", metavar="HEAD", required=True, help="the cluster's head (host:port)")
    options.add_connect_timeout(q)
    options.add_json(q, "the machines")
    options.add_quiet(q)
    q.set_defaults(func=cmd_worker_list)

    p = sub.add_parser(
        "audit", help="pre-release size audit of an artifact (or a model) against budgets",
        description="Per-layer storage (shape, nonzeros, sparsity, encoding, bytes read from the weights file), "
        "totals, and a verdict against a budget file (TOML, one table per model: max_disk_mb, max_weights_mb, "
        "max_onnx_mb, max_parameters, max_growth with baseline). Exit 0 within budget, 1 over budget, "
        "2 on bad input. Audit an artifact directory or ONNX file as it is, or a --model exported (pruned "
        "and converted as for export) into a scratch directory first.",
    )
    options.add_model(p, default=None, sizes=False, artifacts=(
        "an artifact directory, or an ONNX file (its initializers; external data counts as weights)"))
    options.add_plan(p, sweep=False)
    g = p.add_argument_group("conversion", "for --model: the form it is exported to")
    options.add_form(g, sweep=False)
    g = p.add_argument_group("output")
    g.add_argument("--budget", metavar="FILE.toml", help="budget file; without it the audit only reports")
    options.add_json(g, "the audit (usable as a later baseline)")
    options.add_layers(g, "on without --budget or -q, off with either")
    options.add_quiet(g)
    options.add_trust(p, code=False)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "report", help="render benchmark runs kept in the results store",
        description="Render a run from the results store (`deploykit bench` keeps every run there) as a terminal "
        "table, Markdown, CSV, JSON or HTML, list the runs, or compare two runs (two machines: select each by "
        "profile) side by side with ratios.",
    )
    options.add_store(p, timeout=False)
    p.add_argument("--run", default="last", metavar="RUN",
                   help="run to render: its id, 'last' (default) or 'profile:NAME' (that profile's last run)")
    p.add_argument("--compare", metavar="RUN", action="append", default=[],
                   help="another run to compare with --run, configuration by configuration: its id or profile:NAME "
                   "(repeatable: a column per machine, with ratios; table, markdown or html)")
    p.add_argument("--list", action="store_true", help="list the runs in the store (table, markdown or json)")
    p.add_argument("--format", choices=REPORT_FORMATS, default="table",
                   help="output format (default table); html is one self-contained page with plots (quality vs "
                   "sparsity, size and latency; latency vs sparsity, batch and length; two runs side by side)")
    p.add_argument("--out", metavar="FILE", help="write the report to FILE instead of stdout (with --pick: the "
                   "directory to copy the chosen artifact to, verified)")
    options.add_json(p, "the run (as --format json), the run list with --list, or the pick with --pick")
    options.add_quiet(p)
    g = p.add_argument_group("pick", "which variant to ship: per profile, runtime, batch and threads, the fastest "
                             "(or smallest) variant that meets every constraint; exit 1 when none does (a release gate)")
    g.add_argument("--pick", action="store_true", help="print the chosen variant per configuration and why the others lost")
    g.add_argument("--max-quality-drop", metavar="X", help="most quality lost against the baseline: metric units "
                   "(0.01) or a share of the baseline's value (2%%)")
    g.add_argument("--max-size-mb", type=float, metavar="MB", help="largest files the runtime loads (10^6 bytes)")
    g.add_argument("--min-speedup", type=float, metavar="X",
                   help="least speedup over the baseline, held by the whole 95%% interval")
    g.add_argument("--objective", choices=("latency", "size"), default="latency",
                   help="what the pick minimises among the variants allowed (default latency; size: bytes, then latency)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE",
                   help="put the runs of another results store (SQLite, from another machine) or of a JSON file "
                   "(bench writes one beside the store when it cannot write the store itself) into the store; a run "
                   "already there is not added twice, and an imported one says where it came from (repeatable)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "trust", help="consent to run an artifact's bundled code (its exact SHA-256), list or revoke consents",
        description="An artifact exported from file.py:factory bundles that code; rebuilding its PyTorch model (bench's "
        "torch rows) runs it, which deploykit does only with bench's trust option or a consent recorded here, for the exact "
        "code (the SHA-256 of its files: changed code needs consent again). Consents are kept in "
        "$DEPLOYKIT_CONFIG/trusted-code.json, else ~/.config/deploykit/trusted-code.json.")
    p.add_argument("artifact", nargs="?", metavar="DIR", help="the artifact whose code to trust (verified first)")
    p.add_argument("--list", action="store_true", help="list the trusted code")
    p.add_argument("--revoke", metavar="DIR|SHA256", help="withdraw the consent to an artifact's code, or to a "
                   "digest --list shows (8 or more hex digits)")
    options.add_json(p, "the trusted code (with --list)")
    options.add_quiet(p)
    p.set_defaults(func=cmd_trust)

    p = sub.add_parser("profile", help="hardware profiles: list, show one, or detect this machine",
                       description="Hardware profiles describe a target machine (CPU, memory, GPU, published peak "
                       "figures, preferred torch device and onnxruntime providers, thread policy). Built-in profiles "
                       "ship inside deploykit (deploykit/runtime/hardware); `detect --save` adds this machine's to the "
                       "user's profile folder ($DEPLOYKIT_PROFILES, else ~/.config/deploykit/profiles).")
    profile_sub = p.add_subparsers(dest="profile_command", metavar="ACTION", parser_class=_Parser, required=True)
    q = profile_sub.add_parser("list", help="the known profiles")
    options.add_json(q, "the profiles")
    options.add_quiet(q)
    q.set_defaults(func=cmd_profile_list)
    q = profile_sub.add_parser("show", help="one profile, as TOML (or JSON)")
    q.add_argument("name", metavar="NAME", help="profile name (see `deploykit profile list`)")
    options.add_json(q, "the profile")
    options.add_quiet(q)
    q.set_defaults(func=cmd_profile_show)
    q = profile_sub.add_parser("detect", help="describe this machine and name the known profile it matches",
                               description="Describe this machine from py-cpuinfo, psutil, torch and onnxruntime, "
                               "and say which known profile it matches (none: a new one is printed).")
    q.add_argument("--save", nargs="?", const="", metavar="PATH",
                   help="write the detected profile as TOML to PATH (default: the user's profile folder)")
    options.add_json(q, "the detected profile and its match")
    options.add_quiet(q)
    q.set_defaults(func=cmd_profile_detect)
    _add_debug(parser)
    return parser


#: the end of every command's --help
EXIT_CODES = ("exit codes: 0 done; 1 a check failed (parity, budget, pick, a failed configuration) or an internal "
              "error (--debug shows its traceback); 2 bad input (one line, nothing written); 130/143/129 interrupted "
              "(what was measured is kept). Docs: docs/commands.md")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """`--debug` on every command: the traceback of an internal fault, which is otherwise one line; and the
    exit codes at the end of every command's help."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an internal error, print its traceback too")
    parser.epilog = EXIT_CODES
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug(sub)


def cmd_models(args) -> int:
    import json

    from deploykit.model.catalog import list_models

    _check_json(args)
    specs = list_models()

    cached = {s.name: s.cached_training() for s in specs}

    def training(s) -> str:
        if s.train is None:
            return ""
        seconds = (cached[s.name] or {}).get("train_seconds")
        return ("trains on first use" if cached[s.name] is None else
                f"trained here in {_duration(seconds)}, cached" if seconds is not None else "trained, cached")

    def table() -> None:
        from tabulate import tabulate

        print(tabulate([[s.name, s.extra or "", training(s), s.description] for s in specs],
                       headers=["model", "extra", "training", "description"], tablefmt="simple",
                       maxcolwidths=[None, None, None, 80]))
        if args.quiet:
            return
        print("\nextra: install it with pip install 'deploykit[EXTRA]'. A model that trains on first use trains once "
              "(its description says about how long) and is cached ($DEPLOYKIT_CACHE, else ~/.cache/deploykit).")

    _emit(args, json.dumps([{"name": s.name, "description": s.description, "pipeline": s.pipeline, "extra": s.extra,
                             "trains": s.train is not None, "trained_here_seconds":
                             (cached[s.name] or {}).get("train_seconds"),
                             "inputs": [i.name for i in s.inputs], "outputs": list(s.outputs)} for s in specs],
                           indent=2), table)
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def cmd_export(args) -> int:
    from deploykit.export.build import export_artifact
    from deploykit.model.sources import resolve_model

    plans = _plans([args.prune] if args.prune else [], _plan_options(args))
    if len(plans) != 1:
        raise UsageError(f"export writes one artifact: give one sparsity, not {len(plans)} ({args.prune}); "
                         "`deploykit bench --prune` sweeps several")
    (plan,) = plans
    _check_json(args)
    progress = _progress(args)
    threads, threads_note = _threads_for_this_process(args.threads)
    spec = _with_checked_values(resolve_model(args.model, _model_options(args)), args)
    export_options = dict(opset=args.opset, tolerance=args.tolerance, best_effort=args.best_effort,
                          compression=args.compress, kernel_batch=args.kernel_batch, quantize=args.quantize,
                          per_channel=args.per_channel, quantize_operators=args.quantize_operators, strict=args.strict)
    alignment = _alignment(args, spec, plan, threads, export_options, progress)
    if alignment is not None:
        plan = dataclasses.replace(plan, round_to=alignment.choice)
    result = export_artifact(spec, plan, args.form, args.out, overwrite=args.overwrite,
                             save_optimized=args.save_optimized, progress=progress,
                             alignment=alignment.to_recipe() if alignment else None, **export_options)
    measured = list(alignment.records) if alignment else []
    if args.form in MEASURED_FORMS and not plan.is_empty() and not args.no_measure and not measured:
        from deploykit.bench.against import measure_against_unpruned

        try:
            measured = measure_against_unpruned(spec, result.directory, threads, args.kernel_batch, progress=progress)
        except DeployKitError as exc:  # the artifact is written and checked; only the extra figure is missing
            progress(f"warning: could not measure {args.form} against the unpruned model: {exc}")
    _emit(args, result.manifest.to_json(), lambda: _print_export(result, plan, threads, threads_note, measured,
                                                                 layers=args.layers, quiet=args.quiet))
    return 0


#: forms whose export is timed against the unpruned model (the others run the unpruned model's kernels)
MEASURED_FORMS = ("dense-shrunk", "csr", "bsr")


def _alignment(args, spec, plan, threads: int, export_options: dict, progress):
    """--round-to auto (export's default for a structured plan in dense-shrunk): the measured choice,
    or None where there is nothing to choose (said so when the user asked for auto)."""
    from deploykit.bench.alignment import aligns, choose_round_to

    asked = args.round_to == "auto"
    if not asked and (args.round_to is not None or plan.round_to != 1):  # a multiple given (option or plan file)
        return None
    why = aligns(plan, args.form)
    if why is None and args.no_measure:
        why = "--no-measure: nothing is timed, so the plan's own alignment is kept"
    if why is not None:
        if asked:
            progress(f"note: --round-to auto: {why}; nothing to align")
        return None
    if args.quantize:  # the candidates would be timed as float while the artifact ships int8
        if asked:
            raise UsageError("--round-to auto measures float graphs; with --quantize give --round-to N")
        return None
    try:
        return choose_round_to(spec, plan, threads, args.kernel_batch, progress=progress, **export_options)
    except MeasurementError as exc:  # the plan as asked still exports; only the choice is missing
        progress(f"warning: --round-to auto could not measure the alignments ({exc}): kept the plan's own")
        return None


def _print_export(result, plan, threads: int, threads_note: str, measured=(), layers: bool = False,
                  quiet: bool = False) -> None:
    """export's human output: what was pruned and converted, the checks, the files, and what it
    measured against the unpruned model. `layers` adds the per-tensor table; `quiet` keeps the result
    lines (what was made, its parameters, quality, parity and measured speed) and the warnings."""
    from deploykit.results.report import MB, sparsity_report

    m = result.manifest
    print(f"{m.model}: {plan.described()}, form {m.form} -> {result.directory}"
          + ("" if quiet else f"; excluded: {', '.join(m.excluded_modules) or 'none'}"))
    if layers:
        print("\n" + sparsity_report(result.table))
    if quiet:
        _print_export_results(m, plan)
        for warning in m.warnings:
            print(f"warning: {warning}")
        _print_measured(measured, m, plan)
        return
    _print_unpruned(m, plan, result.table)
    if m.shape_changes:
        print(f"\n{m.form}: modules changed")
        width = max(len(name) for name in m.shape_changes)
        for name, (before, after) in m.shape_changes.items():
            print(f"  {name + ':':<{width + 1}} {before} -> {after}")
    print()
    _print_export_results(m, plan)
    if m.sparse_flops is not None and m.sparse_flops != m.flops_before_conversion:
        print(f"FLOPs per item left when zero weights are skipped: {m.sparse_flops:,} "
              f"({100 * m.sparse_flops / m.flops_before_conversion:.2f}% of {m.flops_before_conversion:,}; a sparse "
              f"kernel could skip the other {m.flops_before_conversion - m.sparse_flops:,}, dense kernels do them all)")
    if m.flops is None:
        print("FLOPs: not counted (the model is not one forward pass)")
    elif m.flops != m.flops_before_conversion:
        print(f"FLOPs per item {m.flops_before_conversion:,} -> {m.flops:,} "
              f"(FLOPs {m.flops_before_conversion / m.flops:.2f}x fewer: a count, not a time; torch's flop counter, "
              "multiply-add = 2)")
    else:
        print(f"FLOPs per item {m.flops:,} (dense count, torch's flop counter; zeros are still multiplied)")
    if m.training.get("recipe"):
        recipe = m.training["recipe"]
        print(f"trained: {recipe['steps']} steps of {recipe['batch']} on {recipe['data']}")
    for name, decision in m.form_recipe.get("kernels", {}).items():
        kernels = [key.removesuffix("_rounds_ms") for key in decision if key.endswith("_rounds_ms")]
        timed = ("; " + ", ".join(f"{k} {decision[f'{k}_ms']:.4f} ms" for k in kernels) + " (medians of "
                 f"{len(decision['dense_rounds_ms'])} interleaved rounds)" if "dense_rounds_ms" in decision else "")
        block = f", {decision['block']}x{decision['block']} blocks" if decision.get("choice") == "bsr" else ""
        print(f"kernel {name}: {decision['choice']}{block}{' (NOISY decision)' if decision.get('noisy') else ''} (sparsity "
              f"{100 * decision['sparsity']:.2f}%{timed}; {decision.get('reason', '')}; batch "
              f"{m.form_recipe['kernel_batch']}, {m.form_recipe.get('threads')} threads)")
    _print_alignment(m.form_recipe.get("round_to"))
    if m.onnx_sparse_initializers:
        print(f"sparse ONNX initializers: {', '.join(m.onnx_sparse_initializers)}")
    for name, size in m.files.items():
        print(f"{result.directory / name}: {size / MB:.3f} MB ({size:,} bytes)")
    for note in m.notes:
        print(f"note: {note}")
    for warning in m.warnings:
        print(f"warning: {warning}")
    _print_measured(measured, m, plan)
    print(f"threads: {threads}" + (f" ({threads_note})" if threads_note else ""))


def _print_export_results(m, plan) -> None:
    """The result lines of an export: parameters, the model's quality, ONNX parity, and a quantized model's
    error against the float one."""
    print(f"parameters {m.parameters_before_conversion:,} -> {m.parameters:,} (nonzero {m.nonzero_parameters:,})")
    before = m.training.get("result", {})
    pruned = not plan.is_empty()
    agreement = {k: v for k, v in m.metrics.items() if k.startswith("agreement_")}
    for name, value in m.metrics.items():
        if name in agreement:
            continue
        trained = f" (trained model before pruning: {before[name]:.4f})" if name in before and pruned else ""
        print(f"{name} of the {'pruned ' if pruned else ''}model: {value:.4f}{trained}")
    _print_pruning(m.pruning, agreement)
    relative = max(m.onnx_parity_max_rel_error.values(), default=None)
    print(f"parity: onnxruntime vs PyTorch max abs error {m.onnx_parity_error:.2e} (tolerance {m.parity_tolerance:g}"
          + (f"; relative to the output {relative:.2e}" if relative is not None else "") + ")"
          + (", before quantization" if m.quantization else ""))
    for runtime, error in m.quantization.get("error", {}).items():
        delta = "".join(f", {k} {m.quantization['metrics'][runtime][k]:.4f} ({v:+.4f})"
                        for k, v in m.quantization.get("metric_delta", {}).get(runtime, {}).items())
        agreement = m.quantization.get("greedy_token_agreement", {}).get(runtime)
        forced = m.quantization.get("next_token_agreement", {}).get(runtime)
        agreement = "" if agreement is None else f", greedy tokens {100 * agreement:.1f}% the float model's" + (
            "" if forced is None else f" ({100 * forced:.1f}% token by token after its prefix)")
        print(f"{m.quantization['scheme']} under {runtime}: max abs error {error['max_abs']:.2e}, mean "
              f"{error['mean_abs']:.2e} vs the float model{agreement}{delta}")


def _agreement_text(agreement: dict) -> str:
    return ", ".join(([f"cosine {agreement['agreement_cosine']:.4f}"] if "agreement_cosine" in agreement else [])
                     + ([f"argmax agreement {100 * agreement['agreement_argmax']:.1f}%"]
                        if "agreement_argmax" in agreement else []))


def _print_pruning(pruning: dict, agreement: dict) -> None:
    """How pruning went (the manifest's pruning record): its time, calibration, the outputs' agreement with
    the unpruned model, recovery and reconstruction."""
    calibration = pruning.get("calibration")
    if not calibration:  # the time of a pruner that only reads weights is in the manifest, not worth a line
        return
    print(f"pruning took {pruning['seconds']:.1f} s, on {calibration['items']} calibration items from "
          f"{calibration['source']}")
    if agreement:
        before = pruning.get("agreement_before_recovery")
        print(f"outputs against the unpruned model on {pruning.get('agreement_on', 'held-out items')}: "
              f"{_agreement_text(agreement)}" + (f" (before recovery: {_agreement_text(before)})" if before else ""))
    recovery = pruning.get("recovery")
    if recovery:
        print(f"recovery: {recovery['steps']} distillation steps in {recovery['seconds']:.1f} s, loss "
              f"{recovery['loss_before']:.4g} -> {recovery['loss_after']:.4g}")
    refits = pruning.get("reconstruction")
    if refits is not None:
        done = [r for r in refits.values() if r.get("reconstructed")]
        left = {name: r for name, r in refits.items() if not r.get("reconstructed")}
        before, after = (sum(r[key] for r in done) / max(len(done), 1) for key in ("error_before", "error_after"))
        print(f"reconstruction: {len(done)} of {len(refits)} layers reading removed channels re-fitted"
              + (f", output error relative to its variance {before:.3g} -> {after:.3g} (mean over them)" if done else "")
              + ("; not re-fitted: " + ", ".join(f"{name} ({r.get('why', '?')})" for name, r in list(left.items())[:3])
                 if left else ""))


def _print_alignment(alignment: dict | None) -> None:
    """--round-to auto's candidates, their measured speedups and the choice (from the manifest)."""
    from deploykit.results.pick import ratio_text

    if not alignment:
        return
    print(f"round-to auto: kept {alignment['choice']}{' (NOISY decision)' if alignment['noisy'] else ''}: "
          f"{alignment['reason']}")
    for n, runtimes in alignment["candidates"].items():
        same = [m for m, first in alignment["same_as"].items() if str(first) == n]
        print(f"  round-to {n}" + (f" (= {', '.join(same)})" if same else "") + ": " + ", ".join(
            f"{key} {ratio_text(v['speedup'], *v['ci95'])}" for key, v in runtimes.items())
            + " the unpruned model's speed")


def _print_measured(records, m, plan) -> None:
    """The variant's measured speed against the unpruned model, per runtime, and a warning where slower."""
    from deploykit.results.report import speedup_cell

    timed = [r for r in records if r.speedup is not None]
    if not timed:
        return
    first = timed[0]
    print(f"measured against the unpruned model on this machine (batch {first.batch_size}, {first.threads} threads, "
          f"{len(first.versus.round_ratios)} interleaved rounds; '~' noisy): "
          + ", ".join(f"{r.runtime}{'' if r.stage == 'forward' else ' ' + r.stage} {speedup_cell(r)}" for r in timed))
    for r in timed:
        if r.speedup < 1:
            tried = m.form_recipe.get("round_to")
            hint = (" It removed nothing (the warning above): the two are the same model, and the difference is noise."
                    if m.form == "dense-shrunk" and not m.shape_changes else
                    " Channel counts that are not multiples of 8 often fall off the fast kernels: try "
                    "--round-to auto (or 8, 16)." if m.form == "dense-shrunk" and plan.round_to == 1 and not tried
                    else " No alignment --round-to auto tried was faster." if tried else "")
            print(f"warning: {m.form} runs SLOWER than the unpruned model under {r.runtime}"
                  f"{'' if r.stage == 'forward' else ' (' + r.stage + ')'}: {r.speedup:.2f}x its speed, "
                  f"{r.measurement.median_ms:.4f} ms against {r.versus.p50_ms:.4f} ms p50.{hint}")


def _print_unpruned(m, plan, table) -> None:
    """The sparsity asked for beside the sparsity reached, and the weights left dense, grouped by why."""
    if not m.unpruned_weights:
        return
    print(f"\nasked {plan.label()}: pruned weights {100 * table.pruned_overall:.2f}% zero, the whole model "
          f"{100 * table.overall:.2f}%; weights left dense:")
    numel = {row["name"]: row["numel"] for row in m.sparsity}
    by_reason: dict[str, list[str]] = {}
    for name, reason in m.unpruned_weights.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        print(f"  {sum(numel.get(n, 0) for n in names):,} parameters in {len(names)} weight"
              f"{'s' * (len(names) > 1)} ({shown}): {reason}")


def cmd_bench(args) -> int:
    from deploykit.bench.runner import (
        FailureSink,
        artifact_subject,
        bench_model,
        bench_subjects,
        choose_baselines,
        onnx_file_subject,
    )
    from deploykit.bench.settings import TimingSettings
    from deploykit.model.onnxfile import PIPELINE as ONNX_FILE_PIPELINE
    from deploykit.model.sources import resolve_model
    from deploykit.results.report import bench_table, failures_text, records_json
    from deploykit.results.store import now_utc

    if args.artifacts and (args.model or args.prune or args.form or args.plan or args.rule):
        raise UsageError("give either exported DIRs / ONNX files or --model/--prune/--plan/--rule/--form, not both")
    _check_json(args)
    model_options = _model_options(args)
    onnx_files = [path for path in args.artifacts if path.endswith(".onnx")]
    if args.artifacts and (model_options.weights or model_options.trust_pickle):
        raise UsageError("--weights applies to --model; artifacts and ONNX files carry their weights")
    if args.artifacts and model_options.task:
        raise UsageError("--task applies to a --model Hugging Face directory; an artifact's task was fixed when it "
                         "was exported")
    if (model_options.inputs or model_options.values) and len(onnx_files) != len(args.artifacts):
        raise UsageError(f"--input-{'spec' if model_options.inputs else 'value'} applies to --model and ONNX files; "
                         "an artifact's inputs were fixed when it was exported (its manifest records their values)")
    timing = TimingSettings(warmup_s=args.warmup, min_time_s=args.min_time, min_iters=args.min_iters,
                            max_iters=max(100_000, args.min_iters), rounds=args.timing_rounds,
                            processes=args.processes, max_time_s=args.max_time)
    progress = _progress(args)
    if args.cluster or args.profiles or args.fresh_ray_workers:
        return _bench_fleet(args, model_options, timing, progress)
    # the workers run at each count; this process's own work at the smallest
    threads, threads_note = _threads_for_this_process(min(args.threads) if args.threads else None)
    threads = tuple(args.threads) if args.threads else (threads,)
    grid = _grid(args, threads)
    placement = grid.placement()
    if not placement.targets:
        raise UsageError("nothing to run: " + "; ".join(placement.notes))
    if args.store and args.no_store:
        raise UsageError("--store and --no-store contradict each other")
    store = None if args.no_store else _store(args)
    consent = _trust_warnings(args, progress)  # before any code an artifact names can run
    # every other input is checked before anything else is said, so that bad input stays one line
    if args.keep and args.artifacts:
        raise UsageError("--keep applies to --model: DIRs are kept already")
    if args.baseline and (args.no_baseline or not args.artifacts):
        raise UsageError("--baseline DIR applies to a bench of DIRs and contradicts --no-baseline" if args.artifacts
                         else "--baseline DIR applies to a bench of DIRs: with --model, the unpruned model is the "
                         "baseline (--no-baseline to leave it out)")
    if args.artifacts:  # measured together: their configurations interleave
        paths = [*args.artifacts, *([args.baseline] if args.baseline and args.baseline not in args.artifacts else [])]
        subjects = [onnx_file_subject(path, model_options.inputs, model_options.values) if path.endswith(".onnx")
                    else artifact_subject(path, consent, verify=not args.no_verify) for path in paths]
        explicit = subjects[paths.index(args.baseline)] if args.baseline else None
        if explicit is not None and explicit.pipeline == ONNX_FILE_PIPELINE:
            raise UsageError(f"--baseline {args.baseline}: an ONNX file is not a baseline; give the artifact "
                             "directory of the unpruned model")
        baselines = [] if args.no_baseline else choose_baselines(subjects, explicit)
    else:
        plans = _plans(args.prune or ([] if args.plan else [DEFAULT_BENCH_PRUNE]), _plan_options(args))
        spec = _with_checked_values(resolve_model(args.model or DEFAULT_MODEL, model_options), args)
    if store is not None and (busy := store.check_writable()):
        progress(f"note: {busy}")
    for note in [*placement.notes, *([threads_note] if threads_note else [])]:
        progress(f"note: {note}")
    records: list = []
    failures = FailureSink()
    started = now_utc()
    try:
        if args.artifacts:
            bench_subjects(subjects, grid, timing, progress, sink=records, failures=failures, baselines=baselines)
        else:
            bench_model(spec, plans, tuple(args.form or DEFAULT_FORMS), grid, timing, progress, sink=records,
                        failures=failures, baseline=not args.no_baseline, keep=args.keep)
    except BaseException as exc:
        # keep what was measured; the run says it is partial
        if store is not None and (records or failures.failures):
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            _keep_run(store, records, failures.failures, started, status, timing, grid, progress)
        raise
    run_id = None
    if store is not None and (records or failures.failures):
        run_id = _keep_run(store, records, failures.failures, started, "failed" if failures.failures else "complete",
                           timing, grid, progress)

    def table() -> None:
        if records:
            print(bench_table(records, quiet=args.quiet))
        for note in placement.notes if not args.quiet else ():
            print(f"note: {note}")

    _emit(args, records_json(records, run_id, failures.failures), table)
    if failures.failures:
        print(failures_text(failures.failures), file=sys.stderr)
        return 1
    return 0


def _grid(args: argparse.Namespace, threads: tuple[int, ...]) -> Grid:
    """bench's runtime-side axes from its options (each list swept), at `threads`."""
    return Grid(runtimes=tuple(args.runtime or DEFAULT_RUNTIMES), batches=tuple(args.batch or (1,)),
                threads=threads, devices=tuple(args.device or ("auto",)), lengths=tuple(args.seq_len or (None,)),
                graph_optimizations=tuple(args.graph_opt or (DEFAULT_GRAPH_OPTIMIZATION,)),
                precisions=tuple(args.precision or (DEFAULT_PRECISION,)))


def _bench_fleet(args, model_options, timing, progress) -> int:
    """`bench --cluster`: the configurations of a local bench on every named profile's machines; a
    run per profile in the store (the driver writes them), failures kept as rows."""
    import uuid

    from deploykit.fleet.cluster import connect
    from deploykit.fleet.fanout import check_profiles, run_fleet
    from deploykit.model.sources import resolve_model
    from deploykit.results.report import bench_table, failures_text, records_json
    from deploykit.results.store import now_utc

    if args.fresh_ray_workers and not args.cluster:
        raise UsageError("--fresh-ray-workers applies to --cluster")
    if args.keep or args.baseline or args.no_baseline:
        raise UsageError("--keep, --baseline and --no-baseline apply to a local bench: a fleet run measures each "
                         "configuration on its machine alone (no baseline in the same rounds yet)")
    if not (args.cluster and args.profiles):
        raise UsageError("--cluster and --profiles go together: the cluster to run on and the profiles to run")
    if args.artifacts:
        raise UsageError("--cluster benchmarks --model/--prune/--form configurations, exported here once; give "
                         "those instead of artifact directories")
    if args.store and args.no_store:
        raise UsageError("--store and --no-store contradict each other")
    # the machines' own threads: explicit, never this machine's idle cores
    grid = _grid(args, tuple(args.threads or (1,)))
    store = None if args.no_store else _store(args)
    _trust_warnings(args, progress)
    plans = _plans(args.prune or ([] if args.plan else [DEFAULT_BENCH_PRUNE]), _plan_options(args))
    spec = _with_checked_values(resolve_model(args.model or DEFAULT_MODEL, model_options), args)
    ray = connect(args.cluster, args.connect_timeout)
    check_profiles(ray, args.profiles)  # before anything is exported
    if store is not None and (busy := store.check_writable()):
        progress(f"note: {busy}")
    started, fleet_run = now_utc(), str(uuid.uuid4())

    def keep(profile, tally, status) -> None:
        if store is not None and (tally.records or tally.failures):
            _keep_run(store, tally.records, tally.failures, started, status, timing, grid, progress, profile=profile,
                      extra={"fleet": {"cluster": args.cluster, "run": fleet_run, "profiles": list(args.profiles)}})

    tallies = run_fleet(ray, args.profiles, spec, plans, tuple(args.form or DEFAULT_FORMS), grid, timing, progress,
                        keep, max_calls=1 if args.fresh_ray_workers else 0)
    records = [r for t in tallies.values() for r in t.records]
    failures = [f for t in tallies.values() for f in t.failures]
    _emit(args, records_json(records, failures=failures), lambda: print(bench_table(records)) if records else None)
    if failures:
        print(failures_text(failures), file=sys.stderr)
        return 1
    return 0


def cmd_worker_start(args) -> int:
    from deploykit.fleet.cluster import start_worker
    from deploykit.runtime.profiles import current_profile, known_profiles

    if args.profile is not None and args.profile not in known_profiles():
        raise UsageError(f"unknown profile {args.profile!r}; known: {', '.join(sorted(known_profiles()))} "
                         "(`deploykit profile detect --save` adds this machine's)")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UsageError("--num-cpus must be >= 1")
    profile = args.profile or current_profile().name
    print(f"deploykit: this machine joins as profile {profile}", file=sys.stderr)
    return start_worker(args.address, profile, args.num_cpus)


def cmd_worker_list(args) -> int:
    import dataclasses
    import json

    from deploykit.fleet.cluster import connect, machines, version_warnings

    _check_json(args)
    found = machines(connect(args.address, args.connect_timeout))

    def table() -> None:
        from tabulate import tabulate

        print(tabulate([[", ".join(m.profiles) or "-", m.address, f"{m.cores:g}", f"{m.memory_bytes / 2**30:.1f}",
                         f"{m.gpus:g}", *(m.versions.get(n, "?") for n in ("deploykit", "torch", "onnxruntime"))]
                        for m in found],
                       headers=["profile", "address", "cores", "memory GiB", "GPUs", "deploykit", "torch",
                                "onnxruntime"]))

    _emit(args, json.dumps([dataclasses.asdict(m) for m in found], indent=2) + "\n", table)
    for line in version_warnings(found):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _threads_for_this_process(threads: int | None) -> tuple[int, str]:
    """Set (and return) the torch threads of this process: `threads`, or the cores idle now; and a note
    saying why when other work took cores ("" otherwise). The caller says it once its input is checked,
    so that bad input still ends in one line."""
    from deploykit.core.contention import check_threads, idle_cores, sample_load, use_threads

    note = ""
    if threads is not None:
        check_threads(threads)
    else:
        load = sample_load()
        threads = idle_cores(load)
        if load.disturbed:
            note = f"{load.describe()}: using {threads} thread{'s' * (threads > 1)}, the cores left idle"
    use_threads(threads)
    return threads, note


def _store(args):
    from deploykit.results.store import ResultStore, default_store_path

    if not (args.store_timeout >= 0 and args.store_timeout < float("inf")):
        raise UsageError(f"--store-timeout must be a finite number of seconds >= 0, got {args.store_timeout}")
    return ResultStore(args.store or default_store_path(), busy_timeout_s=args.store_timeout)


def _keep_run(store, records, failures, started, status, timing, grid, progress, profile=None,
              extra=None) -> int | None:
    """Write the run into the store; if the store cannot take it, into a JSON file beside it. `profile`
    names the machine it ran on (default: its first record's, else this machine's); `extra` adds to its
    conditions. Returns the run's id in the store (None: spilled)."""
    import dataclasses

    from deploykit.core.errors import StoreError
    from deploykit.results.store import NewRun, git_revision, now_utc
    from deploykit.runtime.profiles import current_profile

    first = records[0] if records else None
    conditions = {"versions": first.versions if first else {}, "machine": first.machine if first else {},
                  "timing": dataclasses.asdict(timing), "grid": dataclasses.asdict(grid), **(extra or {})}
    run = NewRun(records, started, status, " ".join(["deploykit", *sys.argv[1:]]),
                 profile or (first.profile if first else current_profile().name), conditions, failures,
                 git_revision=git_revision(), finished_utc=now_utc())
    try:
        run_id = store.save(run)
    except (StoreError, DeployKitError) as exc:
        path = store.spill(run)
        progress(f"{exc}; the run ({len(records)} records, {len(failures)} failures) is in {path}: "
                 f"`deploykit report --import {path}` puts it into a store")
        return None
    progress(f"kept as run {run_id} ({status}) in {store.path}")
    return run_id


def cmd_audit(args) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from deploykit.core.fsutil import scratch_directory
    from deploykit.model.artifact import MANIFEST_FILE
    from deploykit.model.sources import resolve_model
    from deploykit.results.audit import audit_artifact, audit_onnx_file, check_budget, load_budgets
    from deploykit.results.report import audit_table

    if len(args.artifacts) + bool(args.model) != 1:
        raise UsageError("audit takes one artifact directory or ONNX file, or one --model")
    _check_json(args)
    budgets = load_budgets(args.budget) if args.budget else {}
    model_options = _model_options(args)
    if args.artifacts:
        target = Path(args.artifacts[0])
        if model_options != type(model_options)() or args.prune or args.plan or args.rule:
            raise UsageError("--prune, --plan, --rule, --weights, --input-spec and --task apply to --model, not to an "
                             "artifact or ONNX file, which is audited as it is")
        if target.suffix == ".onnx":
            report = audit_onnx_file(target)
        elif (target / MANIFEST_FILE).is_file():
            report = audit_artifact(target, verify=not args.no_verify)
        else:
            raise UsageError(f"{str(target)!r} is neither an artifact directory (no {MANIFEST_FILE}) nor an ONNX "
                             f"file; audit a model with --model {str(target)}")
    else:
        from deploykit.export.build import export_artifact

        plans = _plans([args.prune] if args.prune else [], _plan_options(args))
        if len(plans) != 1:
            raise UsageError(f"audit exports one artifact: give one sparsity, not {len(plans)} ({args.prune})")
        (plan,) = plans
        spec = _with_checked_values(resolve_model(args.model, model_options), args)
        with scratch_directory("audit") as tmp:
            directory = Path(tmp) / "artifact"
            export_artifact(spec, plan, args.form, directory, progress=_progress(args))
            report = dataclasses.replace(audit_artifact(directory),
                                         artifact=f"{args.model} exported as {args.form}, {plan.label()}")
    if args.budget:
        if report.model not in budgets:
            raise UsageError(f"no budget for model {report.model!r} in {args.budget}; "
                             f"budgeted: {', '.join(budgets) or 'none'}")
        report = check_budget(report, budgets[report.model])
    _trust_warnings(args, _progress(args))  # after the input is checked: bad input stays one line
    layers = args.layers if args.layers is not None else not (args.budget or args.quiet)
    _emit(args, json.dumps(report.to_dict(), indent=2), lambda: print(audit_table(report, layers=layers)))
    return 0 if report.within_budget else 1


def _run_label(run) -> str:
    return f"run {run.id} ({run.profile})"


def cmd_report(args) -> int:
    import json

    from deploykit.core.fsutil import write_text_atomic
    from deploykit.results.report import bench_csv, bench_table, compare_table, failures_text, records_json
    from deploykit.results.store import (
        ResultStore,
        default_store_path,
        is_store_file,
        read_spilled_runs,
        read_store_runs,
    )

    if not args.pick and (args.max_quality_drop is not None or args.max_size_mb is not None
                          or args.min_speedup is not None or args.objective != "latency"):
        raise UsageError("--max-quality-drop, --max-size-mb, --min-speedup and --objective apply to --pick")
    if args.pick and (args.list or args.compare or args.imports or args.format != "table"):
        raise UsageError("--pick prints its choice as text (or JSON with --json): leave out --list, --compare, "
                         "--import and --format")
    if args.json is not None and (args.compare or args.imports):
        raise UsageError("--json writes one run, the run list or the pick: leave out --compare and --import")
    if args.json == "-" and args.format not in ("table", "json"):
        raise UsageError(f"--json prints JSON instead of the {args.format}: leave out --format, or write the JSON to "
                         "a file with --json=PATH")
    _check_json(args)
    if args.pick:
        return _pick(args)
    if args.out:
        _check_output(args.out, "--out")
    store = ResultStore(args.store or default_store_path())
    if args.imports:
        # every file read and checked before any is written: a bad one leaves the store as it was
        batches = [(path, read_store_runs(path, store.path) if is_store_file(path) else read_spilled_runs(path))
                   for path in args.imports]
        for path, runs in batches:
            for run, (run_id, added) in zip(runs, store.save_many(runs)):
                print(f"{path}: run {run.uid} " + (f"imported into {store.path} as run {run_id}" if added
                                                   else f"is already in {store.path} as run {run_id}"))
        return 0
    if args.list:
        if args.format in ("csv", "html"):
            raise UsageError(f"--list renders as table, markdown or json, not {args.format}")
        runs = store.runs()
        json_text = json.dumps([{k: v for k, v in run.__dict__.items() if k not in ("records", "failures")}
                                for run in runs], indent=2) + "\n"
        if args.format == "json":
            text = json_text
        else:
            from tabulate import tabulate

            text = tabulate([[r.id, r.started_utc, r.status, r.profile, r.git_revision or "", r.command] for r in runs],
                            headers=["run", "started (UTC)", "status", "profile", "revision", "command"],
                            tablefmt="github" if args.format == "markdown" else "simple") + "\n"
    else:
        run = store.run(args.run)
        json_text = records_json(run.records, run.id, run.failures)
        if args.format == "html":
            from deploykit.results.htmlreport import html_report

            text = html_report(run, [store.run(selector) for selector in args.compare])
        elif args.compare:
            if args.format in ("csv", "json"):
                raise UsageError("--compare renders as table, markdown or html")
            others = [store.run(selector) for selector in args.compare]
            text = compare_table(run.records, [(_run_label(o), o.records) for o in others], _run_label(run),
                                 "github" if args.format == "markdown" else "simple") + "\n"
        elif args.format == "json":
            text = json_text
        elif args.format == "csv":
            text = bench_csv(run.records)
        else:
            header = (f"run {run.id} ({run.status}) on {run.profile}, {run.started_utc}, "
                      f"deploykit {run.git_revision or 'not from a git checkout'}: {run.command}")
            fmt = "github" if args.format == "markdown" else "simple"
            text = (("# " if fmt == "github" else "") + header + "\n\n" + bench_table(run.records, fmt) + "\n"
                    + (f"\n{failures_text(run.failures)}\n" if run.failures else ""))

    def show() -> None:
        if args.out:
            replaced = write_text_atomic(args.out, text)
            _progress(args)(f"wrote {args.out}" + (f" (replacing a file of {replaced:,} bytes)"
                                                    if replaced is not None else ""))
        else:
            print(text, end="")

    if args.json is not None:
        _emit(args, json_text, show)
    else:
        show()
    return 0


def _pick(args) -> int:
    """`report --pick`: the variant to ship per configuration of a run; exit 1 where none qualifies."""
    from pathlib import Path

    from deploykit.model.artifact import copy_artifact
    from deploykit.results.pick import Constraints, choices_json, choices_text, pick
    from deploykit.results.store import ResultStore, default_store_path

    drop, relative = (None, False) if args.max_quality_drop is None else Constraints.parse_quality_drop(
        args.max_quality_drop)
    constraints = Constraints(drop, relative, args.max_size_mb, args.min_speedup, args.objective)
    run = ResultStore(args.store or default_store_path()).run(args.run)
    if not run.records:
        raise UsageError(f"run {run.id} measured nothing to pick from")
    choices = pick(run.records, constraints)
    chosen = {c.chosen.artifact for c in choices if c.chosen}
    if args.out:
        if len(chosen) != 1:
            raise UsageError(f"--out copies one artifact, and run {run.id}'s configurations chose {len(chosen)} "
                             "different ones: narrow the run (one runtime, batch and thread count) or copy by hand")
        (source,) = chosen
        if not Path(source).is_dir():
            raise UsageError(f"the chosen variant was measured from {source}, which is gone (bench --model exports to "
                             "a temporary directory unless --keep DIR): bench with --keep DIR, or export the chosen plan")
        _check_output(args.out, "--out")
    text = choices_text(choices, constraints)
    if args.json is not None:
        _emit(args, choices_json(choices, constraints, run.id), lambda: print(text))
    else:
        print(text)
    if any(c.chosen is None for c in choices):
        return 1
    if args.out:
        copy_artifact(source, args.out)
        _progress(args)(f"copied {source} to {args.out} (verified)")
    return 0


def cmd_trust(args) -> int:
    import json

    from deploykit.model.trust import read_trusted, revoke, trust_artifact, trust_file

    if sum(map(bool, (args.artifact, args.list, args.revoke))) != 1:
        raise UsageError("trust takes one of: DIR (trust its code), --list, --revoke DIR|SHA256")
    if args.json is not None and not args.list:
        raise UsageError("--json applies to --list")
    if args.list:
        _check_json(args)
        entries = read_trusted()

        def table() -> None:
            from tabulate import tabulate

            print(tabulate([[e.sha256[:16], e.model, e.entry_point, e.artifact, e.trusted_utc] for e in entries],
                           headers=["sha256", "model", "entry point", "artifact (when trusted)", "trusted (UTC)"])
                  if entries else f"no trusted code in {trust_file()}")

        _emit(args, json.dumps([dataclasses.asdict(e) for e in entries], indent=2), table)
        return 0
    if args.revoke:
        for entry in revoke(args.revoke):
            print(f"revoked: {entry.model} ({entry.entry_point}, sha256 {entry.sha256[:16]}...)")
        return 0
    entry, new = trust_artifact(args.artifact)
    print(f"{'trusted' if new else 'already trusted'}: {entry.model} ({entry.entry_point}, sha256 "
          f"{entry.sha256[:16]}...) in {trust_file()}; its PyTorch model now runs without --trust-code until the code "
          f"changes (`deploykit trust --revoke {args.artifact}` to withdraw)")
    return 0


def cmd_profile_list(args) -> int:
    import json

    from deploykit.runtime.profiles import known_profiles

    _check_json(args)
    profiles = known_profiles()

    def table() -> None:
        width = max(len(name) for name in profiles)
        for profile in profiles.values():
            print(f"{profile.name:<{width}}  {profile.description}")

    _emit(args, json.dumps([p.to_dict() for p in profiles.values()], indent=2), table)
    return 0


def cmd_profile_show(args) -> int:
    import json

    from deploykit.runtime.profiles import get_profile, to_toml

    _check_json(args)
    profile = get_profile(args.name)
    _emit(args, json.dumps(profile.to_dict(), indent=2), lambda: print(to_toml(profile), end=""))
    return 0


def cmd_profile_detect(args) -> int:
    import json
    from pathlib import Path

    from deploykit.core.fsutil import check_outputs_apart, write_text_atomic
    from deploykit.runtime.profiles import detect_profile, match_profile, profile_paths, to_toml, user_profile_dir

    _check_json(args)
    if args.save:
        _check_output(args.save, "--save")
    machine = detect_profile()
    own = user_profile_dir() / f"{machine.name}.toml"
    path = None if args.save is None else Path(args.save) if args.save else own
    # detection reads every known profile to match against; --save may renew this machine's own file only
    check_outputs_apart([("--save", path), ("--json", args.json)],
                        [("the profile", other, False) for other in profile_paths()
                         if path is None or other.absolute() != own.absolute()])
    known = match_profile(machine)
    if path is not None:
        if not args.save:  # the user's profile folder is deploykit's to create; a named path's folder is not
            path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, to_toml(machine))
        _progress(args)(f"wrote {path}")

    def human() -> None:
        print(to_toml(machine), end="")
        print(f"\n# matches known profile: {known.name}" if known else "\n# matches no known profile")

    _emit(args, json.dumps({"detected": machine.to_dict(), "matches": known.name if known else None}, indent=2), human)
    return 0


def _expand_prune(text: str, parse) -> list[dict]:
    """"magnitude:0,0.5,0.9" -> the fields of magnitude:0, magnitude:0.5 and magnitude:0.9 ("snip:c1,c2" alike)."""
    method, _, amounts = text.partition(":")
    return [parse(f"{method}:{amount}") for amount in amounts.split(",")] if amounts else [parse(text)]


#: OSErrors that mean the user named a path that cannot be read as given: bad input, not a fault
_INPUT_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.ENAMETOOLONG, errno.ELOOP}


def json_path_rule(argv: Sequence[str]) -> list[str]:
    """`--json` takes a PATH as `--json=PATH`, or as the next word only where that ends in `.json` (or is `-`):
    `bench --json DIR` prints JSON and benches DIR instead of writing JSON over it (docs/commands.md)."""
    words = list(argv)
    for i, word in enumerate(words[:-1]):
        if word == "--json" and not (words[i + 1].endswith(".json") or words[i + 1] == "-"):
            words[i] = "--json=-"
    return words


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(json_path_rule(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with stop_signals_interrupt():  # SIGTERM and SIGHUP keep what was measured, as Ctrl-C does
            _check_outputs_apart(args)
            return args.func(args)
    except DeployKitError as exc:
        print(f"deploykit: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        exc = as_terminated(exc)
        print(f"deploykit: {exc if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except OSError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        if exc.errno in _INPUT_ERRNOS:
            print(f"deploykit: error: {exc.strerror}: {exc.filename!r}", file=sys.stderr)
            return 2
        print(f"deploykit: error: {exc.strerror or exc}" + (f": {exc.filename!r}" if exc.filename else ""),
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a fault of deploykit's, in one line
        if getattr(args, "debug", False):
            traceback.print_exc()
        missing = missing_extra(exc)
        if missing is not None:  # an optional package not installed: the user's to install, not a bug
            print(f"deploykit: error: {missing}", file=sys.stderr)
            return missing.exit_code
        print(f"deploykit: internal error: {type(exc).__name__}: {_one_line(exc)} (a bug in deploykit; rerun with "
              "--debug for the traceback)", file=sys.stderr)
        return 1


#: an error line is cut here (a message quoting hostile input stays one screen); long enough for the
#: unknown-model error, which names every registered model
ERROR_LINE_CHARS = 1000


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:ERROR_LINE_CHARS] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
