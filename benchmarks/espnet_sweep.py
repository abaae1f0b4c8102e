"""Sensitivity sweep of an ESPnet ST model: each module group pruned alone at 0.33/0.5/0.7/0.9.

For every group of `MODULE_GROUPS` (encoder subsampling, conv module, feed-forward, self-attention;
decoder embedding, self-attention, cross-attention, feed-forward) and sparsity, the model is pruned
(L1 unstructured, that group only), exported as csr, and measured: nonzero parameters, weights and
ONNX sizes, onnxruntime greedy decoding latency on 5 s of features, and quality. Quality is BLEU
when `--features` (an .npy of shape (utterances, frames, 80)) and `--references` (one tokenised
reference per line, tokens from the model's vocabulary) are given, or when the model is trained on a
task of its own (`espnet-st-small-trained`: BLEU of the pruned model on its held-out utterances, as
its export records it, and latency on one of its own 5 s utterances); otherwise the share of greedy
tokens that match the unpruned model's, a proxy that needs no data.

Run: bash .ci/env python benchmarks/espnet_sweep.py [--model espnet-st-small-trained] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from deploykit.core.fsutil import write_text_atomic
from deploykit.core.measure import measure
from deploykit.core.quality import bleu
from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.model.espnet import token_list
from deploykit.model.zoo.espnet_st import MODULE_GROUPS
from deploykit.pipelines.st_decode import OnnxSpeechTranslator
from deploykit.prune.base import PruningPlan

SPARSITIES = (0.33, 0.5, 0.7, 0.9)


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="espnet-st")
    parser.add_argument("--tokens", type=int, help="most tokens decoded (default 20; 64 for a trained model, "
                        "whose 5 s utterances end on their own)")
    parser.add_argument("--features", help=".npy of shape (utterances, frames, 80)")
    parser.add_argument("--references", help="text file, one space-separated reference per utterance")
    parser.add_argument("--json", default="benchmarks/results/espnet_sweep.json")
    args = parser.parse_args()
    if bool(args.features) != bool(args.references):
        parser.error("--features and --references go together")
    spec = get_model(args.model)
    if args.features:
        utterances = np.load(args.features)
    elif spec.length_sampler is not None:  # a trained model: utterances of its own task
        utterances = [spec.example_inputs(1, seed=i, length=500)[0][0].numpy() for i in range(3)]
    else:
        utterances = torch.randn(3, 500, 80, generator=torch.Generator().manual_seed(0)).numpy()
    references = Path(args.references).read_text().splitlines() if args.references else None
    scored = references is not None or spec.evaluate is not None
    args.tokens = args.tokens or (64 if spec.length_sampler is not None else 20)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(label: str, plan: PruningPlan) -> dict:
            directory = Path(tmp) / label
            manifest = export_artifact(spec, plan, "csr", directory).manifest
            translator = OnnxSpeechTranslator(directory)
            outputs = [translator.decode(u[None], args.tokens) for u in utterances]
            latency = measure(lambda: translator.decode(utterances[0][None], args.tokens),
                              warmup_s=0.1, min_time_s=0.5, min_iters=3).median_ms
            vocab = token_list(translator.config["vocab_size"])
            return {"nonzero": manifest.nonzero_parameters, "weights_bytes": manifest.files["weights.safetensors"],
                    "onnx_bytes": manifest.files["encoder.onnx"] + manifest.files["decoder.onnx"],
                    "decode_ms": latency, "tokens": outputs,
                    "bleu": dataclasses.asdict(bleu([" ".join(vocab[t] for t in o if t != translator.config["eos"])
                                                     for o in outputs], references)) if references
                    else {"score": manifest.metrics["bleu"], "signature": "the model's evaluator (sacrebleu defaults)"}
                    if "bleu" in manifest.metrics else None}

        print("dense", file=sys.stderr)
        dense = run("dense", PruningPlan())
        for group, pattern in MODULE_GROUPS.items():
            for sparsity in SPARSITIES:
                print(f"{group} {sparsity:g}", file=sys.stderr)
                result = run(f"{group}-{sparsity}", PruningPlan("magnitude", 0.0, scope="layer",
                                                                rules=((pattern, sparsity),)))
                result.update(group=group, sparsity=sparsity, token_agreement=float(np.mean(
                    [agreement(a, b) for a, b in zip(result["tokens"], dense["tokens"])])))
                rows.append(result)
                save(args.json, {"model": args.model, "dense": dense, "rows": rows, "complete": False})
    quality = "BLEU" if scored else "tokens as dense"
    print(tabulate(
        [[r["group"], f"{r['sparsity']:g}", f"{r['nonzero']:,}", f"{r['weights_bytes'] / 1e6:.2f}",
          f"{r['onnx_bytes'] / 1e6:.2f}", f"{r['decode_ms']:.1f}",
          f"{r['bleu']['score']:.1f}" if scored else f"{100 * r['token_agreement']:.0f}%"] for r in rows],
        headers=["group", "sparsity", "nonzero", "weights MB", "onnx MB", "ort decode ms", quality],
        disable_numparse=True))
    print(f"dense: {dense['nonzero']:,} nonzero, weights {dense['weights_bytes'] / 1e6:.2f} MB, "
          f"decode {dense['decode_ms']:.1f} ms" + (f", BLEU {dense['bleu']['score']:.1f} ({dense['bleu']['signature']})" if scored else ""))
    save(args.json, {"model": args.model, "dense": dense, "rows": rows, "complete": True})
    return 0


def save(path: str, results: dict) -> None:
    """Written after every row, so an hour's sweep that dies keeps what it measured."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
