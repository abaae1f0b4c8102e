"""ESPnet speech translation: torch vs onnxruntime, original vs pruned, measured by `deploykit bench`.

Variants: the original model, the study's best plan (magnitude, per module group) as csr, and
structured L1 pruning of the feed-forward and convolution-module channels (0.5) as dense-shrunk, with
and without half of every attention module's heads.
Each is exported and measured exactly as `deploykit bench DIR` does it: for 5 s of features (500
frames), the encoder, one decoder step after 10 tokens, and greedy decoding end to end (to <eos>, at
most one token per encoder frame, ESPnet's default limit), each in a fresh process per runtime, with
parity (greedy tokens included) checked. Random weights never emit <eos>, so they decode to the limit
(125 tokens for 500 frames) and the ratios compare runtimes. Under onnxruntime the decoder caches
attention keys and values (`deploykit.pipelines.espnet_decoder`); under torch it is ESPnet's own
`forward_one_step`, which recomputes them every step: "ort vs torch" is the export against the
model as ESPnet runs it, runtime and cache together.
Each export also tries onnxruntime's transformer optimiser on the encoder
(`deploykit.pipelines.encoder_fusion`): the table says which graph the export kept and the fused
graph's time over the plain one's. Medians and ratios come from one run on this machine.

A trained model (`espnet-st-small-trained`, `espnet-st-trained`) is fed utterances of its own task,
decodes until <eos>, and adds int8 variants (dynamic int8 with its nodes chosen by timing each on its
input, and every node) and its BLEU per runtime (the model's evaluation: greedy decoding of held-out 5 s utterances,
under torch on the rebuilt model and under onnxruntime on the exported graphs), beside the peak
resident memory of each runtime's benchmark process.

Run: bash .ci/env python benchmarks/espnet_st.py [--model espnet-st] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from deploykit.bench.runner import bench_artifact
from deploykit.bench.settings import Grid, TimingSettings
from deploykit.core.confine import read_json
from deploykit.core.env import available_cores
from deploykit.core.fsutil import write_text_atomic
from deploykit.export.build import export_artifact
from deploykit.model.artifact import ST_CONFIG_FILE
from deploykit.model.catalog import get_model
from deploykit.model.zoo.espnet_st import PRESETS
from deploykit.pipelines.st_decode import OnnxScoringTranslator
from deploykit.prune.base import PruningPlan, load_plan_file, parse_rule
from deploykit.runtime.loading import load_torch_model

STAGES = ("encoder", "decoder-step", "greedy")
SHRINK_RULES = ("encoder.encoders.*.feed_forward*=0.5", "encoder.encoders.*.conv_module.*=0.5",
                "decoder.decoders.*.feed_forward.*=0.5", "*=0")
#: the same, and half of every attention module's heads (encoder self-attention, decoder self- and cross-)
HEAD_RULES = ("encoder.encoders.*.self_attn.*=0.5", "decoder.decoders.*.self_attn.*=0.5",
              "decoder.decoders.*.src_attn.*=0.5")


def _fusion_cell(fusion: dict | None) -> str:
    """Which encoder graph the export kept, and the fused graph's time over the plain one's."""
    if not fusion:
        return "-"
    ratio = fusion.get("fused_over_plain")
    return fusion["choice"] + (f" ({ratio:.2f}x)" if ratio else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="espnet-st")
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--json", default="benchmarks/results/espnet_st.json")
    args = parser.parse_args()
    variants = {
        "original": (PruningPlan(), "dense"),
        "best plan (csr)": (PruningPlan(**load_plan_file(PRESETS / "best_plan.toml")), "csr"),
        "ff+conv 0.5 (dense-shrunk)": (PruningPlan("l1-structured", 0.5, scope="layer",
                                                   rules=tuple(parse_rule(r) for r in SHRINK_RULES)), "dense-shrunk"),
        "ff+conv+heads 0.5 (dense-shrunk)": (PruningPlan("l1-structured", 0.5, scope="layer", rules=tuple(
            parse_rule(r) for r in HEAD_RULES + SHRINK_RULES)), "dense-shrunk"),
    }
    options = {label: {} for label in variants}
    spec = get_model(args.model)
    if spec.evaluate is not None:  # a trained model: int8 is judged by its BLEU
        variants.update({"int8 (measured nodes)": (PruningPlan(), "dense"),
                         "int8 (all nodes)": (PruningPlan(), "dense"),
                         "ff+conv 0.5 + int8": variants["ff+conv 0.5 (dense-shrunk)"]})
        options.update({"int8 (measured nodes)": {"quantize": "int8"},
                        "int8 (all nodes)": {"quantize": "int8", "quantize_operators": "all"},
                        "ff+conv 0.5 + int8": {"quantize": "int8"}})
    grid = Grid(runtimes=("torch", "onnxruntime"), threads=(available_cores(),))
    timing = TimingSettings(warmup_s=0.2, min_time_s=args.min_time, min_iters=5)
    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    median: dict[tuple[str, str, str], float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (plan, form)) in enumerate(variants.items()):
            progress(f"{label}: export")
            directory = Path(tmp) / f"v{i}"
            manifest = export_artifact(args.model, plan, form, directory, **options[label]).manifest
            for record in bench_artifact(directory, grid, timing, progress):
                median[label, record.runtime, record.stage] = record.measurement.median_ms
                median[label, record.runtime, "peak_mb"] = max(median.get((label, record.runtime, "peak_mb"), 0),
                                                               (record.peak_rss_bytes or 0) / 1e6)
                rows.append({"variant": label, **record.to_dict()})
            if spec.evaluate is not None:
                progress(f"{label}: BLEU per runtime")
                median[label, "torch", "bleu"] = spec.evaluate(load_torch_model(directory)[0])["bleu"]
                median[label, "onnxruntime", "bleu"] = spec.evaluate(OnnxScoringTranslator(directory))["bleu"]
                rows.append({"variant": label, "bleu": {rt: median[label, rt, "bleu"] for rt in ("torch", "onnxruntime")},
                             "quantization": manifest.quantization})
            median[label, "fusion", ""] = _fusion_cell(
                read_json(directory, ST_CONFIG_FILE, "speech-translation config")["encoder_fusion"])
            onnx_mb = (manifest.files["encoder.onnx"] + manifest.files["decoder.onnx"]) / 1e6
            median[label, "onnx_mb", ""] = onnx_mb
            median[label, "nonzero", ""] = manifest.nonzero_parameters
            median[label, "parameters", ""] = manifest.parameters
    base = median["original", "torch", "greedy"]
    table = []
    for label in variants:
        cells = [label, f"{median[label, 'parameters', '']:,}", f"{median[label, 'nonzero', '']:,}",
                 f"{median[label, 'onnx_mb', '']:.2f}", median[label, "fusion", ""]]
        for stage in STAGES:
            cells += [f"{median[label, 'torch', stage]:.2f}", f"{median[label, 'onnxruntime', stage]:.2f}"]
        cells += [f"{median[label, 'torch', 'greedy'] / median[label, 'onnxruntime', 'greedy']:.2f}x",
                  f"{base / median[label, 'onnxruntime', 'greedy']:.2f}x",
                  f"{median[label, 'torch', 'peak_mb']:.0f}", f"{median[label, 'onnxruntime', 'peak_mb']:.0f}"]
        if spec.evaluate is not None:
            cells += [f"{median[label, 'torch', 'bleu']:.1f}", f"{median[label, 'onnxruntime', 'bleu']:.1f}"]
        table.append(cells)
    print(tabulate(table, disable_numparse=True, headers=[
        "variant", "params", "nonzero", "onnx MB", "encoder graph (fused/plain time)", "torch enc ms", "ort enc ms", "torch step ms", "ort step ms",
        "torch greedy ms", "ort greedy ms", "ort vs torch", "ort vs original torch", "torch peak MB", "ort peak MB",
        *(["torch BLEU", "ort BLEU"] if spec.evaluate is not None else [])]))
    print("study: onnxruntime 1.44x PyTorch on the original model, 2.17x pruned onnxruntime vs original PyTorch")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
