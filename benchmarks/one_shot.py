"""Pruning without retraining: what the calibration-aware pruners keep of a trained model's quality, and
what each variant buys in speed against the unpruned model.

For each trained model: magnitude, wanda and sparsegpt at 0.5 and 0.7 unstructured and at 2:4 (form
dense: unstructured zeros buy no CPU time, and the speed column says so), in 8x8 and 1x4 blocks at 0.5
(form bsr), and l1-structured,
act-structured (least-squares reconstruction) and act-structured with `--recover 200` at 0.3 and 0.5
(form dense-shrunk). Each variant is exported as `deploykit export` does (`export_artifact`), its
quality read from its manifest (the spec's evaluator, and the outputs' agreement with the unpruned model
on held-out calibration items), its pruning time from the manifest, and its speed measured against the
unpruned model in interleaved rounds (`measure_against_unpruned`: torch and onnxruntime, batch 1,
1 thread). Goals (issue 36): at 0.5 unstructured, wanda and sparsegpt lose at most a third of what
magnitude loses; act-structured at 0.3 keeps accuracy/BLEU within 1 point where l1-structured does not.

Run: bash .ci/env python benchmarks/one_shot.py [--models a,b] [--only REGEX] [--json PATH]
Rows are written to the JSON file as they are measured (a stopped run keeps them). Trained zoo models
train on first use (`deploykit models` says how long).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from deploykit.bench.against import measure_against_unpruned
from deploykit.core.errors import DeployKitError
from deploykit.core.fsutil import write_text_atomic
from deploykit.export.build import export_artifact
from deploykit.model.sources import resolve_model
from deploykit.prune.base import PruningPlan
from deploykit.results.report import speedup_cell

ROOT = Path(__file__).resolve().parents[1]
#: model -> modules no variant prunes (ESPnet's conv subsampling feeds a Linear through time: its
#: channels cannot go alone)
MODELS = {
    "lenet-300-100": (),
    "lenet-5": (),
    "mlp-sst2-trained": (),
    "gpt2-mini-trained": (),
    "seq2seq-transformer-small-trained": (),
    "espnet-st-small-trained": ("encoder.embed.*",),
}
UNSTRUCTURED = [("magnitude", 0.5, ""), ("wanda", 0.5, ""), ("sparsegpt", 0.5, ""),
                ("magnitude", 0.7, ""), ("wanda", 0.7, ""), ("sparsegpt", 0.7, ""),
                ("wanda", 0.5, "2:4"), ("sparsegpt", 0.5, "2:4")]
#: block patterns (issue 37), in the form that runs them: quality beside the bsr speed
BLOCKS = [("magnitude", 0.5, "8x8"), ("wanda", 0.5, "8x8"), ("sparsegpt", 0.5, "8x8"), ("magnitude", 0.5, "1x4"),
          ("sparsegpt", 0.5, "1x4")]
STRUCTURED = [("l1-structured", 0.3, 0), ("act-structured", 0.3, 0), ("act-structured", 0.3, 200),
              ("l1-structured", 0.5, 0), ("act-structured", 0.5, 0), ("act-structured", 0.5, 200)]


def variants(exclude: tuple[str, ...]) -> list[tuple[PruningPlan, str]]:
    plans = [(PruningPlan(method=m, amount=a, pattern=p, scope="layer" if m == "magnitude" else "global",
                          exclude=exclude), "dense") for m, a, p in UNSTRUCTURED]
    plans += [(PruningPlan(method=m, amount=a, pattern=p, scope="layer" if m == "magnitude" else "global",
                           exclude=exclude), "bsr") for m, a, p in BLOCKS]
    plans += [(PruningPlan(method=m, amount=a, recover_steps=r, scope="layer", exclude=exclude), "dense-shrunk")
              for m, a, r in STRUCTURED]
    return plans


def measure(spec, plan: PruningPlan, form: str, scratch: Path) -> dict:
    started = time.perf_counter()
    result = export_artifact(spec, plan, form, scratch / "variant", overwrite=True)
    manifest = result.manifest
    row = {"model": spec.name, "variant": plan.label(), "form": form, "metrics": dict(manifest.metrics),
           "trained": dict(manifest.training.get("result", {})),
           "pruning_s": manifest.pruning.get("seconds"), "export_s": round(time.perf_counter() - started, 1),
           "parameters": manifest.parameters, "nonzero": manifest.nonzero_parameters}
    records = measure_against_unpruned(spec, result.directory, threads=1, batch=1)
    row["speedup"] = {r.runtime + ("" if r.stage == "forward" else f" {r.stage}"):
                      {"ratio": r.speedup, "ci95": list(r.versus.speedup_ci95()), "cell": speedup_cell(r)}
                      for r in records if r.speedup is not None}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/one_shot.json"))
    parser.add_argument("--only", metavar="REGEX", help="the variants whose label (e.g. 'wanda:0.5', "
                        "'act-structured:0.3,layer,recover 200') matches REGEX")
    args = parser.parse_args()
    rows: list[dict] = []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="one-shot-") as tmp:
        for name in args.models.split(","):
            spec = resolve_model(name)
            for plan, form in variants(MODELS.get(name, ())):
                if args.only and not re.search(args.only, plan.label()):
                    continue
                print(f"{name}: {plan.label()} {form}", file=sys.stderr, flush=True)
                try:
                    rows.append(measure(spec, plan, form, Path(tmp)))
                except DeployKitError as exc:
                    rows.append({"model": spec.name, "variant": plan.label(), "form": form, "error": str(exc)})
                write_text_atomic(out, json.dumps({"rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return 0


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r["variant"], r["form"], "", "", "", "", "error: " + r["error"][:80]])
            continue
        quality = ", ".join(f"{k} {v:.4g}" + (f" ({v - r['trained'][k]:+.3g})" if k in r["trained"] else "")
                            for k, v in r["metrics"].items())
        speed = ", ".join(f"{k} {v['cell']}" for k, v in r["speedup"].items())
        lines.append([r["model"], r["variant"], r["form"], f"{r['pruning_s']:.1f}" if r["pruning_s"] is not None else "",
                      f"{r['nonzero']:,}/{r['parameters']:,}", speed, quality, ""])
    return tabulate(lines, headers=["model", "variant", "form", "prune s", "nonzero/params", "speed vs unpruned",
                                    "quality (change vs trained)", ""])


if __name__ == "__main__":
    sys.exit(main())
