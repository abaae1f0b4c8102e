"""ESPnet speech translation: torch vs onnxruntime, original vs pruned (the study's best plan).

For 5 s of audio features (500 frames of 80 filterbanks): encoder latency, one decoder step (with a
10-token cache), and end-to-end greedy decoding of `--tokens` tokens, each under PyTorch and ONNX
Runtime, for the original model and the study's best plan (magnitude, per module) exported as csr.
Also the ONNX file sizes. Medians and ratios come from one run on this machine. Random weights never
emit <eos> early, so every decode produces exactly `--tokens` tokens: the work is fixed, and the
ratios compare runtimes, not output lengths (the study's pruned model ran longer because it broke).

Run: bash .ci/env python benchmarks/espnet_st.py [--model espnet-st] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from deploykit.artifact import read_manifest
from deploykit.env import available_cores
from deploykit.espnet import OrtSpeechTranslator, decode_torch, torch_step
from deploykit.export import export_artifact
from deploykit.fsutil import write_text_atomic
from deploykit.measure import measure
from deploykit.prune import PruningPlan, load_plan_file, strip_masks, prune_model
from deploykit.spec import get_model
from deploykit.zoo.espnet_st import PRESETS

FRAMES = 500  # 5 s at a 10 ms shift


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="espnet-st")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--json", default="benchmarks/results/espnet_st.json")
    args = parser.parse_args()
    threads = available_cores()
    torch.set_num_threads(threads)
    feats = torch.randn(1, FRAMES, 80, generator=torch.Generator().manual_seed(0))
    plans = {"original": PruningPlan(), "best plan": PruningPlan(**load_plan_file(PRESETS / "best_plan.toml"))}

    def timed(fn, min_iters=5) -> float:
        return measure(fn, warmup_s=0.2, min_time_s=args.min_time, min_iters=min_iters).median_ms

    rows = []
    spec = get_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        for label, plan in plans.items():
            print(f"{label}: export", file=sys.stderr)
            directory = Path(tmp) / label.replace(" ", "-")
            export_artifact(spec, plan, "csr", directory)
            manifest = read_manifest(directory)
            model = spec.make()
            prune_model(model, plan, output_layers=spec.output_layers)
            strip_masks(model)
            translator = OrtSpeechTranslator(directory, threads)  # sessions loaded once, outside the timing
            config, encoder, decoder = translator.config, translator.encoder, translator.decoder
            with torch.no_grad():
                memory = model.encode(feats, torch.tensor([FRAMES]))[0]
                prefix = [config["sos"]] + list(range(3, 13))
                _, torch_cache = torch_step(model, prefix[:-1], memory, None)
            ort_cache = decoder.initial_cache()
            for k in range(1, len(prefix)):
                _, ort_cache = decoder.step(np.array([prefix[:k]]), memory.numpy(), ort_cache)
            print(f"{label}: timing", file=sys.stderr)
            with torch.no_grad():
                row = {
                    "model": args.model, "variant": label, "threads": threads,
                    "nonzero_parameters": manifest.nonzero_parameters, "parameters": manifest.parameters,
                    "encoder_onnx_bytes": manifest.files["encoder.onnx"], "decoder_onnx_bytes": manifest.files["decoder.onnx"],
                    "weights_bytes": manifest.files["weights.safetensors"],
                    "torch_encoder_ms": timed(lambda: model.encode(feats, torch.tensor([FRAMES]))),
                    "ort_encoder_ms": timed(lambda: encoder.run(["encoder_out"], {"feats": feats.numpy()})),
                    "torch_step_ms": timed(lambda: torch_step(model, prefix, memory, torch_cache), 20),
                    "ort_step_ms": timed(lambda: decoder.step(np.array([prefix]), memory.numpy(), ort_cache), 20),
                    "torch_decode_ms": timed(lambda: decode_torch(model, feats, args.tokens), 3),
                    "ort_decode_ms": timed(lambda: translator.decode(feats.numpy(), args.tokens), 3),
                }
            rows.append(row)
    base = rows[0]
    print(tabulate(
        [[r["variant"], f"{r['nonzero_parameters']:,}", f"{(r['encoder_onnx_bytes'] + r['decoder_onnx_bytes']) / 1e6:.2f}",
          f"{r['torch_encoder_ms']:.1f}", f"{r['ort_encoder_ms']:.1f}", f"{r['torch_step_ms']:.2f}", f"{r['ort_step_ms']:.2f}",
          f"{r['torch_decode_ms']:.0f}", f"{r['ort_decode_ms']:.0f}",
          f"{base['torch_decode_ms'] / r['ort_decode_ms']:.2f}x"] for r in rows],
        headers=["variant", "nonzero", "onnx MB", "torch enc ms", "ort enc ms", "torch step ms", "ort step ms",
                 "torch decode ms", "ort decode ms", "ort decode vs original torch"],
        disable_numparse=True))
    print(f"onnxruntime vs PyTorch, original model, end to end: {base['torch_decode_ms'] / base['ort_decode_ms']:.2f}x "
          f"(study: 1.44x); pruned onnxruntime vs original PyTorch: {base['torch_decode_ms'] / rows[1]['ort_decode_ms']:.2f}x "
          f"(study: 2.17x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({"frames": FRAMES, "tokens": args.tokens, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
