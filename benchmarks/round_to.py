"""Does aligning shrunk widths to multiples of N (--round-to) buy onnxruntime speed per FLOP removed?

For resnet18 (the zoo's CIFAR variant) and a BERT encoder (4 layers, d 256, 4 heads, FFN 1024,
sequence 128; random weights, from its config), at l1-structured 0.2 and 0.5 per layer with
dense-shrunk and N = 1, 8, 16: export, then time every artifact of a model under onnxruntime in one
interleaved run (1 thread, batch 1), so that ratios are taken on the same machine state.

Reported per row: FLOPs kept (of the unpruned model's), speedup (unpruned median / this median), and
speedup per FLOP cut = speedup / (unpruned FLOPs / these FLOPs): 1.0 means time fell as FLOPs did.

    python benchmarks/round_to.py [--min-time 2]     # table; JSON in benchmarks/results/round_to.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from deploykit.bench.runner import artifact_subject, bench_subjects
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.export.build import export_artifact
from deploykit.model.sources import consent_of, resolve_model
from deploykit.prune.base import PruningPlan

ROOT = Path(__file__).resolve().parents[1]
SPARSITIES = (0.2, 0.5)
MULTIPLES = (1, 8, 16)


def bert_encoder():
    """A BERT encoder entry point: (model, example token ids of length 128)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=256)
    return BertModel(config).eval(), (torch.randint(0, 1000, (2, 128)),)


MODELS = {"resnet18": "resnet18", "bert-encoder": f"{Path(__file__).resolve()}:bert_encoder"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds timed per configuration")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/round_to.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    timing = TimingSettings(warmup_s=0.5, min_time_s=args.min_time, min_iters=20, rounds=5)
    grid = Grid(runtimes=("onnxruntime",), threads=(1,), devices=("cpu",))
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploykit-round-to-") as tmp:
        for label, model in MODELS.items():
            spec = resolve_model(model)
            plans = {"unpruned": PruningPlan()}
            plans |= {f"{s:g} N={n}": PruningPlan("l1-structured", s, scope="layer", round_to=n)
                      for s in SPARSITIES for n in MULTIPLES}
            subjects, flops = [], {}
            for name, plan in plans.items():
                print(f"{label}: exporting {name}", file=sys.stderr, flush=True)
                result = export_artifact(spec, plan, "dense-shrunk", Path(tmp) / f"{label}-{name}")
                flops[name] = result.manifest.flops
                subjects.append((name, artifact_subject(result.directory, consent_of(result.manifest.source))))
            records = bench_subjects([s for _, s in subjects], grid, timing,
                                     lambda m: print(m, file=sys.stderr, flush=True))
            latency = {name: next(r.measurement.percentile_ms(50) for r in records if Path(r.artifact) == s.location)
                       for name, s in subjects}
            for name in plans:
                speedup = latency["unpruned"] / latency[name]
                flops_ratio = flops["unpruned"] / flops[name]
                rows.append({"model": label, "plan": name, "flops": flops[name],
                             "flops_kept": flops[name] / flops["unpruned"], "p50_ms": latency[name],
                             "speedup": speedup, "speedup_per_flop_cut": speedup / flops_ratio})
    print(tabulate([[r["model"], r["plan"], f"{100 * r['flops_kept']:.1f}%", f"{r['p50_ms']:.3f}",
                     f"{r['speedup']:.2f}x", f"{r['speedup_per_flop_cut']:.2f}"] for r in rows],
                   headers=["model", "plan", "FLOPs kept", "ort p50 ms", "speedup", "speedup per FLOP cut"]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
