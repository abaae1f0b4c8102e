"""What a structured compression buys against the unpruned model, per runtime, at --round-to 1 and auto.

For each model (zoo models, trained ones with their quality, and a user's entry-point CNN with
BatchNorm and a residual): export its plan dense-shrunk at --round-to 1, 8, 16 and 32 and time the
distinct ones with the unpruned model in interleaved rounds under torch and onnxruntime (1 thread;
`deploykit.bench.alignment.choose_round_to`, what `export --round-to auto` runs). Reported per
runtime: the FLOP ratio (unpruned / variant), the measured speedup with its 95% interval at
--round-to 1 and at the alignment auto keeps, the quality change against the unpruned model, and a
Pareto mark ('*': no other of the unpruned model, round-to 1 and auto is at once as fast and as
good, and better in one). Goals: no variant slower than the unpruned model without a warning (the
export prints one); resnet18 at 0.5, batch 8, onnxruntime: speedup >= 0.8x its FLOP ratio.

Run: bash .ci/env python benchmarks/answer_table.py [--models a,b] [--json PATH]
Trained zoo models train on first use (minutes each; `deploykit models` says how long).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from deploykit.bench.alignment import choose_round_to
from deploykit.core.errors import DeployKitError
from deploykit.core.fsutil import write_text_atomic
from deploykit.model.sources import resolve_model
from deploykit.prune.base import PruningPlan
from deploykit.results.pick import better_direction, ratio_text

ROOT = Path(__file__).resolve().parents[1]
#: model -> (plan, scope, batch, modules left unpruned)
CASES = {
    "resnet18": ("l1-structured:0.5", "layer", 8, ()),
    "vae": ("l1-structured:0.5", "layer", 1, ()),
    "mlp-sst2-trained": ("l1-structured:0.5", "layer", 1, ()),
    "gpt2-tiny-trained": ("l2-structured:0.5", "layer", 1, ()),
    "seq2seq-transformer-small-trained": ("l1-structured:0.3", "layer", 1, ()),
    # the conv subsampling's channels are flattened into a Linear with time: a channel cannot go alone
    "espnet-st-small-trained": ("l1-structured:0.3", "layer", 1, ("encoder.embed.*",)),
    str(ROOT / "models/examples/residual_cnn.py") + ":build": ("l1-structured:0.5", "layer", 8, ()),
}


def measure(model: str, plan_text: str, scope: str, batch: int, exclude: tuple[str, ...]) -> list[dict]:
    spec = resolve_model(model)
    plan = PruningPlan.parse(plan_text, scope=scope, exclude=exclude)
    alignment = choose_round_to(spec, plan, threads=1, batch=batch,
                                progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    rows = []
    for key in sorted({k for runtimes in alignment.candidates.values() for k in runtimes}):
        entry = {"model": spec.name, "plan": plan.label() + "".join(f" -{x}" for x in exclude), "batch": batch,
                 "runtime": key, "auto_keeps": alignment.choice, "noisy": alignment.noisy, "reason": alignment.reason}
        for label, n in (("round_to_1", 1), ("auto", alignment.choice)):
            measured = alignment.candidates[n][key]
            flops = alignment.flops.get(n)
            quality = {name: value - alignment.metrics.get(1, {}).get(name, value)
                       for name, value in alignment.metrics.get(n, {}).items()}
            change = {name: value - alignment.unpruned_metrics[name]
                      for name, value in alignment.metrics.get(n, {}).items() if name in alignment.unpruned_metrics}
            entry[label] = {"speedup": measured["speedup"], "ci95": measured["ci95"],
                            "flops_ratio": alignment.unpruned_flops / flops if flops and alignment.unpruned_flops
                            else None, "metrics": alignment.metrics.get(n, {}), "quality_vs_round_to_1": quality,
                            "quality_change": change}
        _mark_front(entry)
        rows.append(entry)
    return rows


def _mark_front(entry: dict) -> None:
    """'pareto' on round-to 1 and auto: no other of (unpruned, round-to 1, auto) at once as fast and as
    good (the first metric, higher better; its change against the unpruned model) and better in one."""
    def score(variant: dict) -> tuple[float, float]:
        change = next(iter(variant["quality_change"].values()), 0.0)
        return variant["speedup"], better_direction(next(iter(variant["quality_change"]), "")) * change

    points = {"unpruned": (1.0, 0.0), "round_to_1": score(entry["round_to_1"]), "auto": score(entry["auto"])}
    for label in ("round_to_1", "auto"):
        mine = points[label]
        entry[label]["pareto"] = not any(
            all(a >= b for a, b in zip(other, mine)) and any(a > b for a, b in zip(other, mine))
            for name, other in points.items() if name != label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--json", default="benchmarks/results/answer_table.json")
    args = parser.parse_args()
    chosen = args.models.split(",") if args.models else list(CASES)
    rows, failed = [], {}
    for model in chosen:
        print(f"{model}:", file=sys.stderr, flush=True)
        try:
            rows += measure(model, *CASES[model])
        except DeployKitError as exc:  # a model the mechanism cannot handle is a row saying why, not a crash
            failed[model] = str(exc)
            print(f"  failed: {exc}", file=sys.stderr, flush=True)
    table = []
    for r in rows:
        one, auto = r["round_to_1"], r["auto"]
        table.append([r["model"], r["plan"], r["batch"], r["runtime"], _ratio(one["flops_ratio"]), _speed(one),
                      f"{r['auto_keeps']}{' NOISY' if r['noisy'] else ''}", _ratio(auto["flops_ratio"]), _speed(auto),
                      _quality(one), _quality(auto), ("*" if one["pareto"] else "") + "/" + ("*" if auto["pareto"] else "")])
    print(tabulate(table, headers=["model", "plan", "batch", "runtime", "FLOPs fewer (1)", "speedup (1)",
                                   "auto keeps", "FLOPs fewer (auto)", "speedup (auto)", "quality (1)",
                                   "quality (auto)", "pareto 1/auto"],
                   disable_numparse=True))
    for model, error in failed.items():
        print(f"failed: {model}: {error}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"rows": rows, "failed": failed}, indent=2) + "\n")
    return 0


def _quality(variant: dict) -> str:
    return ", ".join(f"{name} {value:+.4f}" for name, value in variant["quality_change"].items()) or "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _speed(entry: dict) -> str:
    return ratio_text(entry["speedup"], *entry["ci95"])


if __name__ == "__main__":
    sys.exit(main())
