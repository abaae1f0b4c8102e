"""Coverage of the models people bring: torchvision's classification zoo, tiny Hugging Face encoders
returned by entry points, and tiny Hugging Face model directories (`hf-dir-*`: BERT, DistilBERT, ViT,
T5, BART, Llama, saved with `save_pretrained` and read as a user's directory, exported through
optimum), random weights and small inputs, each through three exports, beside torch-pruning's own
outcome.

Configurations: l1-structured 0.3 + dense-shrunk; magnitude 0.9 per layer + csr; dynamic int8. Each
ends as "ok" (exported, parity checked), "refused: ..." (a DeployKitError: one line naming what and
why) or "CRASH: ..." (any other exception: a bug to fix). torch-pruning 1.6.1's column runs its
MagnitudePruner at 0.3 on the same model (classifier ignored) and a forward pass after it.

    python benchmarks/model_coverage.py                     # every model (long: about 80 torchvision builders)
    python benchmarks/model_coverage.py --only resnet18,vit_b_16,bert
    python benchmarks/model_coverage.py --limit 12          # the first 12 torchvision models and the HF ones
    python benchmarks/model_coverage.py --heldout           # the held-out shapes (below)
    python benchmarks/model_coverage.py --heldout --checkout ../old   # the same, through another checkout's CLI

`--heldout` runs the shapes of real pretrained models (`models/examples/heldout.py`: two output heads,
an output layer that is not the last module run, PReLU, an LSTM, a permute before a flatten, a
TorchScript module, GPT-2 / GPT-NeoX causal LMs, wav2vec2's weight norm, MNASNet's versioned state
dict; ONNX files with weights in Constant nodes or a scalar input; the zoo's espnet-st-small and
gpt2-tiny under a global structured plan) through the command line, each step judged: "ok" (and
what it should have done, checked), "WRONG-BUT-OK" (exit 0 with a wrong statement: the worst),
"refused: ..." (one line; whether it names a way forward is for the reader), "TRACEBACK" (an internal
error). `--checkout DIR` runs another checkout's CLI on the same steps (PYTHONPATH=DIR): the before
column of a change. Writes benchmarks/results/heldout.json.

Writes benchmarks/results/coverage.json (rows of models run again replace theirs; others stay). Each export is bounded by --timeout seconds
(`deploykit.core.deadline`): one past it is a refusal saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from deploykit.core.deadline import deadline
from deploykit.core.errors import DeployKitError
from deploykit.export.build import export_artifact
from deploykit.model.sources import resolve_model
from deploykit.model.spec import ModelSpec
from deploykit.prune.base import PruningPlan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "shrunk": (PruningPlan("l1-structured", 0.3), "dense-shrunk", None),
    "csr": (PruningPlan("magnitude", 0.9, scope="layer"), "csr", None),
    "int8": (PruningPlan(), "dense", "int8"),
}
#: torchvision models whose builders need their input size given (others run at 64x64)
SIZES = {"inception_v3": 299, "googlenet": 224}


def torchvision_builders() -> dict:
    import torchvision.models as tvm

    def builder(name: str):
        kwargs = {"weights": None, "num_classes": 10}
        if name.startswith("vit_"):
            kwargs["image_size"] = 32 if name.endswith("_16") or name.endswith("_32") else 28
        if name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        size = 32 if name.startswith("vit_") else SIZES.get(name, 64)
        return (lambda: tvm.get_model(name, **kwargs).eval()), (torch.randn(2, 3, size, size),)

    return {name: builder(name) for name in tvm.list_models(module=tvm)}


def huggingface_builders() -> dict:
    from transformers import (
        BartConfig,
        BartModel,
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
        T5Config,
        T5EncoderModel,
        ViTConfig,
        ViTModel,
    )

    ids = (torch.randint(0, 100, (2, 8)),)
    return {
        "bert": (lambda: BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64,
                                              max_position_embeddings=64)).eval(), ids),
        "distilbert": (lambda: DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                hidden_dim=64, max_position_embeddings=64)).eval(), ids),
        "bart_encoder": (lambda: BartModel(BartConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64)).get_encoder().eval(), ids),
        "t5_encoder": (lambda: T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_heads=4)).eval(), ids),
        "hf_vit": (lambda: ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64)).eval(),
                   (torch.randn(2, 3, 16, 16),)),
    }


def save_hf_directories(root: Path) -> dict[str, Path]:
    """Tiny Hugging Face model directories, as a user would have them (config.json + safetensors)."""
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    models = {
        "hf-dir-bert": lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **small)),
        "hf-dir-distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2,
                                                                          n_heads=4, hidden_dim=64)),
        "hf-dir-vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=5,
                                                                      **small)),
        "hf-dir-t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0)),
        "hf-dir-bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
        "hf-dir-llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2,
                                                                 max_position_embeddings=64, **small)),
    }
    paths = {}
    for name, build in models.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        paths[name] = root / name
    return paths


def spec_of(name: str) -> ModelSpec:
    """The model as a user brings it: an entry point (this file's factory of that name), so that every
    export step, int8's measurement on the rebuilt model included, takes the user's path."""
    return resolve_model(f"{Path(__file__).resolve()}:{name}")


def _factory(build, examples):
    return lambda: (build(), examples)


def builders(limit: int | None = None) -> dict:
    vision = torchvision_builders()
    if limit:
        vision = dict(list(vision.items())[:limit])
    return {**vision, **huggingface_builders()}


if __name__ != "__main__":  # imported as an entry point: one factory per model, by name
    torch.manual_seed(0)
    for _name, (_build, _examples) in builders().items():
        globals()[_name] = _factory(_build, _examples)


def torch_pruning_outcome(build, examples, timeout: float) -> str:
    """torch-pruning's own MagnitudePruner at 0.3 (the last Linear ignored), and a forward pass after."""
    import torch_pruning as tp

    model = build()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    try:
        with deadline(timeout, "torch-pruning"), torch.enable_grad():
            pruner = tp.pruner.MagnitudePruner(model, examples, importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=0.3, ignored_layers=last)
            pruner.step()
            with torch.no_grad():
                model(*examples)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the outcome is the point
        return f"fails: {type(exc).__name__}"


def run_config(spec: ModelSpec, config: str, directory: Path, timeout: float) -> dict:
    plan, form, quantize = CONFIGS[config]
    start = time.perf_counter()
    try:
        with deadline(timeout, "the export"):
            m = export_artifact(spec, plan, form, directory, quantize=quantize, overwrite=True).manifest
        outcome = "ok"
        figures = {"parameters": [m.parameters_before_conversion, m.parameters],
                   "flops": [m.flops_before_conversion, m.flops], "parity": m.onnx_parity_error}
    except DeployKitError as exc:
        outcome, figures = f"refused: {(str(exc).splitlines() or [''])[0][:90]}", {}
    except Exception as exc:  # noqa: BLE001 - a crash is what this benchmark is here to find
        outcome, figures = f"CRASH: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:70]}", {}
    return {"outcome": outcome, "seconds": round(time.perf_counter() - start, 1), **figures}


def _short(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _write(path: Path, rows: list[dict]) -> None:
    """Rows into `path`, replacing the rows of the same models a previous run wrote and keeping the rest
    (a run with --only does not erase a full run's table)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = []
    ran = {r["model"] for r in rows}
    kept = [r for r in previous if isinstance(r, dict) and r.get("model") not in ran]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + rows, indent=2) + "\n")


HELDOUT = ROOT / "models" / "examples" / "heldout.py"


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _excludes(*heads):
    def judge(out: Path, _stdout: str) -> str | None:
        missing = sorted(set(heads) - set(_manifest(out)["excluded_modules"]))
        return f"output layer{'s' * (len(missing) > 1)} {', '.join(missing)} pruned as hidden" if missing else None
    return judge


def _warns(words):
    def judge(out: Path, stdout: str) -> str | None:
        return None if any(words in w for w in _manifest(out).get("warnings", [])) else f"no warning that it {words}"
    return judge


def _shrank(out: Path, _stdout: str) -> str | None:
    return None if _manifest(out)["shape_changes"] else "nothing removed"


def _flops_at_least(floor):
    def judge(out: Path, _stdout: str) -> str | None:
        counted = _manifest(out)["flops_before_conversion"] or 0
        return None if counted >= floor else f"{counted:,} FLOPs counted for at least {floor:,}"
    return judge


def _parameters(truth):
    def judge(_out: Path, stdout: str) -> str | None:
        counted = json.loads(stdout)["parameters"]
        return None if counted == truth else f"{counted:,} parameters counted of {truth:,}"
    return judge


def heldout_steps(root: Path, truth: int) -> list[tuple[str, list[str], object]]:
    """(label, deploykit arguments, judge) per step; `judge(out_dir, stdout)` names what is wrong, or None."""
    def model(name: str) -> str:
        return f"{HELDOUT}:{name}"

    export = ["export", "--no-measure"]
    return [
        ("two heads: magnitude 0.9 csr", [*export, "--model", model("two_heads"), "--prune", "magnitude:0.9",
                                          "--scope", "layer", "--form", "csr"], _excludes("classifier", "regressor")),
        ("two heads: l1 0.3 dense-shrunk", [*export, "--model", model("two_heads"), "--prune", "l1-structured:0.3",
                                            "--form", "dense-shrunk"], _shrank),
        ("two heads: magnitude 0.5 dense-shrunk", [*export, "--model", model("two_heads"), "--prune",
                                                   "magnitude:0.5", "--form", "dense-shrunk"], _warns("removed nothing")),
        ("late head: magnitude 0.9 csr", [*export, "--model", model("late_head"), "--prune", "magnitude:0.9",
                                          "--form", "csr"], _excludes("head", "score")),
        ("PReLU CNN: l1 0.3 dense-shrunk", [*export, "--model", model("prelu_cnn"), "--prune", "l1-structured:0.3",
                                            "--form", "dense-shrunk"], _shrank),
        ("LSTM: FLOPs counted", [*export, "--model", model("lstm_encoder")], _flops_at_least(14_000_000)),
        ("LSTM: l1 0.3 dense-shrunk", [*export, "--model", model("lstm_encoder"), "--prune", "l1-structured:0.3",
                                       "--form", "dense-shrunk"], None),
        ("permute+flatten: l1 0.3 dense-shrunk", [*export, "--model", model("permute_flatten"), "--prune",
                                                  "l1-structured:0.3", "--form", "dense-shrunk", "--round-to", "1"], _shrank),
        ("TorchScript: dense", [*export, "--model", model("scripted")], None),
        ("TorchScript: magnitude 0.5", [*export, "--model", model("scripted"), "--prune", "magnitude:0.5"], None),
        ("GPT-2 entry point: magnitude 0.5 csr", [*export, "--model", model("gpt2_lm"), "--prune", "magnitude:0.5",
                                                 "--form", "csr"], None),
        ("GPT-NeoX entry point: l1 0.3 dense-shrunk", [*export, "--model", model("neox_lm"), "--prune",
                                                      "l1-structured:0.3", "--form", "dense-shrunk"], None),
        ("wav2vec2: magnitude 0.5 csr", [*export, "--model", model("wav2vec2"), "--prune", "magnitude:0.5",
                                        "--form", "csr"], None),
        ("MNASNet: magnitude 0.5, bench under torch", [*export, "--model", model("mnasnet"), "--prune",
                                                      "magnitude:0.5", "--form", "csr"], "bench-torch"),
        ("espnet-st-small: l1 0.5 global dense-shrunk", [*export, "--model", "espnet-st-small", "--prune",
                                                        "l1-structured:0.5", "--form", "dense-shrunk"], _shrank),
        ("gpt2-tiny: l1 0.5 global dense-shrunk", [*export, "--model", "gpt2-tiny", "--prune", "l1-structured:0.5",
                                                  "--form", "dense-shrunk"], _shrank),
        ("ONNX constants: audit", ["audit", str(root / "constants.onnx"), "--json"], _parameters(truth)),
        ("ONNX scalar input: bench", ["bench", str(root / "scalar.onnx"), "--input-value", "sr=16000", "--no-store",
                                      "--min-time", "0.02", "--timing-rounds", "1"], None),
        ("ONNX scalar input: bench without a value", ["bench", str(root / "scalar.onnx"), "--no-store"], None),
    ]


def run_heldout(checkout: Path, timeout: float, path: Path) -> int:
    import os
    import subprocess

    sys.path.insert(0, str(HELDOUT.parent))
    import heldout

    rows = []
    with tempfile.TemporaryDirectory(prefix="deploykit-heldout-") as tmp:
        root = Path(tmp)
        truth = heldout.write_constant_weights_onnx(root / "constants.onnx")
        heldout.write_scalar_input_onnx(root / "scalar.onnx")
        env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONWARNINGS": "ignore"}
        for i, (label, args, judge) in enumerate(heldout_steps(root, truth)):
            print(label, file=sys.stderr, flush=True)
            out = root / f"out-{i}"
            if args[0] == "export":
                args = [*args, "--out", str(out)]
            start = time.perf_counter()
            try:
                run = subprocess.run([sys.executable, "-m", "deploykit", *args], capture_output=True, text=True,
                                     env=env, timeout=timeout, cwd=tmp)
                if run.returncode == 0 and judge == "bench-torch":
                    run = subprocess.run([sys.executable, "-m", "deploykit", "bench", str(out), "--trust-code",
                                          "--runtime", "torch", "--no-store", "--min-time", "0.02", "--timing-rounds",
                                          "1"], capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp)
                    judge = None
                outcome = _outcome(run, judge, out)
            except subprocess.TimeoutExpired:
                outcome = f"refused: no answer in {timeout:g} s"
            rows.append({"step": label, "outcome": outcome, "seconds": round(time.perf_counter() - start, 1)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkout": str(checkout), "rows": rows}, indent=2) + "\n")
    print(tabulate([[r["step"], r["outcome"][:150]] for r in rows], headers=["step", "outcome"]))
    counts = {kind: sum(r["outcome"].startswith(kind) for r in rows) for kind in ("ok", "WRONG", "refused", "TRACEBACK")}
    print(f"\n{len(rows)} steps: {counts['ok']} ok, {counts['WRONG']} wrong-but-ok, {counts['refused']} refused, "
          f"{counts['TRACEBACK']} tracebacks")
    return 1 if counts["WRONG"] or counts["TRACEBACK"] else 0


def _outcome(run, judge, out: Path) -> str:
    error = next((line for line in run.stderr.splitlines() if line.startswith("deploykit: ")
                  and ("error" in line)), "")
    if "internal error" in error or "Traceback" in run.stderr:
        return f"TRACEBACK: {error.removeprefix('deploykit: ')[:200]}"
    if run.returncode != 0:
        return f"refused: {error.removeprefix('deploykit: error: ')[:300]}"
    wrong = judge(out, run.stdout) if judge is not None else None
    return f"WRONG-BUT-OK: {wrong}" if wrong else "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--limit", type=int, help="the first N torchvision models only (and the HF ones)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per export (default 300)")
    parser.add_argument("--json", help="where the results go (default benchmarks/results/coverage.json, or "
                        "heldout.json with --heldout)")
    parser.add_argument("--heldout", action="store_true", help="the held-out shapes of models/examples/heldout.py")
    parser.add_argument("--checkout", default=str(ROOT), help="with --heldout: the checkout whose CLI runs them")
    args = parser.parse_args()
    if args.heldout:
        return run_heldout(Path(args.checkout).resolve(), args.timeout,
                           Path(args.json or ROOT / "benchmarks/results/heldout.json"))
    args.json = args.json or str(ROOT / "benchmarks/results/coverage.json")
    torch.manual_seed(0)
    chosen = builders(args.limit)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploykit-coverage-") as tmp:
        directories = save_hf_directories(Path(tmp))
        chosen.update({name: None for name in directories if not args.only or name in args.only.split(",")})
        for name, built in chosen.items():
            print(name, file=sys.stderr, flush=True)
            try:
                if built is None:  # a directory: read as a user's, the model is deploykit's wrapper of it
                    spec = resolve_model(str(directories[name]))
                    built = (spec.make, spec.example_inputs(2))
                else:
                    spec = spec_of(name)
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": name, "error": f"cannot build: {type(exc).__name__}: {exc}"})
                continue
            row = {"model": name, "torch_pruning": torch_pruning_outcome(*built, args.timeout)}
            for config in CONFIGS:
                row[config] = run_config(spec, config, Path(tmp) / f"{name}-{config}", args.timeout)
            rows.append(row)
            _write(Path(args.json), rows)  # kept as it grows
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], r["error"], "", "", "", "", ""])
            continue
        shrunk = r["shrunk"]
        params = shrunk.get("parameters") or [None, None]
        flops = shrunk.get("flops") or [None, None]
        table.append([r["model"], r["torch_pruning"], shrunk["outcome"], f"{_short(params[0])} -> {_short(params[1])}",
                      f"{_short(flops[0])} -> {_short(flops[1])}", r["csr"]["outcome"], r["int8"]["outcome"]])
    print(tabulate(table, headers=["model", "torch-pruning 0.3", "l1 0.3 dense-shrunk", "parameters", "FLOPs/item",
                                   "magnitude 0.9 csr", "int8"]))
    outcomes = [r[c]["outcome"] for r in rows if "error" not in r for c in CONFIGS]
    crashes = sum(o.startswith("CRASH") for o in outcomes)
    handled = [r for r in rows if "error" not in r and r["torch_pruning"] == "ok"]
    shrunk_ok = sum(r["shrunk"]["outcome"] == "ok" for r in handled)
    print(f"\n{len(rows)} models, {len(outcomes)} exports: {sum(o == 'ok' for o in outcomes)} ok, "
          f"{sum(o.startswith('refused') for o in outcomes)} refused, {crashes} crashed; of the "
          f"{len(handled)} models torch-pruning prunes, {shrunk_ok} export dense-shrunk with parity")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
