"""Generating Hugging Face models through optimum: export with and without the key/value cache, and
PyTorch generation (the torch side of the "text-generation" and "text2text-generation" pipelines).

Models are `deploykit.model.hf.CausalLM` wrappers around a transformers causal LM (the zoo's GPT-2s,
any local directory whose task is text-generation: GPT-2, Llama, ...), possibly pruned: magnitude
masks stripped, or MLP blocks and GPT-2's attention heads shrunk by dense-shrunk (heads: the same
number in every layer, which optimum's cache inputs need). optimum traces the transformers model
with its architecture's `OnnxConfig` into `decoder_with_past.onnx` ("text-generation-with-past") and
`decoder.onnx` ("text-generation"), both pointing into one file of the weights they share
(`deploykit.convert.shared_weights`). The export is accepted only when onnxruntime reproduces PyTorch:
logits of the prompt, of a cached step and of the full sequence within tolerance, and exactly the
same greedy tokens.

Encoder-decoders (`deploykit.model.hf.Seq2SeqLM`: T5, BART, ...) go the same way with optimum's
"text2text-generation-with-past" task: `encoder.onnx`, `decoder.onnx` (first step) and
`decoder_with_past.onnx` (`deploykit.pipelines.seq2seq_decode`), checked by the logits of the first
and of a cached step and by greedy tokens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from deploykit.convert.shared_weights import share_weights
from deploykit.core.errors import UsageError
from deploykit.model.artifact import WEIGHTS_FILE
from deploykit.model.hf import Seq2SeqLM, TorchCausalLM, TorchSeq2SeqLM, decoder_start, hf_model, max_positions
from deploykit.pipelines.optimum_export import check_generation, optimum_export, sparse_files
from deploykit.pipelines.seq2seq_decode import GRAPH_KEYS, T2T_CONFIG_FILE, OnnxSeq2SeqLM
from deploykit.pipelines.textgen import (
    NO_PAST_FILE,
    TEXTGEN_CONFIG_FILE,
    WITH_PAST_FILE,
    GenerationSession,
    OnnxCausalLM,
)
from deploykit.runtime.loading import load_cpu_session_model, load_torch_model
from deploykit.runtime.session import RuntimeInfo, Target
from deploykit.runtime.torch_session import in_precision


@dataclass(frozen=True)
class ExportedGenerator:
    #: output -> max |onnxruntime - torch|
    errors: dict[str, float]
    sparse_initializers: dict[str, int]


def _head_counts(hf: nn.Module) -> set[int]:
    return {m.num_heads for m in hf.modules() if isinstance(getattr(m, "num_heads", None), int)}


def export_causal_lm(model: nn.Module, directory: Path, opset: int, tolerance: float, sparse: bool) -> ExportedGenerator:
    """Both graphs into `directory` with textgen_config.json, checked against PyTorch."""
    hf = hf_model(model)
    heads = _head_counts(hf)
    if len(heads) > 1:
        raise UsageError(
            "a causal LM with a different number of attention heads per layer cannot go through optimum's exporter: "
            f"it builds every layer's key/value cache input alike (these layers have {sorted(heads)} heads); "
            "prune heads with --scope layer (the same number per layer), or keep them (--rule '*.attn.c_attn=0')")
    directory = Path(directory)
    custom = _pruned_heads_config if hf.config.model_type == "gpt2" and heads and heads != {hf.config.n_head} else None
    for task, name in (("text-generation-with-past", WITH_PAST_FILE), ("text-generation", NO_PAST_FILE)):
        optimum_export(model, task, opset, directory, {"model.onnx": name},
                       {"model": custom(hf, task)} if custom else None)
    config = {"with_past": WITH_PAST_FILE, "no_past": NO_PAST_FILE, "eos": hf.config.eos_token_id,
              "vocab_size": hf.config.vocab_size, "layers": hf.config.num_hidden_layers, "exporter": "optimum",
              "max_positions": max_positions(hf.config)}
    (directory / TEXTGEN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sparse_initializers = sparse_files(directory, (WITH_PAST_FILE, NO_PAST_FILE)) if sparse else {}
    share_weights(directory, (WITH_PAST_FILE, NO_PAST_FILE))  # optimum wrote every weight into both
    errors = check_generation(TorchCausalLM(model), OnnxCausalLM(directory), hf.config.vocab_size, tolerance)
    return ExportedGenerator(errors, sparse_initializers)


def export_seq2seq(model: nn.Module, directory: Path, opset: int, tolerance: float, sparse: bool) -> ExportedGenerator:
    """The encoder and both decoder graphs into `directory` with text2text_config.json, checked against PyTorch."""
    hf = hf_model(model)
    directory = Path(directory)
    made = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
            "decoder_with_past": "decoder_with_past_model.onnx"}
    optimum_export(model, "text2text-generation-with-past", opset, directory,
                   {made[key]: name for key, name in GRAPH_KEYS.items()})
    config = {**GRAPH_KEYS, "eos": hf.config.eos_token_id, "decoder_start": decoder_start(hf.config),
              "vocab_size": hf.config.vocab_size, "exporter": "optimum", "max_positions": max_positions(hf.config)}
    (directory / T2T_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sparse_initializers = sparse_files(directory, GRAPH_KEYS.values()) if sparse else {}
    share_weights(directory, GRAPH_KEYS.values())  # both decoders hold the same weights (T5: the encoder's embedding too)
    errors = check_generation(TorchSeq2SeqLM(model), OnnxSeq2SeqLM(directory), hf.config.vocab_size, tolerance)
    return ExportedGenerator(errors, sparse_initializers)


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


def export_generator(model: nn.Module, directory: Path, opset: int, tolerance: float, sparse: bool) -> ExportedGenerator:
    """The graphs of a causal LM or of an encoder-decoder, whichever `model` wraps."""
    export = export_seq2seq if isinstance(model, Seq2SeqLM) else export_causal_lm
    return export(model, directory, opset, tolerance, sparse)


def torch_lm(model: nn.Module):
    """The generating interface of a wrapped model (`deploykit.model.causal_lm.greedy`)."""
    return TorchSeq2SeqLM(model) if isinstance(model, Seq2SeqLM) else TorchCausalLM(model)


def load_torch_session(directory: str | Path, threads: int, target: Target) -> GenerationSession:
    """The benchmark session of an exported generating artifact under PyTorch (CPU only: the decoding
    loop builds its token tensors there)."""
    model = load_cpu_session_model(directory, threads, target, "text generation")
    return in_precision(GenerationSession(torch_lm(model), RuntimeInfo("torch", torch.__version__, threads, "cpu"),
                                          [WEIGHTS_FILE]), target)


def reference_session(directory: str | Path, consent: Sequence[str] = ()) -> GenerationSession:
    """What every runtime's session must reproduce: the stripped PyTorch model's."""

    model, _ = load_torch_model(directory, for_runtime=False, consent=consent)
    return GenerationSession(torch_lm(model), RuntimeInfo("torch", torch.__version__, torch.get_num_threads(), "cpu"), [])
