"""The command line's one grammar: each option is defined once here and means the same in every
subcommand that has it, with its default and choices read from the library.

- a model to build is always `--model MODEL` (with `--weights`, `--input-spec`, `--input-shape`, `--task`);
  artifacts and ONNX files to use as they are are always positional `DIR|FILE.onnx`;
- a pruning plan is always `--prune` plus the same plan options (`--plan`, `--rule`, `--scope`, ...);
- `--form` names forms from `deploykit.convert.forms.FORMS`;
- `--json [PATH]` prints JSON instead of the human output, or with PATH writes it there as well; PATH is
  `--json=PATH`, or the next word where it ends in `.json` (`cli.app.json_path_rule`), so a DIR after
  `--json` stays a DIR;
- `--out` is where the command's main output goes.

Everything here is cheap to import (no torch): `deploykit --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses

from deploykit.bench.settings import DEFAULT_RUNTIMES, TimingSettings
from deploykit.convert.forms import DEFAULT_FORM, DEFAULT_FORMS, DEFAULT_KERNEL_BATCH, FORMS
from deploykit.convert.onnx_settings import DEFAULT_OPSET, ONNX_TOLERANCE, SUPPORTED_OPSETS
from deploykit.convert.quantize import OPERATOR_CHOICES, QUANTIZERS
from deploykit.core.ort import DEFAULT_GRAPH_OPTIMIZATION, GRAPH_OPTIMIZATIONS
from deploykit.core.storage import CODECS
from deploykit.fleet.cluster import CONNECT_TIMEOUT_S
from deploykit.model.spec import DEFAULT_LENGTH, INPUT_DTYPES, TRACE_BATCH, VALUE_FORMS
from deploykit.prune.base import PRUNERS, PruningPlan
from deploykit.results.store import ATTEMPTS, BUSY_TIMEOUT_S
from deploykit.runtime.devices import DEVICE_CHOICES
from deploykit.runtime.precisions import DEFAULT_PRECISION, PRECISIONS
from deploykit.runtime.session import RUNTIMES

#: what `deploykit bench` sweeps without --prune
DEFAULT_BENCH_PRUNE = "magnitude:0,0.5,0.9"


def default_of(cls: type, name: str):
    """A dataclass field's default: the library's, so that help and behaviour cannot disagree."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def csv_of(kind: type = str, choices=None, what: str = "value"):
    """An argparse type for comma-separated lists, checked against `choices` (named `what` in the error,
    worded like a registry's own)."""
    def parse(text: str) -> list:
        try:
            items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
        known = list(choices) if choices is not None else None
        for item in items:
            if known is not None and item not in known:
                raise argparse.ArgumentTypeError(f"unknown {what} {item!r}; known: {', '.join(known)}")
        return items

    return parse


#: one parser object, so that --layer-types is the same option in every command (type included)
_LAYER_TYPES = csv_of()


def _round_to(text: str) -> int | str:
    """--round-to: a multiple, or "auto" (chosen by measurement at export)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def names(choices) -> str:
    return ", ".join(choices)


def add_model(p: argparse.ArgumentParser, *, default: str | None, artifacts: str | None, sizes: bool) -> None:
    """`--model` and what describes it; with `artifacts`, the positional DIR|FILE.onnx used as they are.
    `sizes`: the command has --batch and --seq-len for the input axes to follow."""
    if artifacts:
        p.add_argument("artifacts", nargs="*", metavar="DIR|FILE.onnx", help=artifacts)
    g = p.add_argument_group("model", "what to build; " + ("or give exported DIRs / ONNX files instead"
                                                          if artifacts else "one model"))
    g.add_argument("--model", default=default, metavar="MODEL",
                   help=f"registered model name ({'default ' + default + '; ' if default else ''}see `deploykit "
                   "models`), an entry point (package.module:factory or path/to/file.py:factory: a function returning "
                   "a ModelSpec, (model, example inputs) or a model with --input-spec), a local Hugging Face model "
                   "directory (config.json + weights, read offline), or an ESPnet ST experiment directory or zip")
    g.add_argument("--task", metavar="TASK",
                   help="the task a Hugging Face directory is loaded and exported for, as optimum names it (e.g. "
                   "feature-extraction, text-classification, image-classification, text-generation, "
                   "text2text-generation); default: the task of the class in its config's architectures")
    g.add_argument("--weights", metavar="FILE",
                   help="weights to load into a zoo or entry-point model: .safetensors, or a torch checkpoint loaded "
                   "with torch.load(weights_only=True) (a state dict, possibly under 'state_dict' or 'model')")
    g.add_argument("--trust-pickle", action="store_true",
                   help="let --weights be a full pickle (a pickled nn.Module or custom objects): loading it runs "
                   "code from the file; only for files you trust")
    axes = ("the axis 'batch' follows --batch, other named axes follow --seq-len" if sizes else
            f"named axes are traced at size {TRACE_BATCH} for 'batch', {DEFAULT_LENGTH} for the others, and stay "
            "dynamic in the ONNX graph")
    g.add_argument("--input-spec", action="append", default=[], metavar="NAME:SHAPE[:DTYPE[:HIGH]]",
                   help="describe one input of an entry-point model" + (" or ONNX file" if artifacts else "")
                   + f" (repeatable), e.g. x:batch,3,32,32 or tokens:batch,seq:int64:30000 (token ids below 30000); "
                   f"{axes}; dtypes: {names(INPUT_DTYPES)}")
    g.add_argument("--input-value", action="append", default=[], metavar="NAME=VALUE",
                   help="what input NAME holds instead of random data (repeatable; recorded with the run): "
                   + VALUE_FORMS)
    g.add_argument("--input-shape", metavar="SHAPE",
                   help="shorthand for a one-input model: its shape, e.g. batch,3,224,224 (float32)")


def add_plan(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    """`--prune` and the plan options. `sweep`: several sparsities (and repeated --prune) make several plans."""
    g = p.add_argument_group("pruning plan", "how to prune before converting (default: no pruning"
                             + (f"; bench: {DEFAULT_BENCH_PRUNE}" if sweep else "") + ")")
    amounts = "S[,S...]" if sweep else "SPARSITY"
    g.add_argument("--prune", action="append" if sweep else "store", metavar=f"METHOD:{amounts}",
                   help="pruning method and the fraction to zero (of weights; of output channels for the *-structured "
                   "methods and fpgm), e.g. magnitude:0.9 or l1-structured:0.5, or cC for compression C (keep 10^-C: "
                   "grasp:c2 keeps 1%%)" + ("; several sparsities and a repeated --prune make several plans" if sweep
                                           else "") + f" (methods: {names(PRUNERS.names())})")
    g.add_argument("--plan", metavar="FILE.toml",
                   help="pruning plan file: method, sparsity (or compression), scope, exclude, exclude_output, seed, "
                   "rounds, layer_types, at_init, pattern and [rules] and [pattern_rules] tables; command-line options override it")
    g.add_argument("--scope", choices=("global", "layer"), default=None,
                   help=f"prune the fraction over all layers together (global) or in each layer (default "
                   f"{default_of(PruningPlan, 'scope')})")
    g.add_argument("--rule", action="append", default=[], metavar="PATTERN=SPARSITY",
                   help="per-module sparsity by name pattern, e.g. 'encoder.*.feed_forward*=0.5'; the first matching "
                   "rule wins, other layers get the --prune sparsity (repeatable)")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="module name pattern never to prune, e.g. 'mlp.0' or 'encoder.*' (repeatable)")
    g.add_argument("--prune-output", action="store_true",
                   help="also prune the output layer (left dense by default, as in the pruning studies)")
    g.add_argument("--layer-types", type=_LAYER_TYPES, metavar="T[,T...]",
                   help="kinds of layer to prune: linear, conv, embedding, custom (default: every kind; snip, grasp "
                   "and synflow: linear,conv, as the AG News study pruned)")
    g.add_argument("--seed", type=int, default=None,
                   help=f"seed for random pruning (default {default_of(PruningPlan, 'seed')})")
    g.add_argument("--rounds", type=int, default=None,
                   help="imp: prune-rewind-retrain rounds, each removing the same share of what remains (default "
                   f"{default_of(PruningPlan, 'rounds')})")
    g.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                   help="structured methods: keep a multiple of N channels (or heads) in each group, pruning fewer "
                   "rather than more, so kernels see aligned widths; export's 'auto' (its default for dense-shrunk) "
                   "measures 1, 8, 16 and 32 against the unpruned model and keeps the fastest (default elsewhere "
                   f"{default_of(PruningPlan, 'round_to')})")
    g.add_argument("--graph-timeout", type=float, default=None, metavar="SECONDS",
                   help="structured methods and dense-shrunk: how long torch-pruning's dependency graph and group "
                   "search may take before the export stops, saying so (default "
                   f"{default_of(PruningPlan, 'graph_timeout_s'):g})")
    g.add_argument("--at-init", action="store_true",
                   help="prune the model's initial weights, then train it with the masks in force (its training "
                   "hook): the protocol snip, grasp and synflow were designed for")
    g.add_argument("--pattern", metavar="N:M|RxC",
                   help="magnitude, random, wanda, sparsegpt: N:M keeps at most N nonzero weights in every M consecutive "
                   "along each layer's input (2:4; the sparsity is then 1 - N/M); RxC (or block:RxC) removes blocks of R "
                   "outputs by C inputs whole (8x8, 1x4: what block-sparse CPU kernels and the bsr form reward); "
                   "unstructured without it")
    g.add_argument("--block", metavar="RxC",
                   help="the same as --pattern RxC")
    g.add_argument("--pattern-rule", action="append", default=[], metavar="PATTERN=N:M|RxC|none",
                   help="per-module pattern by name pattern, e.g. 'h.*.mlp.*=8x8' or 'fc1=none'; the first matching rule "
                   "wins, other layers get --pattern (repeatable)")
    g.add_argument("--calibration", metavar="FILE|FILE.py:FN|random",
                   help="calibration data for wanda, sparsegpt, act-structured and --recover: a .npz or .safetensors of "
                   "input tensors named like the model's inputs (items on the first axis), a function of a batch count "
                   "returning batches of input tensors, or 'random' (random inputs, said in the manifest); default: the "
                   "model's own (its spec's calibration hook, a zoo model's task)")
    g.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                   help=f"calibration items to prune on (default {default_of(PruningPlan, 'calibration_samples')}); "
                   "up to 32 more are held out to measure the outputs' agreement with the unpruned model")
    g.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="act-structured: re-fit the layers reading removed channels by least squares on the calibration "
                   "inputs (default on)")
    g.add_argument("--recover", type=int, default=None, metavar="STEPS",
                   help="distil the pruned model from the unpruned one for STEPS steps on the calibration data, masks "
                   "kept (default 0: none)")
    g.add_argument("--allow-layer-collapse", action="store_true",
                   help="let the plan prune a layer to 100%% (by default that stops with the layers named: "
                   "nothing passes through such a layer)")


def add_form(group, *, sweep: bool) -> None:
    forms = "; ".join(f"{name}: {FORMS.get(name).description}" for name in FORMS.names())
    if sweep:
        group.add_argument("--form", type=csv_of(choices=FORMS.names(), what="form"), action="extend", metavar="F[,F...]",
                           help=f"forms to sweep (default {','.join(DEFAULT_FORMS)}). {forms}")
    else:
        group.add_argument("--form", choices=FORMS.names(), default=DEFAULT_FORM, metavar="FORM",
                           help=f"deployable form (default {DEFAULT_FORM}). {forms}")


def add_json(p, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help=f"{what} as JSON: printed instead of the human output, or written to PATH (the human output "
                   "still printed). PATH as --json=PATH, or a next word ending in .json")


def add_connect_timeout(p) -> None:
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, metavar="SECONDS",
                   help="give up connecting to the cluster after this long, in one line (default "
                   f"{CONNECT_TIMEOUT_S:g}; where nothing listens at the address, at once)")


def add_quiet(p) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the result line(s) and warnings: no progress messages, notes or details")


def add_layers(p, default: str) -> None:
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=None,
                   help=f"the per-tensor table: shape, nonzeros, sparsity, storage, bytes (default {default})")


def add_trust(p: argparse.ArgumentParser, *, code: bool) -> None:
    """--no-verify, and --trust-code where the command may run an artifact's PyTorch model (`code`)."""
    g = p.add_argument_group("trust", "what deploykit may believe and run from the artifacts it reads")
    if code:
        g.add_argument("--trust-code", action="store_true",
                       help="let torch import the code an artifact's manifest names to rebuild its model (an entry "
                       "point): that runs code from the artifact; only for artifacts you trust. Without it, such "
                       "artifacts run under onnxruntime only (or give the same entry point with --model)")
    g.add_argument("--no-verify", action="store_true",
                   help="use artifacts without checking their files against the sizes and SHA-256 checksums in "
                   "their manifests (a damaged or edited file then goes unnoticed)")


def add_conversion(p: argparse.ArgumentParser) -> None:
    """export's conversion and ONNX options."""
    g = p.add_argument_group("conversion", "the deployable form and its weights")
    add_form(g, sweep=False)
    g.add_argument("--compress", choices=sorted(CODECS),
                   help="compress the weights file losslessly (each tensor only where that makes it smaller)")
    g.add_argument("--kernel-batch", type=int, default=DEFAULT_KERNEL_BATCH, metavar="N",
                   help="csr: batch size at which each pruned layer is timed dense and sparse to choose its "
                   f"kernel (default {DEFAULT_KERNEL_BATCH})")
    g.add_argument("--best-effort", action="store_true",
                   help="dense-shrunk: leave groups with unsupported layers dense (with a warning) instead of failing")
    schemes = "; ".join(f"{name}: {QUANTIZERS.get(name).description}" for name in QUANTIZERS.names())
    g.add_argument("--quantize", choices=QUANTIZERS.names(), metavar="SCHEME",
                   help=f"post-training quantization ({schemes}); each model's pipeline says which apply (static "
                   "quantization: one-graph models). The error against the float model and the task metric's "
                   "change are recorded, not checked against --tolerance")
    g.add_argument("--per-channel", action="store_true", help="--quantize: one scale per output channel")
    g.add_argument("--quantize-operators", choices=OPERATOR_CHOICES, default="measured",
                   help="--quantize int8, int8-weight, int4-weight: time each weight-bearing node alone on its real "
                   "input, int8 against float under onnxruntime (interleaved rounds): nodes slower here stay float, "
                   "and so do nodes that are no faster where they change the greedy tokens (measured, the default); "
                   "or quantize every one (all). The output layers the model names stay float either way")
    g = p.add_argument_group("ONNX", "the exported graph and the checks it must pass")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    g.add_argument("--tolerance", type=float, default=ONNX_TOLERANCE,
                   help=f"max abs error allowed between onnxruntime and PyTorch (default {ONNX_TOLERANCE:g})")
    g.add_argument("--strict", action="store_true",
                   help="fail (exit 1) where the export's checks prove little: an output that is zero or the same "
                   "for every parity input; and where --quantize made the model slower than float under onnxruntime "
                   "or worse beyond tolerance (otherwise warnings)")
    g.add_argument("--save-optimized", choices=GRAPH_OPTIMIZATIONS, metavar="LEVEL",
                   help="also save each ONNX graph as onnxruntime rewrites it at LEVEL, as <name>.<LEVEL>.onnx beside "
                   f"it ({names(GRAPH_OPTIMIZATIONS)}: disabled is the graph as onnxruntime loads it, unrewritten; "
                   "extended is portable; all adds this CPU's layouts)")


def add_grid(p: argparse.ArgumentParser) -> None:
    """bench's runtime-side axes and its timing, with the library's defaults."""
    g = p.add_argument_group("grid", "what each configuration runs on (each list is swept)")
    add_form(g, sweep=True)
    g.add_argument("--runtime", type=csv_of(choices=RUNTIMES.names(), what="runtime"), action="extend", metavar="R[,R...]",
                   help=f"runtimes: {names(RUNTIMES.names())} (default {','.join(DEFAULT_RUNTIMES)})")
    g.add_argument("--device", type=csv_of(choices=DEVICE_CHOICES, what="device"), action="extend", metavar="D[,D...]",
                   help=f"devices: {names(DEVICE_CHOICES)}. auto: the hardware profile's preferred torch device and "
                   "onnxruntime providers, the CPU where those are not installed; gpu: skipped with a note where "
                   "none is usable (default auto)")
    g.add_argument("--batch", type=csv_of(int), action="extend", metavar="N[,N...]", help="batch sizes (default 1)")
    g.add_argument("--graph-opt", type=csv_of(choices=GRAPH_OPTIMIZATIONS, what="graph optimisation"), action="extend", metavar="L[,L...]",
                   help=f"onnxruntime graph optimisation levels: {names(GRAPH_OPTIMIZATIONS)} (default "
                   f"{DEFAULT_GRAPH_OPTIMIZATION}, as onnxruntime's own default); recorded with each row")
    g.add_argument("--precision", type=csv_of(choices=PRECISIONS, what="precision"), action="extend", metavar="P[,P...]",
                   help=f"numeric precisions: {names(PRECISIONS)} (default {DEFAULT_PRECISION}). bf16: torch's autocast, "
                   "OpenVINO's inference precision; f16: those and onnxruntime's float16 graph. A precision this "
                   "machine does not compute natively on a runtime's device is skipped with a note, never emulated; "
                   "its rows carry the quality measured in it")
    g.add_argument("--seq-len", type=csv_of(int), action="extend", metavar="N[,N...]",
                   help="sequence lengths: each sets every named non-batch input axis (tokens, frames); default: "
                   "the model's own inputs")
    g.add_argument("--threads", type=csv_of(int), action="extend", metavar="N[,N...]",
                   help="threads per runtime; this process's own work (exports, references) runs at the smallest "
                   "(default: the cores other work leaves idle now, recorded with every row)")
    t = p.add_argument_group("timing", "how each configuration is timed")
    t.add_argument("--warmup", type=float, default=default_of(TimingSettings, "warmup_s"), metavar="SECONDS",
                   help=f"warm-up time per configuration (default {default_of(TimingSettings, 'warmup_s'):g})")
    t.add_argument("--min-time", type=float, default=default_of(TimingSettings, "min_time_s"), metavar="SECONDS",
                   help=f"minimum timed duration (default {default_of(TimingSettings, 'min_time_s'):g})")
    t.add_argument("--min-iters", type=int, default=default_of(TimingSettings, "min_iters"), metavar="N",
                   help=f"minimum timed calls (default {default_of(TimingSettings, 'min_iters')})")
    t.add_argument("--timing-rounds", type=int, default=default_of(TimingSettings, "rounds"), metavar="N",
                   help="split each configuration's timing into N rounds, interleaved with the other "
                   "configurations of the same shape (one measuring at a time, the order rotating), so a burst "
                   f"of other load cannot skew a ratio between them (default {default_of(TimingSettings, 'rounds')})")
    t.add_argument("--max-time", type=float, default=default_of(TimingSettings, "max_time_s"), metavar="SECONDS",
                   help="the most one configuration's worker may take in all (loading, warm-up, rounds); past it "
                   "the worker is stopped and the configuration is kept as a failed row saying so (default "
                   f"{default_of(TimingSettings, 'max_time_s'):g})")
    t.add_argument("--processes", type=int, default=default_of(TimingSettings, "processes"), metavar="N",
                   help="measure each configuration in N worker processes, splitting its timing budget and pooling "
                   "the samples: a process's memory placement moves its times by a few percent, and N of them "
                   f"average that out of a ratio (default {default_of(TimingSettings, 'processes')})")


def add_store(group, *, timeout: bool) -> None:
    group.add_argument("--store", metavar="FILE",
                       help="results store (SQLite; default $DEPLOYKIT_STORE, else "
                       "~/.local/share/deploykit/results.sqlite); see `deploykit report`")
    if timeout:
        group.add_argument("--no-store", action="store_true", help="do not keep this run in the results store")
        group.add_argument("--store-timeout", type=float, default=BUSY_TIMEOUT_S, metavar="SECONDS",
                           help="how long each of the store's write attempts waits for another process's lock "
                           "before the run goes to a JSON file beside the store instead (default "
                           f"{BUSY_TIMEOUT_S:g}; {ATTEMPTS} attempts)")
