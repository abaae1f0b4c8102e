"""GPT-2 of the GPT-2 study, from its configuration (random weights; nothing is downloaded).

Needs the `hf` extra (transformers, optimum). The model is built with eager attention and no KV
cache: the cache and SDPA attention break tracing (torch-pruning), and the wrapper returns the
logits tensor instead of a ModelOutput. Its ONNX form comes from optimum, with and without the
key/value cache (`deploykit.pipelines.hf_generation`), and artifacts run as the "text-generation" pipeline.

Its evaluation is perplexity on a fixed token sequence drawn from the model's own vocabulary: for
random weights that number is about the vocabulary size, and it exercises the path a trained model
and a real text would take.
"""

from __future__ import annotations

from torch import nn

from deploykit.core.errors import UsageError
from deploykit.model.hf import CausalLM, causal_lm_fields
from deploykit.model.spec import register_model

VOCAB = 50257


def build_gpt2(**config) -> CausalLM:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UsageError("GPT-2 models need transformers: pip install 'deploykit[hf]'") from None
    cfg = GPT2Config(use_cache=False, attn_implementation="eager", **config)
    return CausalLM(GPT2LMHeadModel(cfg))


def _fields(vocab: int) -> dict:
    return dict(**causal_lm_fields(vocab), output_layers=["model.lm_head"])


@register_model("gpt2-small", **_fields(VOCAB))
def gpt2_small() -> nn.Module:
    """GPT-2 small (GPT-2 study): 12 layers, 12 heads, d_model 768, vocab 50257, 124,439,808 parameters."""
    return build_gpt2()


TINY_VOCAB = 1000


@register_model("gpt2-tiny", **_fields(TINY_VOCAB))
def gpt2_tiny() -> nn.Module:
    """GPT-2, tiny configuration for CI: 2 layers, 4 heads, d_model 64, vocab 1000, 180,480 parameters."""
    return build_gpt2(n_layer=2, n_head=4, n_embd=64, vocab_size=TINY_VOCAB, n_positions=256)
