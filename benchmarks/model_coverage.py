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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--limit", type=int, help="the first N torchvision models only (and the HF ones)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per export (default 300)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/coverage.json"))
    args = parser.parse_args()
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
