"""GPT-2 through optimum: export with and without the key/value cache, and PyTorch generation.

Models are the zoo's `CausalLM` wrappers (`deploykit/model/zoo/gpt2.py`) around a transformers
`GPT2LMHeadModel`, possibly pruned: magnitude masks stripped, or MLP blocks and attention heads
shrunk by dense-shrunk (heads: the same number in every layer, which optimum's cache inputs need).
optimum's exporter traces the Hugging Face model itself, with its own dummy inputs, into
`decoder_with_past.onnx` ("text-generation-with-past") and `decoder.onnx` ("text-generation").
The export is accepted only when onnxruntime reproduces PyTorch: logits of the prompt, of a
cached step and of the full sequence within tolerance, and exactly the same greedy tokens.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from deploykit.convert.onnx_export import max_abs_errors, sparsify_initializers
from deploykit.core.errors import ExportError, ParityError, UsageError
from deploykit.core.fsutil import scratch_directory
from deploykit.model.artifact import WEIGHTS_FILE
from deploykit.model.causal_lm import greedy
from deploykit.model.zoo.gpt2 import TorchCausalLM, hf_model
from deploykit.pipelines.textgen import (
    NO_PAST_FILE,
    TEXTGEN_CONFIG_FILE,
    WITH_PAST_FILE,
    GenerationSession,
    OrtCausalLM,
)
from deploykit.runtime.loading import load_torch_model
from deploykit.runtime.session import RuntimeInfo, Target

#: greedy tokens compared at export (every one must match)
CHECK_TOKENS = 16
CHECK_PROMPT = 8


@dataclass(frozen=True)
class ExportedGPT2:
    #: output -> max |onnxruntime - torch|
    errors: dict[str, float]
    sparse_initializers: dict[str, int]


def export_gpt2(model: nn.Module, directory: Path, opset: int, tolerance: float, sparse: bool) -> ExportedGPT2:
    """Both graphs into `directory` with textgen_config.json, checked against PyTorch."""
    hf = hf_model(model)
    heads = {layer.attn.num_heads for layer in hf.transformer.h}
    if len(heads) > 1:
        raise UsageError(
            "GPT-2 with a different number of attention heads per layer cannot go through optimum's exporter: "
            f"it builds every layer's key/value cache input alike (these layers have {sorted(heads)} heads); "
            "prune heads with --scope layer (the same number per layer), or keep them (--rule '*.attn.c_attn=0')")
    directory = Path(directory)
    for task, name in (("text-generation-with-past", WITH_PAST_FILE), ("text-generation", NO_PAST_FILE)):
        _optimum_export(hf, task, opset, directory / name)
    eos = hf.config.eos_token_id
    config = {"with_past": WITH_PAST_FILE, "no_past": NO_PAST_FILE, "eos": eos, "vocab_size": hf.config.vocab_size,
              "layers": hf.config.n_layer, "exporter": "optimum"}
    (directory / TEXTGEN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sparse_initializers: dict[str, int] = {}
    if sparse:
        for name in (WITH_PAST_FILE, NO_PAST_FILE):
            sparse_initializers.update({f"{name}:{k}": v for k, v in sparsify_initializers(directory / name).items()})
    errors = check_generation(model, directory, tolerance)
    return ExportedGPT2(errors, sparse_initializers)


def _pruned_heads_config(hf: nn.Module, task: str):
    """optimum's GPT-2 export config, with its dummy key/value cache shaped for the heads left.

    optimum sizes the cache as (heads, hidden / heads) from the model config; after uniform head
    pruning each layer has fewer heads of the same size, which the config cannot say (n_head also
    sets the head size). A copy of the config carries the cache's real shape instead.
    """
    from optimum.exporters.onnx.model_configs import GPT2OnnxConfig
    from optimum.utils import NormalizedTextConfig

    attn = hf.transformer.h[0].attn
    config = copy.deepcopy(hf.config)
    config.deploykit_cache_heads, config.deploykit_cache_width = attn.num_heads, attn.num_heads * attn.head_dim

    class PrunedHeadsGPT2OnnxConfig(GPT2OnnxConfig):
        NORMALIZED_CONFIG_CLASS = NormalizedTextConfig.with_args(
            num_layers="n_layer", num_attention_heads="deploykit_cache_heads", hidden_size="deploykit_cache_width")

    past = task.endswith("-with-past")
    return PrunedHeadsGPT2OnnxConfig(config, task="text-generation", use_past=past, use_past_in_inputs=past)


def _optimum_export(hf: nn.Module, task: str, opset: int, path: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    use_cache = hf.config.use_cache
    hf.config.use_cache = task.endswith("-with-past")  # the zoo builds GPT-2 without a cache (tracing)
    custom = None
    if hf.transformer.h[0].attn.num_heads != hf.config.n_head:
        custom = {"model": _pruned_heads_config(hf, task)}
    try:
        with scratch_directory("optimum") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                onnx_export_from_model(hf, tmp, task=task, opset=opset, do_validation=False, custom_onnx_configs=custom)
            except Exception as exc:  # optimum raises many types; the first line says why
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ExportError(f"optimum export ({task}) failed ({type(exc).__name__}): {first}") from exc
            shutil.move(str(Path(tmp) / "model.onnx"), str(path))
    finally:
        hf.config.use_cache = use_cache


def check_generation(model: nn.Module, directory: Path, tolerance: float) -> dict[str, float]:
    """Compare onnxruntime with PyTorch: prompt, cached step and full-sequence logits, greedy tokens."""
    hf = hf_model(model)
    torch_lm, ort_lm = TorchCausalLM(model, hf.config.eos_token_id), OrtCausalLM(directory)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, hf.config.vocab_size, size=(1, CHECK_PROMPT), dtype=np.int64)
    (ref_logits, ref_state), (ort_logits, ort_state) = torch_lm.prefill(prompt), ort_lm.prefill(prompt)
    token = int(np.argmax(ref_logits))
    errors = max_abs_errors([ref_logits, torch_lm.step(token, ref_state)[0], torch_lm.logits(prompt)],
                            [ort_logits, ort_lm.step(token, ort_state)[0], ort_lm.logits(prompt)],
                            ["prompt_logits", "step_logits", "logits"])
    worst = max(errors, key=errors.get)
    if not errors[worst] <= tolerance:
        raise ParityError("onnxruntime vs PyTorch", worst, errors[worst], tolerance)
    expected = greedy(torch_lm, prompt[0].tolist(), CHECK_TOKENS, torch_lm.eos)
    got = greedy(ort_lm, prompt[0].tolist(), CHECK_TOKENS, ort_lm.eos)
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got + [None] * len(expected), expected)) if a != b)
        raise ExportError(f"onnxruntime's greedy tokens differ from PyTorch's at token {first}: "
                          f"{got[:first + 1]} vs {expected[:first + 1]}")
    return errors


def load_torch_session(directory: str | Path, threads: int, target: Target) -> GenerationSession:
    """The benchmark session of an exported GPT-2 artifact under PyTorch."""

    if target.device != "cpu":
        raise UsageError(f"text generation under torch runs on the CPU only, not {target.device}")
    torch.set_num_threads(threads)
    model, _ = load_torch_model(directory, consent=target.code_consent, batch=target.batch)
    lm = TorchCausalLM(model, hf_model(model).config.eos_token_id)
    return GenerationSession(lm, RuntimeInfo("torch", torch.__version__, threads, "cpu"), [WEIGHTS_FILE])


def reference_session(directory: str | Path, consent: Sequence[str] = ()) -> GenerationSession:
    """What every runtime's session must reproduce: the stripped PyTorch model's."""

    model, _ = load_torch_model(directory, for_runtime=False, consent=consent)
    lm = TorchCausalLM(model, hf_model(model).config.eos_token_id)
    return GenerationSession(lm, RuntimeInfo("torch", torch.__version__, torch.get_num_threads(), "cpu"), [])
